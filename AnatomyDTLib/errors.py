"""User-facing error types.

Every error a user can trigger by giving us bad input derives from :class:`AnatomyDTError`.
Its message must say what was wrong *and* what to do about it, because the CLI and the
Slicer module show it to the user verbatim (no traceback).
"""


class AnatomyDTError(Exception):
    """Base class for errors caused by user input (files, plans, parameters)."""


class InputError(AnatomyDTError, ValueError):
    """An input volume, segmentation or array is unusable (missing, wrong shape, wrong labels, NaN...)."""


class PlanError(AnatomyDTError, ValueError):
    """A treatment plan does not validate against the plan schema."""


class ParameterError(AnatomyDTError, ValueError):
    """A model or solver parameter is out of its valid range (negative diffusion, dt <= 0, ...)."""


class OutputExistsError(AnatomyDTError, FileExistsError):
    """An output path exists and overwriting was not requested."""


class Cancelled(AnatomyDTError):
    """The user cancelled a running prediction; nothing was written and no scene node was created."""
