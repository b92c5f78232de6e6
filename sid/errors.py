"""The one exception users see: a problem with their input, phrased as what to do about it; and how another
exception is quoted in its one line."""


class SidError(Exception):
    """Bad input (config, path, checkpoint, teacher) or an aborted run, with a message that says what to do.

    Entry points print only ``str(error)`` (one line), never a traceback.
    """


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text, at most ``limit`` characters; its type's name where it has no text
    (``EOFError()``, ``KeyError()``)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def described(e: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an exception, or ``Type`` alone where it has no text."""
    line = first_line(e, limit)
    return type(e).__name__ if line == type(e).__name__ else f"{type(e).__name__}: {line}"
