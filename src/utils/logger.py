"""Console output and the per-epoch CSV log.

`EpochLogger` writes one row per epoch with exactly `REQUIRED_COLUMNS`, in that order. Every
write checks count and order, every row is flushed and fsync'ed at once, and an existing file
is only appended to when its header is identical.
"""
from __future__ import annotations

import csv
import logging
from contextlib import contextmanager
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping

from .errors import UserError, write_failure
from .signals import protected

REQUIRED_COLUMNS = [
    'epoch',
    'train_loss', 'train_accuracy', 'train_precision', 'train_recall', 'train_f1_score',
    'val_loss', 'val_accuracy', 'val_precision', 'val_recall', 'val_f1_score',
    'learning_rate', 'epoch_time_sec', 'gpu_memory_mb'
]

_CONSOLE_NAME = "distill"
_VERBOSE = {"on": False}


def set_verbose(on: bool) -> None:
    """--verbose: the guards print their full spec messages (frozen teacher, cleanup, NaN diagnosis)."""
    _VERBOSE["on"] = bool(on)


def is_verbose() -> bool:
    return _VERBOSE["on"]


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the moment of the write (a notebook's, a test's
    captured one, a redirect), not the one that existed when the console was first configured."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):  # logging.StreamHandler.__init__ assigns it; the property reads sys.stdout
        pass


def get_console() -> logging.Logger:
    """The project's console logger: plain messages on stdout, configured once. Other handlers
    (a test runner's log capture, a user's file handler) may sit beside ours; only ours is counted."""
    logger = logging.getLogger(_CONSOLE_NAME)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class SchemaError(UserError, ValueError):
    """A CSV row or header does not match REQUIRED_COLUMNS."""


TERMS_TAIL = ['alpha', 'lr_first', 'lr_last', 'steps', 'train_seconds', 'eval_seconds', 'compile_seconds', 'img_per_s']


def terms_columns(terms=("ce", "kd")) -> list:
    """epoch_terms.csv, beside each epoch_log.csv: a `train_<term>` column for every term the
    stage's method declares (the kd method: train_loss is (1 - alpha) * train_ce + alpha *
    train_kd; train_kd is T^2 * KL, empty without a teacher), alpha, the LR of the epoch's first and
    last optimizer step, and the time split (compilation apart from training)."""
    return ['epoch', *[f'train_{t}' for t in terms], *TERMS_TAIL]


TERMS_COLUMNS = terms_columns()


def terms_columns_of(path: str | os.PathLike) -> list:
    """The columns of an existing epoch_terms.csv (its method's terms), checked against the schema."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    terms = tuple(c[len('train_'):] for c in header[1:len(header) - len(TERMS_TAIL)])
    columns = terms_columns(terms)
    check_header(header, path, columns)
    return columns


class StepLogger:
    """schedule.csv: the LR and alpha each optimizer step used and the objective it computed
    (epoch, step from 1; the loss of rank 0's share of the batch), appended per epoch; on resume,
    rows of epochs after `resume_from_epoch` are dropped first."""
    columns = ['epoch', 'step', 'lr', 'alpha', 'loss']

    def __init__(self, path: str | os.PathLike, resume_from_epoch: int | None = None):
        self.path = Path(path)
        self.step = 0
        rows = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                reader = csv.reader(f)
                check_header(next(reader, []), self.path, self.columns)
                rows = [r for r in reader if resume_from_epoch is None or int(r[0]) <= resume_from_epoch]
        if rows:
            self.step = int(rows[-1][1])
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with protected(), _disk_errors(self.path):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([self.columns, *rows])
            os.replace(tmp, self.path)

    def log_epoch(self, epoch: int, lrs: list, alpha: float, losses: list) -> None:
        lines = []
        for lr, loss in zip(lrs, losses):
            self.step += 1
            lines.append([epoch, self.step, f"{lr:.10g}", _fmt(alpha), _fmt(loss)])
        with protected(), _disk_errors(self.path):
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerows(lines)
                f.flush()
                os.fsync(f.fileno())


def check_header(header: list[str], path: str | os.PathLike = "<csv>", columns: list[str] = REQUIRED_COLUMNS) -> None:
    """Raise SchemaError naming the first difference between `header` and `columns`."""
    if header == columns:
        return
    missing = [c for c in columns if c not in header]
    extra = [c for c in header if c not in columns]
    if missing or extra:
        detail = f"missing {missing}" if missing else ""
        if extra:
            detail += ("; " if detail else "") + f"unexpected {extra}"
    else:
        detail = f"columns out of order: got {header}"
    name = "REQUIRED_COLUMNS" if columns is REQUIRED_COLUMNS else "its schema"
    raise SchemaError(f"{path}: header does not match {name} ({detail})")


def read_epoch_csv(path: str | os.PathLike, columns: list[str] = REQUIRED_COLUMNS) -> list[dict[str, float]]:
    """Read and schema-check an epoch log; values parsed as floats (empty = NaN), epochs checked 1..N."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise SchemaError(f"{path}: empty file, no header") from None
        check_header(header, path, columns)
        rows = []
        for line_no, values in enumerate(reader, start=2):
            if len(values) != len(columns):
                raise SchemaError(f"{path}:{line_no}: {len(values)} values, expected {len(columns)}")
            try:
                rows.append({k: float(v) if v != "" else float("nan") for k, v in zip(columns, values)})
            except ValueError as exc:
                raise SchemaError(f"{path}:{line_no}: non-numeric value ({exc})") from None
    epochs = [int(r['epoch']) for r in rows]
    if epochs != list(range(1, len(rows) + 1)):
        raise SchemaError(f"{path}: epochs must run 1..N with no gap or repeat, got {epochs}")
    return rows


class EpochLogger:
    """Append-only per-epoch CSV with a hard schema.

    Args:
        path: CSV file. Created with the header if absent; appended to if its header matches.
        resume_from_epoch: when appending, rows with epoch > this are dropped first (an epoch
            that was logged but whose checkpoint was not saved is re-run, never duplicated).
    """

    def __init__(self, path: str | os.PathLike, resume_from_epoch: int | None = None,
                 columns: list[str] = REQUIRED_COLUMNS):
        self.path = Path(path)
        self.columns = columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            rows = read_epoch_csv(self.path, columns)  # raises SchemaError on a differing header
            if resume_from_epoch is not None and len(rows) > resume_from_epoch:
                self._rewrite(rows[:resume_from_epoch])
        else:
            self._rewrite([])

    def _rewrite(self, rows: Iterable[Mapping[str, float]]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with protected(), _disk_errors(self.path):
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(self.columns)
                for r in rows:
                    writer.writerow([_fmt(r[c]) for c in self.columns])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def log(self, row: Mapping[str, float]) -> None:
        """Append one epoch. `row` must have exactly the logger's columns (REQUIRED_COLUMNS) as keys, in order."""
        if len(row) != len(self.columns):
            raise SchemaError(f"Column count mismatch: got {len(row)}, expected {len(self.columns)}")
        if list(row.keys()) != self.columns:
            raise SchemaError(f"Column order mismatch: got {list(row.keys())}, expected {self.columns}")
        line = [_fmt(row[c]) for c in self.columns]
        with protected(), _disk_errors(self.path):
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow(line)
                f.flush()
                os.fsync(f.fileno())

    def rows(self) -> list[dict[str, float]]:
        return read_epoch_csv(self.path, self.columns)


@contextmanager
def _disk_errors(path: Path):
    """A full disk or a permission problem while logging: one line naming the file and the fix."""
    try:
        yield
    except OSError as exc:
        raise UserError(write_failure(path, exc.strerror or str(exc))) from None


def _fmt(value: float) -> str:
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return ""
    if value.is_integer() and not math.isinf(value):
        return str(int(value))
    return f"{value:.10g}"
