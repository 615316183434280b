"""``mlsae-cache``: write a cache (default) or ``mlsae-cache verify DIR``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from .config import CacheConfig
from . import shard_format as sf
from .errors import CacheError
from .path_kinds import require_cache_path


def _build(argv: Sequence[str]) -> int:
    parser = OneLineErrorParser(prog="mlsae-cache", description="Cache per-layer residual activations of a language model. "
                                "`mlsae-cache verify DIR` re-checks a cache's checksums.")
    add_dataclass_arguments(parser, CacheConfig)
    config = config_from_args(CacheConfig, parser.parse_args(argv))
    from .runner import build_cache  # heavy imports only once the arguments are valid

    manifest = build_cache(config)
    if manifest is not None and config.progress:
        print(f"cache: {config.out} ({manifest['n_tokens']:,} tokens, {len(manifest['layers'])} layers, d_model {manifest['d_model']}, {manifest['n_shards']} shards)")
    if manifest is not None and manifest.get("tokens_short"):
        print(f"warning: the dataset ran out after {manifest['n_model_tokens']:,} of the {config.tokens:,} tokens asked for "
              f"(--tokens); the cache holds what there was and its manifest records tokens_short", file=sys.stderr)  # fmt: skip
    return 0


def _verify(argv: Sequence[str]) -> int:
    parser = OneLineErrorParser(prog="mlsae-cache verify", description="Re-check every shard checksum of a cache.")
    parser.add_argument("cache", help="cache directory")
    args = parser.parse_args(argv)
    from .reader import open_cache, verify_shards

    require_cache_path(args.cache, "mlsae-cache verify")
    cache = open_cache(args.cache)
    damaged = verify_shards(cache.root, cache.manifest, progress=True)
    if damaged:
        raise CacheError(f"{len(damaged)} damaged shard(s) in {Path(args.cache)}: {', '.join(damaged)}; delete them (and their .json) and rerun the cache command to rewrite them")
    metadata = sf.damaged_metadata(cache.root, cache.manifest)
    if metadata:
        raise CacheError(
            f"{', '.join(metadata)} in {Path(args.cache)} differ from the checksums in its manifest.json; delete the "
            "damaged sidecars (shards/*.json) and rerun the cache command to rewrite them, or rebuild the cache if config.json is damaged"
        )
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
