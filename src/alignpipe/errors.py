"""Typed errors of the library.

Library code raises these with messages that name the fix; the CLI is the one place that turns
them into a one-line message and an exit status. Anything else is a bug and propagates with its
traceback, so a failed KFP task shows its cause.
"""


class AlignpipeError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(AlignpipeError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class DataError(AlignpipeError):
    """Input data cannot be read or does not have the expected shape."""


class StorageError(AlignpipeError):
    """A file or object could not be read or written (local path or ``s3://`` URI)."""


class ModelError(AlignpipeError):
    """A model reference cannot be resolved or loaded safely."""


class TrackingError(AlignpipeError):
    """The tracking backend (MLflow) cannot be reached or refused a request."""
