"""The trainer: the loop (``loop``: ``train``, ``Trainer``), resumable state (``state``), optimizers
(``optim``), EMA (``ema``), validation loss (``validation``), preview grids (``preview``) and the
run log (``runlog``). ``from sdtune.train import train`` is the loop's entry point, imported on
first use so that ``sdtune.train.optim`` alone (the config schema's optimizer names) stays light."""
from __future__ import annotations

__all__ = ["train", "Trainer", "TrainResult"]


def __getattr__(name: str):
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
