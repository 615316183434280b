"""``mlsae-train``: train a multi-layer SAE, a per-layer suite or a crosscoder on cached activations (run
under torchrun for several GPUs)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mlsae_cache.clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from mlsae_cache.path_kinds import require_cache_path

from .config import TrainConfig


def _train(argv: Sequence[str] | None) -> int:
    parser = OneLineErrorParser(
        prog="mlsae-train",
        description="Train a multi-layer TopK sparse autoencoder (or, with --arch, a TopK SAE per layer or an acausal "
        "TopK crosscoder) on activation caches written by mlsae-cache. "
        "Writes RUN/sae.safetensors (load it with mlsae_train.load_sae), checkpoints and metrics.jsonl. "
        "For several GPUs: torchrun --nproc-per-node N -m mlsae_train.cli ...",
    )
    add_dataclass_arguments(parser, TrainConfig, short={"k": "-k"})
    config = config_from_args(TrainConfig, parser.parse_args(argv))
    for cache in config.shards:
        require_cache_path(cache, "--shards")
    from .trainer import train  # torch is imported only once the arguments parse

    train(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_train, argv, resumes="the last checkpoint is kept; run the same command with --resume to continue from it")


if __name__ == "__main__":
    sys.exit(main())
