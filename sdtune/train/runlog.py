"""A run's logs: ``log.csv`` (one row per optimizer step, flushed as written), TensorBoard when installed,
Weights & Biases when ``output.wandb_project`` is set, and ``loss.png`` (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from ..atomic import atomic_path

LOG_FIELDS = ("step", "loss", "lr_unet", "lr_text", "grad_norm", "seconds", "val_loss")


class RunLog:
    """log.csv, one row per step, flushed as written; a resumed run keeps the rows up to its start step."""

    def __init__(self, path: Path, start: int, *, wandb_project: str | None = None, config: dict | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = _wandb_run(wandb_project, path.parent, config) if wandb_project else None  # first: may fail
        rows = []
        if start and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
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
        if self.wandb is not None:
            self.wandb.finish()

    def preview(self, step: int, png: Path) -> None:
        if self.wandb is not None:
            import wandb
            self.wandb.log({"preview": wandb.Image(str(png))}, step=step)

    def write(self, step: int, loss: float, lrs: list[float], grad_norm: float, seconds: float,
              val_loss: float | None = None) -> None:
        """One row; ``val_loss`` only at the steps the validation loss was measured (empty otherwise)."""
        self.writer.writerow({"step": step, "loss": repr(loss), "lr_unet": lrs[0], "lr_text": lrs[1] if len(lrs) > 1
                              else "", "grad_norm": f"{grad_norm:.6g}", "seconds": f"{seconds:.2f}",
                              "val_loss": "" if val_loss is None else repr(val_loss)})
        self.fh.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr_unet", lrs[0], step)
            if val_loss is not None:
                self.tb.add_scalar("val_loss", val_loss, step)
        if self.wandb is not None:
            self.wandb.log({"loss": loss, "lr_unet": lrs[0], "grad_norm": grad_norm}
                           | ({"val_loss": val_loss} if val_loss is not None else {}), step=step)


def _wandb_run(project: str, run_dir: Path, config: dict | None):
    """A W&B run named after the run folder; its id comes from the folder's path, so a resumed run continues it."""
    try:
        import wandb
    except ImportError:
        from ..config import ConfigError
        raise ConfigError(f"output.wandb_project = {project!r} needs wandb: pip install wandb (or unset it)") from None
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)


def read_log(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_loss(log_path: Path, png: Path) -> None:
    """loss.png: the per-step loss, its moving average and the validation loss where measured (matplotlib, Agg)."""
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
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.2, label="validation (held-out images)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
