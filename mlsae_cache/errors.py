"""The one exception type users see: its message is a single line naming the problem and the fix."""


class MlsaeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits non-zero, without a traceback."""


class CacheError(MlsaeError):
    """A cache directory is missing, foreign, incomplete or damaged."""
