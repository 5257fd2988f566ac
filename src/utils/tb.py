"""Optional TensorBoard logging (`logging.tensorboard: true` or --tensorboard): RUN/tb/<stage>/.

Every CSV scalar of each epoch, the LR and alpha of every optimizer step, and the report's
figures, through torch.utils.tensorboard. The tensorboard package is needed only when this is on.
"""
from __future__ import annotations

from pathlib import Path

from src.utils.errors import ConfigError

INSTALL = "python -m pip install tensorboard"


def require_tensorboard():
    """SummaryWriter, or a one-line ConfigError naming the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"logging.tensorboard needs the tensorboard package: {INSTALL} "
                          f"(or run without --tensorboard)") from None
    return SummaryWriter


def open_writer(folder: Path):
    return require_tensorboard()(log_dir=str(folder))


def log_epoch(writer, epoch: int, row: dict, terms: dict, lrs: list, alpha: float, steps_before: int) -> None:
    """One epoch: every column of epoch_log.csv and epoch_terms.csv, then LR and alpha per optimizer step."""
    for key, value in {**row, **terms}.items():
        if key != "epoch" and value == value:  # NaN (no KD term) is left out
            writer.add_scalar(f"epoch/{key}", float(value), epoch)
    for i, lr in enumerate(lrs):
        writer.add_scalar("step/learning_rate", lr, steps_before + i + 1)
        writer.add_scalar("step/alpha", alpha, steps_before + i + 1)
    writer.flush()


def log_figures(folder: Path, figures: list) -> None:
    """The report's PNGs as images (one writer for the whole run)."""
    import numpy as np
    from PIL import Image
    writer = open_writer(folder)
    for png in figures:
        img = np.asarray(Image.open(png).convert("RGB"))
        writer.add_image(f"figures/{Path(png).stem}", img, dataformats="HWC")
    writer.close()
