"""The one exception type users see: its message is a single line naming the problem and the fix."""


class MlsaeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits non-zero, without a traceback."""


class CacheError(MlsaeError):
    """A cache directory is missing, foreign, incomplete or damaged."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message cut to its first line (at most ``limit`` characters), or its type's name when it
    has none: what a one-line error quotes of a library's error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def require_positive(values: dict) -> None:
    """Raise for the first ``{flag: value}`` whose value is not > 0; None (an unset optional) passes."""
    for flag, value in values.items():
        if value is not None and not value > 0:
            raise MlsaeError(f"{flag} must be positive, got {value}")
