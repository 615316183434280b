"""Data parallelism under torchrun for training: who am I, which device, and sums across processes.

One implementation serves both stages: it lives in ``mlsae_cache.distributed`` (the cache's ranks
share it, and the cache never imports the trainer) and is re-exported here under the names training
code imports.
"""

from mlsae_cache.distributed import Distributed, resolve_device

__all__ = ["Distributed", "resolve_device"]
