"""Every error adadiff raises on purpose.

A message says what was received, what was expected and what to do. The CLI prints the message
of an ``AdadiffError`` as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class AdadiffError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, wrong setup)."""

    exit_code = 2


class ConfigError(AdadiffError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelFolderError(AdadiffError):
    """A model folder is missing a file or holds weights of the wrong shape."""


class InputImageError(AdadiffError):
    """The input image cannot be read or is too large."""


class OutputPathError(AdadiffError):
    """The output cannot be written where the user asked."""


class BackendUnavailableError(AdadiffError):
    """A backend's library or device is missing."""


class EngineMismatchError(AdadiffError):
    """Exported files or engines do not match the model, library version or device."""


class ShapeError(AdadiffError, ValueError):
    """An array given to a component does not match its spec."""


class NumericsError(AdadiffError):
    """A model produced NaN or infinite values (fp16 overflow, damaged weights)."""


class WorkerStoppedError(AdadiffError):
    """An upscale-many worker whose engine stopped (a lost device) was sent an image it never
    tried: the job sends that image to another worker."""


def shell_arg(value: object) -> str:
    """``value`` quoted for a shell, for the commands a message tells the user to run: a path
    with a space pasted unquoted would split into two arguments."""
    import shlex

    return shlex.quote(str(value))
