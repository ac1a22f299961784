"""Exponential moving average (EMA) of the adapter weights, for previews, validation and the export.

After optimizer step t = 1, 2, … each trainable tensor θ updates its average θ̄ (fp32, starting at θ's init):
    d_t = decay · min(1, t / warmup_steps)          (d_t = decay when warmup_steps = 0)
    θ̄ ← d_t · θ̄ + (1 − d_t) · θ
so θ̄ averages about the last 1/(1 − decay) steps, and during the warm-up it follows θ closely instead of
dragging the untrained init along. ``on_cpu`` keeps θ̄ in host memory (saves accelerator memory; one copy per step).
The state (θ̄ by name) is saved in every checkpoint and loaded on resume, so a resumed run's average is the
uninterrupted run's, bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float, warmup_steps: int = 0,
                 on_cpu: bool = False):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.names = [n for n, _ in named_params]
        self.average = {n: p.detach().to(device="cpu" if on_cpu else p.device, dtype=torch.float32, copy=True)
                        for n, p in named_params}

    def decay_at(self, step: int) -> float:
        """d_t for optimizer step ``step`` (1-based)."""
        return self.decay * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.decay

    @torch.no_grad()
    def update(self, params: list[nn.Parameter], step: int) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ for each parameter (in ``named_params`` order)."""
        d = self.decay_at(step)
        for n, p in zip(self.names, params):
            avg = self.average[n]
            avg.mul_(d).add_(p.detach().to(avg.device, torch.float32), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, params: list[nn.Parameter]) -> None:
        """Write θ̄ into the parameters (in their dtype and device)."""
        for n, p in zip(self.names, params):
            p.copy_(self.average[n])

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.cpu().clone() for n, t in self.average.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.average):
            missing, extra = sorted(set(self.average) - set(state)), sorted(set(state) - set(self.average))
            raise ValueError(f"EMA state does not match the adapters (missing {missing[:3]}, unexpected {extra[:3]})")
        for n, t in state.items():
            self.average[n].copy_(t)
