"""Optional TensorBoard logging (`logging.tensorboard: true` or --tensorboard): RUN/tb/<stage>/.

Every CSV scalar of each epoch, the LR and alpha of every optimizer step, and the report's
figures, through torch.utils.tensorboard. The tensorboard package is needed only when this is on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image

from .errors import ConfigError
from .logger import read_epoch_csv, terms_columns_of

INSTALL = "python -m pip install tensorboard"


def require_tensorboard():
    """SummaryWriter, or a one-line ConfigError naming the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is optional: needed only with --tensorboard
    except ImportError:
        raise ConfigError(f"logging.tensorboard needs the tensorboard package: {INSTALL} "
                          f"(or run without --tensorboard)") from None
    return SummaryWriter


def open_writer(folder: Path):
    return require_tensorboard()(log_dir=str(folder))


def log_epoch(writer, epoch: int, row: dict, terms: dict, lrs: list, alpha: float, steps_before: int,
              losses: list = ()) -> None:
    """One epoch: every column of epoch_log.csv and epoch_terms.csv, then the LR, alpha and training
    objective of every optimizer step."""
    for key, value in {**row, **terms}.items():
        if key != "epoch" and value == value:  # NaN (no KD term) is left out
            writer.add_scalar(f"epoch/{key}", float(value), epoch)
    for i, lr in enumerate(lrs):
        writer.add_scalar("step/learning_rate", lr, steps_before + i + 1)
        writer.add_scalar("step/alpha", alpha, steps_before + i + 1)
    for i, loss in enumerate(losses):
        if loss == loss:
            writer.add_scalar("step/train_loss", loss, steps_before + i + 1)
    writer.flush()


def has_events(folder: Path) -> bool:
    return Path(folder).is_dir() and any(Path(folder).glob("events.out.tfevents.*"))


def backfill(writer, stage_folder, upto_epoch: Optional[int] = None) -> int:
    """Write the epochs a stage already logged to its CSVs (epoch_log, epoch_terms, schedule) into
    `writer`, as they would have been logged live; returns the number of epochs written."""
    rows = read_epoch_csv(stage_folder.epoch_log)
    terms = read_epoch_csv(stage_folder.terms, terms_columns_of(stage_folder.terms)) if stage_folder.terms.exists() else []
    steps = pd.read_csv(stage_folder.schedule) if stage_folder.schedule.exists() else None
    n = len(rows) if upto_epoch is None else min(upto_epoch, len(rows))
    for i in range(n):
        epoch = i + 1
        lrs, losses, alpha, before = [], [], float("nan"), 0
        if steps is not None and len(steps):
            mine = steps[steps["epoch"] == epoch]
            lrs, alpha = mine["lr"].tolist(), float(mine["alpha"].iloc[0]) if len(mine) else float("nan")
            losses = mine["loss"].tolist() if "loss" in mine else []
            before = int(mine["step"].min()) - 1 if len(mine) else 0
        log_epoch(writer, epoch, rows[i], terms[i] if i < len(terms) else {}, lrs, alpha, before, losses)
    return n


def log_figures(folder: Path, figures: list) -> None:
    """The report's PNGs as images (one writer for the whole run)."""
    writer = open_writer(folder)
    for png in figures:
        img = np.asarray(Image.open(png).convert("RGB"))
        writer.add_image(f"figures/{Path(png).stem}", img, dataformats="HWC")
    writer.close()
