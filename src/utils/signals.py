"""Ctrl-C and SIGTERM that stop a run at once, but never inside a training epoch's step or a file write.

The entry point calls `install_handlers(StopException)`. Outside a protected section (planning,
the final evaluation, the report) a signal raises at once; inside one (the epoch loop, an atomic
checkpoint or CSV write) it is only recorded: the training loop polls `stop_requested()` after
each step, and leaving the outermost section raises, so the files on disk are always whole.
A second Ctrl-C ends the process at once (the first one restores the default SIGINT action, which
does not wait for a long C++ operation to return to Python).
"""
from __future__ import annotations

import ctypes
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Optional

_STATE = {"depth": 0, "signum": None, "exception": None}


def _raise_if_stopped() -> None:
    if _STATE["signum"] is not None and _STATE["exception"] is not None:
        raise _STATE["exception"](f"stopped by signal {_STATE['signum']}")


@contextmanager
def protected():
    """A section a signal must not cut; a stop recorded inside is raised when the outermost one ends."""
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
    if _STATE["depth"] == 0:
        _raise_if_stopped()


def stop_requested() -> Optional[int]:
    """The signal number received, or None."""
    return _STATE["signum"]


def install_handlers(exception: Callable[[str], BaseException]) -> dict:
    """SIGINT / SIGTERM handlers raising `exception` (at once, or when the protected section ends).
    Returns the previous handlers for restore_handlers."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _STATE.update(signum=None, depth=0, exception=exception)

    def handler(signum, frame):
        if _STATE["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C while Python runs: abort now
        _STATE["signum"] = signum
        # a second Ctrl-C must not wait for a long C++ operation (a whole backward pass on a CPU) to
        # return to Python: the default action ends the process at once; every file on disk stays
        # whole (atomic writes), the last checkpoint is what --resume continues from
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        where = "at the next micro-batch, saving the epoch so far" if _STATE["depth"] else "now"
        print(f"\n⏸  {signal.Signals(signum).name} received: stopping {where} (Ctrl-C again ends the process at "
              f"once; the last checkpoint is kept)", file=sys.stderr, flush=True)
        if _STATE["depth"] == 0:
            _raise_if_stopped()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return previous


def restore_handlers(previous: dict) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)
    _STATE.update(signum=None, depth=0, exception=None)


def die_with_parent() -> None:
    """In a child process (the torchrun launcher, a study's job): SIGTERM when the process that
    started it dies (even by SIGKILL), so it saves and stops instead of training on, orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: signals reach it through this process only
        pass
