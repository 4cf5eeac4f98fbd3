"""User-facing errors: the CLI prints them as one line naming the problem and exits with code 2."""


class SeeklingError(Exception):
    """Bad input (a config, a file, a flag, a request) explained in words, never a deep traceback."""


class ConfigError(SeeklingError, ValueError):
    """A configuration that cannot describe a working model."""


class CheckpointError(SeeklingError):
    """A checkpoint directory with missing, extra or mismatched tensors, or of another model type."""


class DataError(SeeklingError, ValueError):
    """A malformed data file: the message names the file and the line."""


def check_choice(value, choices, what: str, error: type[SeeklingError] = ConfigError):
    """`value` when it is one of `choices`, else `error`: "unknown WHAT 'value'; known: a, b"."""
    if value not in choices:
        raise error(f"unknown {what} {value!r}; known: {', '.join(map(str, choices))}")
    return value
