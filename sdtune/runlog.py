"""A run's logs: ``log.csv`` (one row per optimizer step, flushed as written), TensorBoard when installed, and
``loss.png`` (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import csv
from pathlib import Path

from .atomic import atomic_path

LOG_FIELDS = ("step", "loss", "lr_unet", "lr_text", "grad_norm", "seconds")


class RunLog:
    """log.csv, one row per step, flushed as written; a resumed run keeps the rows up to its start step."""

    def __init__(self, path: Path, start: int):
        rows = []
        if start and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.fh.flush()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()

    def write(self, step: int, loss: float, lrs: list[float], grad_norm: float, seconds: float) -> None:
        self.writer.writerow({"step": step, "loss": repr(loss), "lr_unet": lrs[0], "lr_text": lrs[1] if len(lrs) > 1
                              else "", "grad_norm": f"{grad_norm:.6g}", "seconds": f"{seconds:.2f}"})
        self.fh.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr_unet", lrs[0], step)


def read_log(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_loss(log_path: Path, png: Path) -> None:
    """loss.png: the per-step loss and its moving average (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
