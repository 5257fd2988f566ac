"""A search's trial as seen from inside its stage: each epoch's validation accuracy goes to the
trial (Optuna), which may prune it.

The search (src/experiment/search.py) writes RUN/trial.json into a trial's run folder before its
jobs start: the storage (Optuna's journal file, or a database URL), the study and the trial. The
stage job, in whatever process or node runs it, reads it back here, so that a trial needs nothing
but its run folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..utils.errors import ConfigError

TRIAL_FILE = "trial.json"
SEARCH_DIR = "tune"           # RUN/tune: the search's trials, its upstream and its journal
JOURNAL = "study.journal"     # Optuna's journal file in RUN/tune, the default storage
# median pruning once 4 trials finished, from epoch 2 on: steps are epochs (1, 2, ...), and optuna prunes
# at a step not below n_warmup_steps, so 2 keeps every trial's first epoch (the noisiest) out of it
PRUNER = dict(n_startup_trials=4, n_warmup_steps=2)


def open_storage(spec: str):
    """Optuna storage: a database URL (postgresql://, mysql://, sqlite://) or a journal file path
    (several processes on one machine, and nodes sharing the run folder's filesystem)."""
    import optuna  # the search's engine, only where a search runs
    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec, heartbeat_interval=None)
        except Exception as exc:  # noqa: BLE001 (driver missing, host unreachable, bad credentials: one message)
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ConfigError(f"--storage {spec}: cannot open it ({reason})") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage  # the search's engine, only where one runs
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(spec)))


def journal_of(spec: str, run_dirs) -> Optional[str]:
    """The storage a finished search recorded, for reading it back: a database URL as it is; a
    journal file where it was written, else the journal in RUN/tune of one of `run_dirs` (the run
    folder was moved or copied since); None when there is none (nothing is created)."""
    if "://" in spec:
        return spec
    for path in [Path(spec)] + [Path(d) / SEARCH_DIR / JOURNAL for d in run_dirs]:
        if path.is_file():
            return str(path)
    return None


def pruner():
    import optuna  # the search's engine, only where a search runs
    return optuna.pruners.MedianPruner(**PRUNER)


def trial_reporter(run_dir: Path) -> Optional[Callable[[int, float], bool]]:
    """For a trial's run folder, `report(epoch, val_accuracy) -> prune?`; None for any other run."""
    path = Path(run_dir) / TRIAL_FILE
    if not path.is_file():
        return None
    import optuna  # the search's engine, only where a search runs
    info = json.loads(path.read_text())
    study = optuna.load_study(study_name=info["study"], storage=open_storage(info["storage"]), pruner=pruner())
    trial = optuna.trial.Trial(study, info["trial_id"])

    def report(epoch: int, val_accuracy: float) -> bool:
        trial.report(val_accuracy, step=epoch)
        return trial.should_prune()
    return report
