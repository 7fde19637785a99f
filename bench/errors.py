"""The one exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class BenchError(Exception):
    """A user-facing error: the message names the file, key or value and what was expected."""
