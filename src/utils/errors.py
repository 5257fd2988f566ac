"""Exceptions that mean "the user gave us something we cannot use".

Entry points turn a UserError into a one-line message and exit code 2; anything
else is a bug or an environment failure and keeps its traceback under --debug.
"""
from pathlib import Path


class UserError(Exception):
    """Bad input (config, data, checkpoint, path). The message names the problem and the fix."""


class ConfigError(UserError):
    """A config file or override is invalid."""


class DataError(UserError):
    """A dataset is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe or does not match the model it is loaded into."""


def write_failure(path, reason: str, kept: str = "") -> str:
    """The one line for a file a run could not write: a folder deleted under the run (clean.sh or
    by hand) is said to be gone, with nothing to resume; anything else is a disk or permission
    problem the user can fix and then resume."""
    folder = Path(path).parent
    if not folder.exists():
        return (f"could not write {path}: its folder {folder} was deleted while this run was writing into it "
                f"(by clean.sh or by hand); what it held is gone, so there is nothing to resume: start a new run")
    return f"could not write {path}: {reason}{kept}. Free disk space or choose another --output-dir, then --resume"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; carries where it happened."""

    def __init__(self, message: str, step: int, value: float, what: str = "loss"):
        super().__init__(message)
        self.step = step
        self.value = value
        self.what = what  # "loss", or "gradients" (a finite loss whose gradients were not)
