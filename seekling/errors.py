"""User-facing errors: the CLI prints them as one line naming the problem and exits with code 2."""


class SeeklingError(Exception):
    """Bad input (a config, a file, a flag, a request) explained in words, never a deep traceback."""


class ConfigError(SeeklingError, ValueError):
    """A configuration that cannot describe a working model."""


class CheckpointError(SeeklingError):
    """A checkpoint directory with missing, extra or mismatched tensors, or of another model type."""


class DataError(SeeklingError, ValueError):
    """A malformed data file: the message names the file and the line."""
