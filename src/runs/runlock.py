"""One run folder, one writer: an exclusive lock held for as long as a process writes into it.

Training (new runs and resumes), the report and evaluate claim a run folder before they write
anything. The claim is an advisory `flock` on RUN/.run.lock, which holds the owner's pid, host,
start time and command: a second process that tries the same folder is refused in one line naming
the owner, and a lock whose owner died (even by SIGKILL) is free again at once, since the
kernel releases a dead process's flocks. Two processes started a second apart therefore cannot
both pass the "folder already holds files" check and write into one folder.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..utils.errors import UserError

LOCK_NAME = ".run.lock"
PROBE_PREFIX = ".write_test"  # the writability probe's files (check_writable): never a run's content

try:
    import fcntl
except ImportError:  # not POSIX: no lock (docs/robustness.md says so)
    fcntl = None


class RunFolderBusy(UserError):
    """Another live process holds the run folder."""


def owner(folder: Path) -> Optional[dict]:
    """What the lock file of `folder` says about its holder (pid, host, started, command), if anything."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')}: "
            f"{str(info.get('command', ''))[:120]})")


class RunLock:
    """An acquired claim on a folder; `release()` (or leaving `claim`) gives it back."""

    def __init__(self, folder: Path, fd: Optional[int]):
        self.folder, self.fd = folder, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            (self.folder / LOCK_NAME).unlink(missing_ok=True)  # unlinked while still held: no one can be waiting on it
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def acquire(folder: Path, what: str = "training") -> RunLock:
    """Claim `folder` (created if missing) for this process, or raise RunFolderBusy naming the holder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return RunLock(folder, None)
        return _acquire(folder, what)
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {folder}: {exc.strerror or exc}. "
                        f"Choose another --output-dir") from None


def _acquire(folder: Path, what: str) -> RunLock:
    path = folder / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(f"{folder} is in use by {_describe(owner(folder))}; wait for it to finish, or stop "
                                f"it, before {what} there") from None
        try:  # the holder may have released (and unlinked) it between our open and our flock: then try again
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return RunLock(folder, fd)
    raise RunFolderBusy(f"{folder}: could not claim the folder (its lock kept changing hands)")


@contextmanager
def claim(folder: Path, what: str = "training") -> Iterator[RunLock]:
    lock = acquire(folder, what)
    try:
        yield lock
    finally:
        lock.release()


def is_bookkeeping(path: Path) -> bool:
    """Files that say nothing about a run's content: the lock and stale writability probes."""
    return path.name == LOCK_NAME or path.name.startswith(PROBE_PREFIX)
