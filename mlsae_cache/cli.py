"""``mlsae-cache``: write a cache (default) or ``mlsae-cache verify DIR``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from .config import CacheConfig
from .errors import CacheError


def _build(argv: Sequence[str]) -> int:
    parser = OneLineErrorParser(prog="mlsae-cache", description="Cache per-layer residual activations of a language model. "
                                "`mlsae-cache verify DIR` re-checks a cache's checksums.")
    add_dataclass_arguments(parser, CacheConfig)
    config = config_from_args(CacheConfig, parser.parse_args(argv))
    from .runner import build_cache  # heavy imports only once the arguments are valid

    manifest = build_cache(config)
    if manifest is not None and config.progress:
        print(f"cache: {config.out} ({manifest['n_tokens']:,} tokens, {len(manifest['layers'])} layers, d_model {manifest['d_model']}, {manifest['n_shards']} shards)")
    return 0


def _verify(argv: Sequence[str]) -> int:
    parser = OneLineErrorParser(prog="mlsae-cache verify", description="Re-check every shard checksum of a cache.")
    parser.add_argument("cache", help="cache directory")
    args = parser.parse_args(argv)
    from .reader import open_cache, verify_shards

    cache = open_cache(args.cache)
    damaged = verify_shards(cache.root, cache.manifest, progress=True)
    if damaged:
        raise CacheError(f"{len(damaged)} damaged shard(s) in {Path(args.cache)}: {', '.join(damaged)}; delete them (and their .json) and rerun the cache command to rewrite them")
    print(f"ok: {len(cache.manifest['shards'])} shards, {cache.n_tokens:,} tokens verified in {args.cache}")
    return 0


def _entry(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _verify(argv[1:])
    return _build(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_entry, argv)


if __name__ == "__main__":
    sys.exit(main())
