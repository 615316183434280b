"""Stage 1: run a language model over text and cache per-layer residual activations on disk."""

from .errors import CacheError, MlsaeError
from .reader import Cache, open_cache
from .writer import write_array_cache

__all__ = ["Cache", "CacheError", "MlsaeError", "open_cache", "write_array_cache"]
