"""The options of ``mlsae-analyse``. Each field's docstring is its ``--help``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from mlsae_cache.errors import MlsaeError, require_positive
from mlsae_train.screened_topk import ScreenChoice

DEFAULT_PROMPT = "When John and Mary went to the store, John gave"


@dataclass
class AnalyseConfig:
    run: str
    """Run directory written by mlsae-train (or its sae.safetensors)."""

    shards: str
    """Held-out cache directory written by mlsae-cache for the same model, layers and width (and lens)."""

    out: str
    """Output directory; it must not exist yet (it is written in a temporary sibling and renamed at the end)."""

    model: str | None = None
    """Language model (hub id or local directory) for delta CE, KL and the single-prompt heatmap (default: the cache's)."""

    prompt: str = DEFAULT_PROMPT
    """Prompt of the single-prompt heatmap (paper fig. 3)."""

    max_tokens: int | None = None
    """Analyse only the first N tokens of the cache (default: all)."""

    downstream_sequences: int | None = None
    """Splice at most this many sequences for delta CE and KL (default: every sequence of the analysed tokens)."""

    downstream: bool = True
    """Load the language model for delta CE, KL and the single-prompt heatmap (--no-downstream skips them)."""

    batch_tokens: int = 4096
    """Tokens encoded per batch."""

    lm_batch_size: int = 4
    """Sequences per language-model forward pass when splicing."""

    n_examples: int = 10
    """Top activating (token, layer) examples kept per latent in examples.parquet."""

    context_tokens: int = 4
    """Tokens of context on each side of an example."""

    mmcs_chunk: int = 4096
    """Decoder rows per block when computing MMCS (memory: chunk x n_latents floats)."""

    device: str = "cpu"
    """Device for the SAE and the language model (cpu or cuda)."""

    screen: ScreenChoice = "auto"
    """Top-k kernel of the encode pass and the decoder-neighbour search: 'on' picks the candidates with a
    bfloat16 matmul and recomputes them in float32 (the same latents and values as float32, ~2x faster on
    AMX CPUs and GPUs), 'off' uses float32 throughout, 'auto' screens where bfloat16 matmuls are fast."""

    progress: bool = True
    """Show progress bars."""

    allow_unfinished: bool = False
    """Analyse a run stopped before its last training step (killed, or its disk filled); summary.json records how far it got."""

    verify: bool = True
    """Check the checksum of every cache shard read before encoding (--no-verify skips this pass over the shards)."""

    def check(self) -> None:
        """Reject settings that cannot work, before anything is read or written."""
        require_positive({
            "--batch-tokens": self.batch_tokens,
            "--lm-batch-size": self.lm_batch_size,
            "--n-examples": self.n_examples,
            "--mmcs-chunk": self.mmcs_chunk,
            "--max-tokens": self.max_tokens,
            "--downstream-sequences": self.downstream_sequences,
        })  # fmt: skip
        choices = get_args(ScreenChoice)
        if self.screen not in choices:
            raise MlsaeError(f"--screen must be one of {', '.join(choices)}, got {self.screen!r}")
        if self.context_tokens < 0:
            raise MlsaeError(f"--context-tokens must be >= 0, got {self.context_tokens}")
        self._check_device()

    def _check_device(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise MlsaeError(f"unknown --device {self.device}; use cpu or cuda (or cuda:N)")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise MlsaeError(f"--device {self.device} was asked for but no CUDA GPU is visible; use --device cpu")
            index, visible = int(self.device.partition(":")[2] or 0), torch.cuda.device_count()
            if index >= visible:
                raise MlsaeError(f"--device {self.device}: only {visible} CUDA GPU(s) are visible; use cuda:0 .. cuda:{visible - 1}")
