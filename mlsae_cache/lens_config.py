"""The options of ``mlsae-lens train`` and ``mlsae-lens eval`` (their field docstrings are the CLI help)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MlsaeError


@dataclass(kw_only=True)
class LensDataOptions:
    """What both subcommands read: a model and text cut into sequences."""

    model: str
    """Model: pythia-70m ... pythia-12b (and -deduped), any Hugging Face hub id, or a local directory."""

    dataset: str = "monology/pile-uncopyrighted"
    """Text: a hub dataset (streamed), or local .txt/.jsonl/.parquet files or a folder of them."""

    seq_len: int = 512
    """Tokens per sequence: texts are joined with EOS and cut into sequences of this length."""

    batch_size: int = 8
    """Sequences per forward pass (and per optimizer step when training)."""

    split: str = "train"
    """Dataset split (hub datasets)."""

    text_column: str = "text"
    """Column holding the text (hub datasets, .jsonl and .parquet files)."""

    revision: str | None = None
    """Model revision on the hub (branch, tag or commit)."""

    tokenizer: str | None = None
    """Tokenizer to use instead of the model's own (hub id or local directory)."""

    device: str = "auto"
    """cpu, cuda or auto (cuda when a GPU is visible)."""

    progress: bool = True
    """Show a progress bar and the per-layer table."""

    def check(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1:
            raise MlsaeError("--seq-len must be at least 2 and --batch-size at least 1")


@dataclass(kw_only=True)
class LensTrainConfig(LensDataOptions):
    out: str
    """Lens directory to write (config.json + params.pt + training.json); an unfinished training there is resumed."""

    tokens: int = 65_536
    """Training tokens (rounded up to whole sequences); the steps draw batches from them, epoch after epoch."""

    eval_tokens: int = 8_192
    """Held-out tokens (the sequences after the training ones) on which the KL of the identity and the trained lens is measured."""

    steps: int = 250
    """Optimizer steps of --batch-size sequences each."""

    lr: float = 1e-3
    """Adam learning rate (after a linear warmup; decays linearly to zero at the last step)."""

    warmup_steps: int | None = None
    """Steps of linear learning-rate warmup (default: a tenth of --steps)."""

    seed: int = 0
    """Seed of the order in which training sequences are drawn."""

    checkpoint_every: int = 25
    """Save a resumable checkpoint every N steps."""

    overwrite: bool = False
    """Replace another lens (or another unfinished training) found in --out."""

    def check(self) -> None:
        super().check()
        if self.tokens < 1 or self.eval_tokens < 1 or self.steps < 1 or self.checkpoint_every < 1:
            raise MlsaeError("--tokens, --eval-tokens, --steps and --checkpoint-every must be positive")
        if not self.lr > 0:
            raise MlsaeError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise MlsaeError(f"--warmup-steps must be in 0..{self.steps - 1} (below --steps), got {self.warmup_steps}")


@dataclass(kw_only=True)
class LensEvalConfig(LensDataOptions):
    lens: str
    """Tuned-lens directory (config.json + params.pt), or (online) a hub model name whose pretrained lens to download."""

    tokens: int = 8_192
    """Tokens to measure on (rounded up to whole sequences)."""

    def check(self) -> None:
        super().check()
        if self.tokens < 1:
            raise MlsaeError("--tokens must be positive")
