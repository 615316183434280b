"""The options of ``mlsae-train``. Each field's docstring is its ``--help``."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Literal

from mlsae_cache.errors import MlsaeError, require_positive

from .families import FAMILIES, ArchName
from .screened_topk import ScreenChoice


@dataclass
class TrainConfig:
    shards: list[str]
    """Cache directories written by mlsae-cache; several are read as one dataset (same model, width and layers)."""

    out: str
    """Run directory: config.json, checkpoint.safetensors, sae.safetensors and metrics.jsonl go here."""

    arch: ArchName = "mlsae"
    """Dictionary family: 'mlsae' one SAE shared by every layer's vectors (the paper), 'per-layer' one SAE per
    layer trained in the same pass, 'crosscoder' one latent vector per token read from and written to all
    layers (SPEC 9)."""

    expansion_factor: int = 64
    """R: the dictionary has R * d_model latents (the per-layer suite: each layer's SAE)."""

    k: int = 32
    """Active latents per vector (TopK); the crosscoder's per token."""

    batch_tokens: int = 131072
    """Tokens per optimizer step (all selected layers of each), over all processes; the paper uses 131072."""

    micro_batch_tokens: int | None = None
    """Tokens per forward/backward pass on each process (default: its whole share of the batch); lower it if a
    step does not fit in memory: the step is the same, up to float rounding."""

    lr: float = 1e-4
    """Adam learning rate (constant)."""

    max_tokens: int | None = None
    """Stop after this many training tokens (default: --epochs passes over the cache)."""

    epochs: int = 1
    """Passes over the cache, each in a fresh random order."""

    layers: list[int] | None = None
    """Model block indices to train on, a subset of the cache's (default: all); one layer trains the single-layer baseline."""

    seed: int = 0
    """Seeds the initialization and the order of the data."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks cuda when available. CUDA uses bfloat16 matmuls, CPU float32."""

    screen: ScreenChoice = "off"
    """Encoder top-k kernel: 'on' picks the latents with a bfloat16 matmul and recomputes the candidates in
    float32 (the float32 kernel's latents, values and gradients; steps ~2x faster on AMX CPUs), 'off' (the
    default) the float32 kernel (bfloat16 matmul on CUDA), 'auto' on for CPUs with AMX or AVX-512 BF16."""

    resume: bool = False
    """Continue the run in --out from its last checkpoint (same settings required)."""

    dead_tokens: int = 10_000_000
    """A latent is dead (and trained by AuxK) after this many training tokens without activating."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""

    save_every_tokens: int = 20_000_000
    """Write a checkpoint after every this many training tokens (and at the end)."""

    verify: bool = True
    """Check every shard's checksum (BLAKE3, or sha256 in older caches) before training (--no-verify skips this pass over the whole cache)."""

    progress: bool = True
    """Show a progress bar."""

    tensorboard: bool = False
    """Also log metrics to TensorBoard in the run directory (needs the tensorboard package)."""

    wandb: bool = False
    """Also log metrics to Weights & Biases (needs the wandb package and a login or WANDB_MODE=offline)."""

    def check(self) -> None:
        """Reject settings that cannot work, before anything is read or written."""
        if not self.shards:
            raise MlsaeError("no --shards given; name at least one cache directory written by mlsae-cache")
        require_positive({
            "--expansion-factor": self.expansion_factor,
            "-k": self.k,
            "--batch-tokens": self.batch_tokens,
            "--lr": self.lr,
            "--epochs": self.epochs,
            "--dead-tokens": self.dead_tokens,
            "--save-every-tokens": self.save_every_tokens,
            "--max-tokens": self.max_tokens,
            "--micro-batch-tokens": self.micro_batch_tokens,
        })  # fmt: skip
        if self.auxk_alpha < 0:
            raise MlsaeError(f"--auxk-alpha must be >= 0, got {self.auxk_alpha}")
        if not math.isfinite(self.lr):  # inf passes "positive", then trains NaN weights
            raise MlsaeError(f"--lr must be a finite number, got {self.lr}; the paper uses 1e-4")
        if not math.isfinite(self.auxk_alpha):
            raise MlsaeError(f"--auxk-alpha must be a finite number, got {self.auxk_alpha}; the paper uses 1/32")
        if self.arch not in FAMILIES:
            raise MlsaeError(f"--arch {self.arch!r} is not a dictionary family; choose one of {', '.join(FAMILIES)}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise MlsaeError(f"--layers {' '.join(map(str, self.layers))} names a layer twice; name each once")

    def to_dict(self) -> dict:
        return asdict(self)


# Settings that change how a run is watched or where it runs, not what it computes: --resume may change them.
RESUMABLE_CHANGES = frozenset(
    {"resume", "device", "screen", "micro_batch_tokens", "verify", "progress", "tensorboard", "wandb", "save_every_tokens",
     "shards", "out"}
)


def recorded_setting(saved_config: dict, name: str):
    """A run's recorded setting; one the run does not record was added to mlsae-train after the run was
    started, which then trained as its default does (e.g. ``arch``: runs before the families are MLSAEs)."""
    if name in saved_config:
        return saved_config[name]
    default = {field.name: field.default for field in fields(TrainConfig)}.get(name, MISSING)
    return None if default is MISSING else default
