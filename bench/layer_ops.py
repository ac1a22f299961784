"""One adapted layer under autocast, for ``bench_adapters.py --layer``: which aten ops it runs, with their dtypes,
and which of them copy full-size tensors; or its forward + backward time in fp32 and bf16.

One SD1.5-sized layer (conv 320→320 3×3 on 2×320×32×32, or linear 320→320 on 2×1024×320), one forward + backward
(gradient of ones) through the adapter, every aten op recorded by a ``TorchDispatchMode`` (forward and autograd
backward). Only ops that read or write a *full-size* tensor (≥ the layer's input or output numel) are listed, with
the dtype (and shape) of each tensor argument and of the result; casts (``_to_copy``/``copy_``/``clone``) are COPY.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

COPIES = {"_to_copy", "copy_", "clone", "contiguous", "_copy_from_and_resize"}
SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def _show(t: torch.Tensor, big: int) -> str:
    """dtype, with the shape for a full-size tensor (and "cl" when it is channels_last)."""
    d = SHORT.get(t.dtype, str(t.dtype))
    if t.numel() < big:
        return d
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return f"{d}{list(t.shape)}{'cl' if cl else ''}".replace(" ", "")


class OpLog(TorchDispatchMode):
    """Records (op name, input dtypes of tensors ≥ ``big`` elements, output dtype, output numel) for every op."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.ops = big, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.numel() >= self.big for t in ins + outs):
            name = func.__name__.split(".")[0]
            self.ops.append((name, tuple(_show(t, self.big) for t in ins), _show(outs[0], self.big) if outs else "-"))
        return out


def make(adapter: str, layer: str, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    c = 320
    base = nn.Conv2d(c, c, 3, padding=1) if layer == "conv" else nn.Linear(c, c)
    x = torch.randn(2, c, 32, 32) if layer == "conv" else torch.randn(2, 1024, c)
    if channels_last:
        base, x = base.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    base.requires_grad_(False)
    x.requires_grad_(True)                              # as inside a network: the input gradient is computed too
    if adapter == "floor":
        return base, x
    if adapter.startswith("peft"):
        from peft import LoraConfig, inject_adapter_in_model

        holder = nn.Sequential(base)
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["0"],
                                           use_dora=adapter == "peft-dora"), holder)
        for n, p in holder.named_parameters():
            p.requires_grad_("lora_" in n)
        return holder, x
    from sdtune.adapters import AdapterSpec, make_adapter

    spec = {"sdtune-locon": AdapterSpec("locon", rank=16, alpha=8, path="bypass"),
            "sdtune-dora": AdapterSpec("dora", rank=16, path="bypass"),
            "sdtune-dora-out": AdapterSpec("dora", rank=16, dora_axis="out", path="bypass"),
            "sdtune-flora": AdapterSpec("flora", rank=16, path="bypass")}[adapter]
    a = make_adapter(base, spec, "lora_probe")
    with torch.no_grad():                               # ΔW ≠ 0
        for _, p in a.trainable_named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return a, x


def probe(adapter: str, layer: str, dtype: str, channels_last: bool) -> list[tuple]:
    module, leaf = make(adapter, layer, channels_last)
    x = leaf.clone()            # a non-leaf, as an activation is: autocast caches casts of leaves only
    log = OpLog(big=min(x.numel(), module(x).numel()))
    with log:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = module(x)
    grad = torch.ones_like(y)                           # made outside the log: only the layer's own ops count
    with log:
        y.backward(grad)
    return log.ops


def timing(names: list[str], layer: str, channels_last: bool, repeats: int) -> dict[tuple[str, str], float]:
    """Median seconds of forward + backward per (adapter, dtype), the configurations interleaved round-robin so
    that a busy machine slows them alike."""
    import statistics
    import time

    built = {n: make(n, layer, channels_last) for n in names}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats + 1):                        # the first round warms up
        for n, (module, leaf) in built.items():
            for dtype in ("fp32", "bf16"):
                x = leaf.detach().clone().requires_grad_(True)
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    y = module(x)
                y.backward(torch.ones_like(y))
                times.setdefault((n, dtype), []).append(time.perf_counter() - t)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def report(adapters: list[str], layer: str, dtype: str, channels_last: bool, listing: bool, repeats: int) -> None:
    """Print the op summary per adapter (``repeats`` 0), or the median-time table over ``repeats`` rounds."""
    where = f"{layer}{', channels_last' if channels_last else ''}"
    if repeats:
        med = timing(adapters, layer, channels_last, repeats)
        print(f"{where}: median of {repeats} forward+backward (ms); over floor = the adapter path\n")
        print("| adapter | fp32 ms | bf16 ms | fp32 over floor | bf16 over floor |\n|---|---|---|---|---|")
        for n in adapters:
            over = [(med[n, d] - med["floor", d]) * 1e3 if "floor" in adapters else float("nan")
                    for d in ("fp32", "bf16")]
            print(f"| {n} | {med[n, 'fp32'] * 1e3:.1f} | {med[n, 'bf16'] * 1e3:.1f} | {over[0]:+.1f} | {over[1]:+.1f} |")
        return
    print(f"{where}, {dtype} autocast; ops touching a full-size tensor (shape shown), forward + backward")
    for name in adapters:
        ops = probe(name, layer, dtype, channels_last)
        copies = sum(op in COPIES for op, _, _ in ops)
        f32 = sum(out.startswith("f32[") for op, _, out in ops if op not in COPIES)
        kinds = Counter(f"{op}({','.join(i)})->{o}" + (" COPY" if op in COPIES else "") for op, i, o in ops)
        print(f"\n{name}: {len(ops)} full-size ops, {copies} full-size copies, {f32} full-size fp32 results")
        if listing:
            for k, n in kinds.items():
                print(f"  {n}× {k}")
