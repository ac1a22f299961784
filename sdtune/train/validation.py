"""Validation loss: the over-fitting signal. ``train.validation_images`` instance images are held out of training
(chosen by ``train.seed``, the same every run); every ``train.validation_every`` steps and at the last step the
trainer measures

    val_loss = mean over held-out images i and t in TIMESTEPS of ‖f(z_t(i, ε_i,t), t, c_i) − target‖²

with centred, unflipped crops, captions without dropout, and noise ε drawn from a generator seeded the same way
at every measurement. Nothing is random between measurements, so the curve moves only when the weights do, and a
resumed run logs the uninterrupted run's values exactly. The weights measured are those previews and the export
use (the EMA or schedule-free average when the run keeps one). The training loss falls as the adapter memorises
its images; a validation loss that turns upward is the point to stop (or to take an earlier checkpoint).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..config import ConfigError

TIMESTEPS = (100, 300, 500, 700, 900)  # of the usual 1000: low to high noise


def hold_out(plan, n: int, seed: int):
    """(the plan without ``n`` held-out instance images, the held-out examples), chosen by a seeded permutation."""
    if n == 0:
        return plan, []
    if n >= len(plan.instances):
        raise ConfigError(f"[train] validation_images = {n}: there are {len(plan.instances)} instance images; "
                          f"at least one must stay for training")
    chosen = set(torch.randperm(len(plan.instances), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    keep = [i for i in range(len(plan.instances)) if i not in chosen]
    return (replace(plan, instances=[plan.instances[i] for i in keep], repeats=[plan.repeats[i] for i in keep]),
            [plan.instances[i] for i in sorted(chosen)])


def views(dataset, examples) -> list[tuple]:
    """The fixed views (``DreamBoothDataset.fixed_views``) of held-out ``examples``, placed as ``dataset`` places
    its own images (same buckets, background and caption policy)."""
    probe = copy.copy(dataset)
    probe.instances = list(examples)
    return probe.fixed_views()


def due(step: int, every: int, total: int) -> bool:
    return step == total or bool(every and step % every == 0)
