"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""


class InstaflowError(Exception):
    """A mistake the user can fix (bad config, missing file, unreachable store, wrong keys, bad data)."""


class ConfigError(InstaflowError):
    """The configuration is invalid: the message names the offending key."""


class StorageError(InstaflowError):
    """The store cannot be reached, authenticated against, or holds something unexpected."""


class DataError(InstaflowError):
    """Input data is unreadable or does not match what a stage expects."""


class TrainingError(InstaflowError):
    """Training cannot go on (non-finite loss, mismatched inputs); the message says where to resume."""
