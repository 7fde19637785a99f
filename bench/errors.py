"""The one exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class BenchError(Exception):
    """A user-facing error: the message names the file, key or value and what was expected."""


def reason(e: BaseException) -> str:
    """The first sentence of a library's exception, for a one-line message (torch's run to paragraphs)."""
    text = str(e).strip().split("\n")[0].split(". ")[0].strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
