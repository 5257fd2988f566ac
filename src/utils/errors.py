"""Exceptions that mean "the user gave us something we cannot use".

Entry points turn a UserError into a one-line message and exit code 2; anything
else is a bug or an environment failure and keeps its traceback under --debug.
"""


class UserError(Exception):
    """Bad input (config, data, checkpoint, path). The message names the problem and the fix."""


class ConfigError(UserError):
    """A config file or override is invalid."""


class DataError(UserError):
    """A dataset is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe or does not match the model it is loaded into."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; carries where it happened."""

    def __init__(self, message: str, step: int, value: float, what: str = "loss"):
        super().__init__(message)
        self.step = step
        self.value = value
        self.what = what  # "loss", or "gradients" (a finite loss whose gradients were not)
