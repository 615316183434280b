"""Every long stage's progress bar says what it counts (issue 12 item 6): the training bar is named, and
the splice bar counts (sequence, layer) splices with an honest total and says which batch and layer it is at."""

from __future__ import annotations

import torch
from tqdm import tqdm as real_tqdm

import mlsae_analysis.downstream as downstream
import mlsae_train.trainer as trainer
from mlsae_cache.lm import load_model
from mlsae_cache.writer import write_array_cache
from mlsae_train.cli import main as train_main
from models import build_tiny_model


class RecordingBar(real_tqdm):
    """A real (disabled-output) tqdm that remembers how it was made and what it was told."""

    made: list["RecordingBar"] = []

    def __init__(self, *args, **kwargs) -> None:
        self.kwargs = dict(kwargs)
        self.postfixes: list[str] = []
        RecordingBar.made.append(self)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
        self.counted = 0

    def update(self, n=1):
        self.counted += n
        return super().update(n)

    def set_postfix_str(self, s="", refresh=True):
        self.postfixes.append(s)


def test_splice_bar_counts_sequence_layer_splices(monkeypatch, pythia_tokenizer_dir, tmp_path) -> None:
    RecordingBar.made = []
    monkeypatch.setattr(downstream, "tqdm", RecordingBar)
    model = load_model(str(build_tiny_model(tmp_path / "m", pythia_tokenizer_dir, n_layers=3, d_model=16, context=32)))
    ids = torch.randint(0, 1000, (5, 8), generator=torch.Generator().manual_seed(0))  # [N, S]
    downstream.downstream_metrics(model, ids, torch.ones_like(ids, dtype=torch.bool), [0, 2], lambda h, layer: h, 2, True)
    (bar,) = RecordingBar.made
    assert bar.kwargs["unit"] == "seq·layer" and bar.kwargs["total"] == 5 * 2 == bar.counted
    assert bar.kwargs["desc"] == "splice 5 seq x 2 layers"
    assert bar.postfixes[-1] == "batch 3/3, layer 2/2" and bar.postfixes[0] == "batch 1/3, layer 1/2"


def test_training_bar_is_named(monkeypatch, tmp_path) -> None:
    RecordingBar.made = []
    monkeypatch.setattr(trainer, "tqdm", RecordingBar)
    acts = torch.randn(64, 2, 8, generator=torch.Generator().manual_seed(0)).numpy()
    cache = write_array_cache(tmp_path / "cache", acts, shard_tokens=32)
    assert train_main(["--shards", str(cache), "--out", str(tmp_path / "run"), "--expansion-factor", "4", "-k", "2",
                       "--batch-tokens", "16", "--epochs", "1"]) == 0  # fmt: skip
    bars = [bar for bar in RecordingBar.made if bar.kwargs.get("unit") == "step"]
    assert len(bars) == 1 and bars[0].kwargs["desc"] == "train" and bars[0].kwargs["total"] == 4
