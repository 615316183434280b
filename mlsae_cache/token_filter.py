"""Which tokens a cache leaves out besides special tokens, and how many it left out.

Two rules, both off by default (``--skip-positions``, ``--max-norm-ratio`` / ``--norm-thresholds``):
- position: the first N positions of every sequence (a sequence-start token can have a residual norm
  100x the median and then carry nearly all of a layer's variance, see issue 12 item 5);
- norm: a token whose norm ||x[l]|| at ANY cached layer l exceeds that layer's threshold, which is
  either M x the layer's median norm over the first batch of the run (the first ``batch_size``
  sequences of the stream: the same on every run, so a resumed run gets the same thresholds) or
  given per layer by the user.
Special tokens are never stored (runner.py) and are not counted here: the counts are of tokens that
would otherwise have been stored. A token at a skipped position is counted by position only; among
the rest, one above a threshold is counted once by norm and once per layer whose threshold it passed.
The median is taken over the tokens the position rule keeps (special tokens excluded).

Everything here is a pure function of tensors (on any device); runner.py applies it to each batch.
Each shard's sidecar records its counts and the thresholds used (``SIDECAR_KEY``); the manifest
gets their sum (``tokens_left_out``), and a resumed run takes the thresholds an earlier run recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import shard_format as sf
from .errors import MlsaeError

SIDECAR_KEY = "token_filter"  # in each shard's sidecar: that shard's counts and the thresholds used


@dataclass
class FilterCounts:
    """Tokens left out, summed over batches and shards."""

    by_position: int = 0
    by_norm: int = 0
    by_norm_layer: list[int] = field(default_factory=list)  # [L] per cached layer: tokens above its threshold

    def add(self, other: "FilterCounts") -> "FilterCounts":
        layers = max(len(self.by_norm_layer), len(other.by_norm_layer))
        pad = lambda v: list(v) + [0] * (layers - len(v))  # noqa: E731
        return FilterCounts(
            self.by_position + other.by_position,
            self.by_norm + other.by_norm,
            [a + b for a, b in zip(pad(self.by_norm_layer), pad(other.by_norm_layer))],
        )

    def to_json(self) -> dict:
        return {"by_position": self.by_position, "by_norm": self.by_norm, "by_norm_layer": list(self.by_norm_layer)}

    @classmethod
    def from_json(cls, data: dict) -> "FilterCounts":
        return cls(int(data["by_position"]), int(data["by_norm"]), [int(v) for v in data["by_norm_layer"]])


def parse_norm_thresholds(spec: str, layers: list[int]) -> list[float]:
    """``--norm-thresholds``: comma-separated values, or a FILE holding a JSON list, a JSON object
    {"layer": value} or whitespace/comma-separated values; one value per cached layer, or one for all.
    Returns [L] positive finite thresholds in the order of ``layers``."""
    text, source = spec, "--norm-thresholds"
    path = Path(spec)
    if path.is_file():
        try:
            text, source = path.read_text(), f"--norm-thresholds file {path}"
        except (OSError, UnicodeDecodeError) as exc:
            raise MlsaeError(f"{source}: {path} cannot be read ({exc}); give a text or JSON file of thresholds") from None
    elif path.is_dir() or "/" in spec or spec.endswith((".json", ".txt")):
        raise MlsaeError(f"--norm-thresholds {spec}: no such file; give a file of thresholds or comma-separated values")
    try:
        data = json.loads(text)
    except ValueError:
        data = [part for part in text.replace(",", " ").split()]
    if isinstance(data, dict):
        missing = [layer for layer in layers if str(layer) not in data]
        if missing:
            raise MlsaeError(f"{source} has no threshold for layer {missing[0]}; give one for every cached layer ({layers[0]}..{layers[-1]})")
        data = [data[str(layer)] for layer in layers]
    if not isinstance(data, list):
        data = [data]
    try:
        values = [float(v) for v in data]
    except (TypeError, ValueError):
        raise MlsaeError(f"{source} is not a list of numbers; write e.g. 5000 or 800,900,1000 (one per cached layer)") from None
    if len(values) == 1:
        values = values * len(layers)
    if len(values) != len(layers):
        raise MlsaeError(f"{source} gives {len(values)} thresholds for {len(layers)} cached layers; give one per layer or one for all")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise MlsaeError(f"{source}: threshold {bad[0]} is not a positive finite norm")
    return values


def check_settings(skip_positions: int, max_norm_ratio: float | None, norm_thresholds: str | None, seq_len: int) -> None:
    """One-line errors for impossible settings, before anything is loaded or written."""
    if skip_positions < 0:
        raise MlsaeError(f"--skip-positions must be 0 or more, got {skip_positions}")
    if skip_positions >= seq_len:
        raise MlsaeError(f"--skip-positions {skip_positions} would leave out every position of a {seq_len}-token sequence; use less than --seq-len")
    if max_norm_ratio is not None and not (math.isfinite(max_norm_ratio) and max_norm_ratio > 0):
        raise MlsaeError(f"--max-norm-ratio must be a positive number, got {max_norm_ratio}")
    if max_norm_ratio is not None and norm_thresholds is not None:
        raise MlsaeError("--max-norm-ratio and --norm-thresholds both set the norm thresholds; give one of them")


def identity_entry(skip_positions: int, max_norm_ratio: float | None, thresholds: list[float] | None) -> dict | None:
    """What config.json records of the filter (None when it leaves nothing out: older caches match)."""
    if skip_positions == 0 and max_norm_ratio is None and thresholds is None:
        return None
    return {"skip_positions": skip_positions, "max_norm_ratio": max_norm_ratio, "norm_thresholds": thresholds}


def token_norms(acts: torch.Tensor) -> torch.Tensor:
    """acts [B, S, L, d] -> norms [B, S, L] (float32)."""
    return torch.linalg.vector_norm(acts.float(), dim=-1)


def position_keep(stored: torch.Tensor, skip_positions: int) -> torch.Tensor:
    """stored [B, S] (not special) -> [B, S]: also at position skip_positions or later."""
    positions = torch.arange(stored.shape[1], device=stored.device)  # [S]
    return stored & (positions >= skip_positions)[None, :]


def median_norms(acts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per-layer median norm over the candidate tokens: acts [B, S, L, d], candidates [B, S] -> [L] float64.

    The median of an even count is the mean of the two middle values (numpy's definition)."""
    norms = token_norms(acts)[candidates].double()  # [n, L]
    if norms.shape[0] == 0:
        raise MlsaeError("the first batch has no stored token left to estimate the median norms; lower --skip-positions or raise --batch-size")
    ordered = norms.sort(dim=0).values  # [n, L]
    n = ordered.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


class TokenFilter:
    """Applies the position and norm rules to a batch. ``thresholds``: [L] norms or None (no norm rule)."""

    def __init__(self, skip_positions: int = 0, thresholds: list[float] | None = None) -> None:
        self.skip_positions = skip_positions
        self.thresholds = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float64)  # [L]

    def keep(self, stored: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, FilterCounts]:
        """stored [B, S] (tokens that are not special), acts [B, S, L, d] -> (keep [B, S], counts)."""
        by_position = stored & ~position_keep(stored, self.skip_positions)  # [B, S]
        keep = stored & ~by_position
        n_layers = acts.shape[2]
        counts = FilterCounts(int(by_position.sum()), 0, [0] * n_layers)
        if self.thresholds is not None:
            if len(self.thresholds) != n_layers:
                raise MlsaeError(f"{len(self.thresholds)} norm thresholds for {n_layers} cached layers; give one per layer")
            over = token_norms(acts).double() > self.thresholds.to(acts.device)  # [B, S, L]
            over &= keep[..., None]
            by_norm = over.any(dim=2)  # [B, S]
            keep = keep & ~by_norm
            counts.by_norm = int(by_norm.sum())
            counts.by_norm_layer = over.sum(dim=(0, 1)).cpu().tolist()
        return keep, counts


def describe(left_out: dict, n_stored: int) -> str:
    """One line saying what the filter left out (for the end of a cache run), from the manifest's
    ``tokens_left_out`` (:func:`manifest_entry`)."""
    by_position, by_norm = int(left_out["by_position"]), int(left_out["by_norm"])
    per_layer = [(count, layer) for layer, count in left_out["by_norm_layer"].items() if count]
    if not by_position and not by_norm:
        return f"token filter: no token left out ({n_stored:,} stored)"
    parts = []
    if by_position:
        parts.append(f"{by_position:,} at the first positions of their sequence")
    if by_norm:
        worst = ", ".join(f"layer {layer}: {count:,}" for count, layer in sorted(per_layer, reverse=True)[:5])
        parts.append(f"{by_norm:,} above a norm threshold ({worst}{', ...' if len(per_layer) > 5 else ''})")
    total = by_position + by_norm
    return f"token filter: left out {total:,} tokens ({total / (total + n_stored):.2%}): " + "; ".join(parts) + " (manifest: tokens_left_out)"

def estimate_thresholds(acts: torch.Tensor, stored: torch.Tensor, skip_positions: int, ratio: float) -> list[float]:
    """--max-norm-ratio's thresholds from the run's first batch: ratio x each layer's median norm over
    the tokens that are stored and not skipped. acts [B, S, L, d], stored [B, S] -> [L]."""
    return (ratio * median_norms(acts, position_keep(stored, skip_positions))).tolist()


def recorded_thresholds(root: Path) -> list[float] | None:
    """The norm thresholds an earlier run of this cache recorded in any shard sidecar (None if none), so
    that a resumed run filters with exactly the same ones."""
    for side in sorted((Path(root) / sf.SHARD_DIR).glob("shard-*.json")):
        try:
            entry = json.loads(side.read_text()).get(SIDECAR_KEY)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entry, dict) and entry.get("norm_thresholds") is not None:
            return [float(v) for v in entry["norm_thresholds"]]
    return None


def sidecar_entry(counts: FilterCounts, thresholds: list[float] | None) -> dict:
    return {**counts.to_json(), "norm_thresholds": thresholds}


def manifest_entry(root: Path, n_shards: int, layers: list[int]) -> dict:
    """``tokens_left_out`` of the manifest: the counts of every shard's sidecar summed, per layer by name."""
    total, thresholds = FilterCounts(0, 0, [0] * len(layers)), None
    for index in range(n_shards):
        entry = sf.read_json(Path(root) / sf.SHARD_DIR / sf.sidecar_name(index)).get(SIDECAR_KEY) or {}
        if entry:
            total = total.add(FilterCounts.from_json(entry))
            thresholds = thresholds or entry.get("norm_thresholds")
    return {
        "by_position": total.by_position,
        "by_norm": total.by_norm,
        "by_norm_layer": {str(layer): count for layer, count in zip(layers, total.by_norm_layer)},
        "norm_thresholds": None if thresholds is None else {str(layer): t for layer, t in zip(layers, thresholds)},
    }


def run_filter(entry: dict | None, root: Path, first_batch) -> tuple[TokenFilter | None, list[float] | None]:
    """The filter of a cache run, from its identity entry (:func:`identity_entry`; None: no filter).

    Norm thresholds: the user's, else those an earlier run of this cache recorded (a resume), else
    estimated with ``first_batch()`` -> (acts [B, S, L, d], stored [B, S]), the run's first batch.
    Returns (filter, thresholds used)."""
    if entry is None:
        return None, None
    thresholds = entry.get("norm_thresholds")
    if thresholds is None and entry.get("max_norm_ratio") is not None:
        thresholds = recorded_thresholds(root)
        if thresholds is None:
            acts, stored = first_batch()
            thresholds = estimate_thresholds(acts, stored, int(entry["skip_positions"]), float(entry["max_norm_ratio"]))
    return TokenFilter(int(entry["skip_positions"]), thresholds), thresholds
