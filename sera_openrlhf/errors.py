"""User-facing errors. Each says what is wrong and where (file, line, key or flag) and how to fix it.

The CLI prints these as one clean message (no traceback); anything else is a bug and keeps its traceback.
"""


class SeraError(Exception):
    """Base class for errors caused by the user's input or configuration."""


class ConfigError(SeraError, ValueError):
    """A flag or parameter is out of range or inconsistent. The message names the flag."""


class DataError(SeraError, ValueError):
    """Input data is malformed. The message names the file, the line (1-based) and the key."""


class SelectionError(SeraError, ValueError):
    """A selection or bootstrapping step left nothing to train on. The message names the flag to relax."""


class NonFiniteError(SeraError, FloatingPointError):
    """A loss or log-prob became NaN/inf. The step was not applied; the run state on disk is resumable."""


class StateError(SeraError, RuntimeError):
    """A run directory, cache or state file is locked, corrupted or belongs to a different configuration."""
