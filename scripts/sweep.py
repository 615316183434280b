"""Run a grid of MLSAE experiments from one TOML config: cache, train, analyse, then the cross-run report.

    .venv/bin/python scripts/sweep.py sweeps/tiny.toml                 # run (or resume) the whole sweep
    .venv/bin/python scripts/sweep.py sweeps/paper.toml --dry-run      # the plan, disk and time estimates
    .venv/bin/python scripts/sweep.py sweeps/paper.toml --only 'pythia-70m/*' --set data.train_tokens=100_000_000
    .venv/bin/python scripts/sweep.py --size-table                     # the README's table of sizes and times

The grid expands to runs named ``MODEL/R<R>-k<k>[-lens][-ARCH]``: ``arch`` is a grid axis like ``k``
(``mlsae``, the default, ``per-layer`` or ``crosscoder``; mlsae-train --arch), and names the run unless it
is the MLSAE. Each (model, lens) pair is cached once per split, so every family of a model trains on the
same cache; each run is trained on the train cache and analysed on the test cache; ``mlsae-analyse report``
then gathers every analysed run into ``OUT/report``. Every stage is the project's own command;
``--stop-after train`` runs only the lenses, caches and trainings.

Resumable: a stage is finished when the file it writes last exists (a cache's ``manifest.json``, a run's
``sae.safetensors`` with its checkpoint at the last step, an analysis's ``summary.json``, a lens's
``training.json``) and is then skipped; an interrupted training is continued with ``--resume``; an
interrupted cache or lens resumes by itself. A failed stage is reported, the stages that need it are
skipped, the sweep goes on and exits non-zero at the end.
The report is rewritten only when the set of analysed runs (or one of their summaries) changed.

Layout under ``out``: ``caches/MODEL[-lens]/{train,test}``, ``lenses/MODEL``, ``runs/MODEL/R..-k..[-lens][-ARCH]``,
``analysis/MODEL/R..-k..[-lens][-ARCH]``, ``compare/MODEL/R..-k..[-lens]`` (``mlsae-analyse compare`` of the
families of one model, R, k and lens, with cross-dictionary matching), ``report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlsae_analysis import layout  # noqa: E402
from mlsae_analysis.files import remove_stale_partials  # noqa: E402
from mlsae_cache.atomic import atomic_write_json  # noqa: E402
from mlsae_cache.clitools import run_command  # noqa: E402
from mlsae_cache.errors import MlsaeError  # noqa: E402
from mlsae_train.checkpoint import run_is_finished  # noqa: E402
from mlsae_train.families import DEFAULT_ARCH, FAMILIES  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SPLITS = ("train", "test")
REPORT_RUNS_FILE = "sweep_runs.json"  # written into OUT/report: which analyses (and summaries) it was built from

# ----------------------------------------------------------------------------------------------------
# The config file
# ----------------------------------------------------------------------------------------------------

TOP_KEYS = {"out", "launcher", "data", "cache", "train", "analyse", "lens", "models", "grid"}
DATA_DEFAULTS: dict[str, Any] = {
    "dataset": None,  # both splits' text, unless train_dataset / test_dataset name their own
    "train_dataset": None,
    "test_dataset": None,
    "train_split": "train",  # hub datasets only
    "test_split": "test",
    "train_tokens": None,
    "test_tokens": None,
}
MODEL_KEYS = {"name", "path", "lens"}
GRID_KEYS = {"models", "expansion_factor", "k", "lens", "arch", "seed"}
# options of each command that the sweep sets itself, per run: the config may not set them
SWEEP_OWNED = {
    "cache": {"model", "out", "dataset", "tokens", "split", "lens", "overwrite"},
    "train": {"shards", "out", "arch", "expansion_factor", "k", "resume"},
    "analyse": {"run", "shards", "out"},
    "lens": {"model", "dataset", "split", "out", "overwrite"},
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """Names the model's runs and directories (pythia-70m, smollm2)."""
    path: str
    """What mlsae-cache --model gets: a short Pythia name, a hub id or a local directory."""
    lens: str | None = None
    """A tuned-lens directory for the lens runs; None: the sweep trains one with mlsae-lens train."""


@dataclass(frozen=True)
class Run:
    model: ModelSpec
    expansion_factor: int
    k: int
    lens: bool
    arch: str = DEFAULT_ARCH
    """The dictionary family (mlsae-train --arch)."""
    seed: int | None = None
    """mlsae-train --seed when the grid sets one (None: the [train] table's, or the default)."""

    @property
    def name(self) -> str:
        """``MODEL/R<R>-k<k>[-lens][-ARCH][-s<SEED>]``: an MLSAE run keeps the name it had before families
        (and grid seeds) existed, so that sweeps started then resume."""
        lens = "-lens" if self.lens else ""
        family = "" if self.arch == DEFAULT_ARCH else f"-{self.arch}"
        seed = "" if self.seed is None else f"-s{self.seed}"
        return f"{self.model.name}/R{self.expansion_factor}-k{self.k}{lens}{family}{seed}"


@dataclass
class SweepConfig:
    source: Path
    out: Path
    launcher: list[str]
    """Prefix for the cache and train commands (e.g. torchrun --nproc-per-node 8); empty: this Python."""
    data: dict[str, Any]
    options: dict[str, dict[str, Any]]
    """Extra options per stage: cache, train, analyse, lens (any option of that command the sweep does not set)."""
    models: dict[str, ModelSpec]
    runs: list[Run]

    def dataset(self, split: str) -> str:
        return self.data[f"{split}_dataset"] or self.data["dataset"]


def _cli_config_class(stage: str) -> type:
    module, name = {"cache": ("mlsae_cache.config", "CacheConfig"), "train": ("mlsae_train.config", "TrainConfig"),
                    "analyse": ("mlsae_analysis.config", "AnalyseConfig"), "lens": ("mlsae_cache.lens_cli", "LensTrainConfig")}[stage]  # fmt: skip
    return getattr(importlib.import_module(module), name)


def _matches_type(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a config field's annotation (int, float, str, bool, Literal, list, Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list) and all(_matches_type(v, args[0] if args else Any) for v in value)
    if args and type(None) in args:  # Optional[X] / X | None: TOML has no null, so only X can come
        return any(_matches_type(value, a) for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _check_stage_options(stage: str, table: dict[str, Any], where: str) -> dict[str, Any]:
    """The [cache] / [train] / [analyse] / [lens] table, checked against the fields of that command's config."""
    cls = _cli_config_class(stage)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - SWEEP_OWNED[stage]
    for key, value in table.items():
        if key in SWEEP_OWNED[stage]:
            raise MlsaeError(f"{where}: [{stage}] {key} is set by the sweep for each run; remove it from the config")
        if key not in known:
            raise MlsaeError(f"{where}: [{stage}] has no option {key!r}; use one of {', '.join(sorted(known))}")
        if not _matches_type(value, hints[key]):
            raise MlsaeError(f"{where}: [{stage}] {key} = {value!r} has the wrong type (expected {hints[key]})")
    return dict(table)


def _check_keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise MlsaeError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise MlsaeError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
    return table


def _non_negative_ints(values: Any, where: str) -> list[int]:
    values = values if isinstance(values, list) else [values]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise MlsaeError(f"{where} must be a non-negative integer or a non-empty list of them, got {values!r}")
    return values


def _positive_ints(values: Any, where: str) -> list[int]:
    values = values if isinstance(values, list) else [values]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise MlsaeError(f"{where} must be a positive integer or a non-empty list of them, got {values!r}")
    return values


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """``--set a.b=VALUE``: VALUE is read as a TOML value (a bare word is taken as a string)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise MlsaeError(f"--set {assignment!r} is not KEY=VALUE (e.g. --set data.train_tokens=100_000_000)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, leaf = key.split(".")
    table = raw
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise MlsaeError(f"--set {key}: {part} is not a table (models and grid are edited in the file)")
    table[leaf] = value


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the config's relative paths relative to its own folder, whatever the current folder is.

    ``out`` and a model's ``lens`` are always paths. A dataset, a model ``path`` or a ``tokenizer`` may
    also be a hub id, so it is taken as a path only when it exists beside the config."""

    def here(value: str) -> str:
        return str((base / value).resolve())

    def maybe_here(value: Any) -> Any:
        return here(value) if isinstance(value, str) and value and (base / value).exists() else value

    if isinstance(raw.get("out"), str) and raw["out"]:
        raw["out"] = here(raw["out"])
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("dataset", "train_dataset", "test_dataset"):
            if key in data:
                data[key] = maybe_here(data[key])
    for entry in raw.get("models") or []:
        if isinstance(entry, dict):
            if "path" in entry:
                entry["path"] = maybe_here(entry["path"])
            if isinstance(entry.get("lens"), str) and entry["lens"]:
                entry["lens"] = here(entry["lens"])
    for stage in SWEEP_OWNED:
        table = raw.get(stage)
        if isinstance(table, dict) and "tokenizer" in table:
            table["tokenizer"] = maybe_here(table["tokenizer"])


def load_config(path: Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, check and expand a sweep config; every problem is one MlsaeError line naming the key."""
    where = str(path)
    if Path(path).is_dir():
        raise MlsaeError(f"sweep config {path} is a folder; give a .toml file such as sweeps/tiny.toml")
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlsaeError(f"sweep config {path} does not exist; give a .toml file such as sweeps/tiny.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise MlsaeError(f"{where} is not valid TOML: {exc}") from None
    _resolve_relative_paths(raw, Path(path).parent)
    for assignment in overrides:  # typed on the command line: relative to the current folder, as usual
        apply_override(raw, assignment)
    _check_keys(raw, TOP_KEYS, where)
    if not isinstance(raw.get("out"), str):
        raise MlsaeError(f"{where}: set out = \"DIR\", the folder the sweep writes into")
    if Path(raw["out"]).exists() and not Path(raw["out"]).is_dir():
        raise MlsaeError(f"{where}: out = {raw['out']} is a file; set out to a folder the sweep writes into")
    launcher = raw.get("launcher", [])
    if not (isinstance(launcher, list) and all(isinstance(a, str) for a in launcher)):
        raise MlsaeError(f"{where}: launcher must be a list of strings, e.g. [\"torchrun\", \"--nproc-per-node\", \"8\"]")

    data = {**DATA_DEFAULTS, **_check_keys(raw.get("data", {}), set(DATA_DEFAULTS), f"{where}: [data]")}
    for split in SPLITS:
        if not (data[f"{split}_dataset"] or data["dataset"]):
            raise MlsaeError(f"{where}: [data] names no text for the {split} split; set dataset (or {split}_dataset)")
        _positive_ints(data[f"{split}_tokens"], f"{where}: [data] {split}_tokens")

    options = {stage: _check_stage_options(stage, raw.get(stage, {}), where) for stage in SWEEP_OWNED}

    models = _load_models(raw.get("models"), where)
    runs = _expand_grid(raw.get("grid"), models, where)
    if "seed" in options["train"] and any(run.seed is not None for run in runs):
        raise MlsaeError(f"{where}: seed is set both in [train] and in a [[grid]] block; set it in one place")
    return SweepConfig(Path(path), Path(raw["out"]), launcher, data, options, models, runs)


def _load_models(entries: Any, where: str) -> dict[str, ModelSpec]:
    if not isinstance(entries, list) or not entries:
        raise MlsaeError(f"{where}: no models; add [[models]] tables with name = \"pythia-70m\" (and path, lens if needed)")
    models: dict[str, ModelSpec] = {}
    for i, entry in enumerate(entries):
        _check_keys(entry, MODEL_KEYS, f"{where}: [[models]] #{i + 1}")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise MlsaeError(f"{where}: [[models]] #{i + 1} needs a name of letters, digits, '.', '_' or '-' (got {name!r})")
        if name in models:
            raise MlsaeError(f"{where}: model {name!r} is listed twice in [[models]]")
        models[name] = ModelSpec(name, str(entry.get("path", name)), entry.get("lens"))
    return models


def _families(values: Any, where: str) -> list[str]:
    """A grid's ``arch``: one family name or a non-empty list of them (the names of mlsae_train.families)."""
    values = values if isinstance(values, list) else [values]
    known = ", ".join(FAMILIES)
    if not values:
        raise MlsaeError(f"{where} must name a dictionary family or a non-empty list of them ({known})")
    for value in values:
        if value not in FAMILIES:
            raise MlsaeError(f"{where} = {value!r} is not a dictionary family; use one of {known}")
    return values


def _expand_grid(blocks: Any, models: dict[str, ModelSpec], where: str) -> list[Run]:
    """Every block is a product models x lens x expansion_factor x k x arch; a run listed twice is kept once."""
    if not isinstance(blocks, list) or not blocks:
        raise MlsaeError(f"{where}: no grid; add [[grid]] tables with models, expansion_factor, k (and lens, arch)")
    runs: dict[str, Run] = {}
    for i, block in enumerate(blocks):
        block_where = f"{where}: [[grid]] #{i + 1}"
        _check_keys(block, GRID_KEYS, block_where)
        names = block.get("models")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise MlsaeError(f"{block_where} needs models = [\"name\", ...] naming entries of [[models]]")
        for name in names:
            if name not in models:
                raise MlsaeError(f"{block_where} names model {name!r}, which no [[models]] entry defines; add it or fix the name")
        lens_values = block.get("lens", [False])
        lens_values = lens_values if isinstance(lens_values, list) else [lens_values]
        if not lens_values or not all(isinstance(v, bool) for v in lens_values):
            raise MlsaeError(f"{block_where}: lens must be true, false or a list of them")
        archs = _families(block.get("arch", [DEFAULT_ARCH]), f"{block_where} arch")
        # seeds: e.g. one per family, whose initial dictionaries would otherwise share directions (SPEC 9 matching)
        seeds = [None] if "seed" not in block else _non_negative_ints(block["seed"], f"{block_where} seed")
        for name in names:
            for lens in lens_values:
                for r in _positive_ints(block.get("expansion_factor"), f"{block_where} expansion_factor"):
                    for k in _positive_ints(block.get("k"), f"{block_where} k"):
                        for arch in archs:
                            for seed in seeds:
                                run = Run(models[name], r, k, lens, arch, seed)
                                runs.setdefault(run.name, run)
    return list(runs.values())


# ----------------------------------------------------------------------------------------------------
# Sizes and times (estimates, not measurements)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    params: int
    """Non-embedding parameters: what a forward pass multiplies (the cache skips the unembedding)."""


# (layers, d_model, non-embedding parameters) from the Pythia model card
PYTHIA = {
    "pythia-70m": ModelShape(6, 512, 18_915_328),
    "pythia-160m": ModelShape(12, 768, 85_056_000),
    "pythia-410m": ModelShape(24, 1024, 302_311_424),
    "pythia-1b": ModelShape(16, 2048, 805_736_448),
    "pythia-1.4b": ModelShape(24, 2048, 1_208_602_624),
    "pythia-2.8b": ModelShape(32, 2560, 2_517_652_480),
    "pythia-6.9b": ModelShape(32, 4096, 6_444_163_072),
    "pythia-12b": ModelShape(36, 5120, 11_327_027_200),
}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
TOKEN_ID_BYTES = 16  # per stored token: sequence, position, token id (measured: benchmarks/RESULTS.md)
LATENT_ROW_BYTES = 18  # one latents parquet row before compression: token i64, layer i16, latent i32, activation f32
GATED_MLP = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi3"}

# The assumptions behind every time estimate. Where scripts/gpu_check.py has measured a rate on a GPU
# (benchmarks/gpu.json), the estimates use it instead (measured_rates); see the README.
H100_BF16_PEAK = 989e12  # FLOP/s, dense, SXM
ASSUMED_UTILISATION = 0.30
ASSUMED_DISK_BYTES_PER_S = 2e9  # one NVMe drive, sequential
GPU_FIGURES = REPO / "benchmarks" / "gpu.json"


@dataclass(frozen=True)
class MeasuredRates:
    """Effective FLOP/s measured by scripts/gpu_check.py on one GPU: the whole training step (sae_train_flops'
    count over the step time, bfloat16 kernel) per width d, and the cache's bare LM forward (forward_flops'
    count over its time, pythia-70m's shape)."""

    device: str
    date: str
    sae_by_width: dict[int, float]
    forward: float | None

    def sae(self, d_model: int) -> float:
        """At the largest measured width up to d_model (the smallest above it if none): the rate grows with d."""
        below = [d for d in self.sae_by_width if d <= d_model]
        return self.sae_by_width[max(below) if below else min(self.sae_by_width)]


def measured_rates(path: Path = GPU_FIGURES) -> MeasuredRates | None:
    """The rates in ``path`` (None when it is missing, unreadable or holds no training measurement)."""
    try:
        report = json.loads(path.read_text())
        by_name = {m["name"]: m for m in report["measurements"] if m.get("status") == "measured"}
        train = by_name["train_throughput"]["figures"]
        sae = {row["d"]: row["vectors_per_s"] * sae_vector_flops(row["d"], train["R"] * row["d"], train["k"])
               for row in train["steps"] if row["kernel"] == "bfloat16"}  # fmt: skip
        cache = by_name.get("cache_throughput", {}).get("figures", {})
        forward = cache.get("forward_tokens_per_s") and cache["forward_tokens_per_s"] * forward_flops(1, PYTHIA["pythia-70m"], cache["batch"][1])
        if not sae:
            return None
        return MeasuredRates(report["device"].get("name", report["device"]["type"]), report["date"][:10], sae, forward)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def model_shape(model: str) -> ModelShape | None:
    """Layers, width and parameters of a Pythia name or a local model directory; None when unknown."""
    local = Path(model) / "config.json"
    if local.is_file():
        return _shape_from_config(json.loads(local.read_text()))
    short = model.split("/")[-1].lower().removesuffix("-deduped")
    return PYTHIA.get(short)


def _shape_from_config(config: dict) -> ModelShape:
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    d = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    kv_width = d * (config.get("num_key_value_heads") or heads) // heads
    ff = config.get("intermediate_size") or config.get("n_inner") or 4 * d
    mlp = (3 if config.get("model_type") in GATED_MLP else 2) * d * ff
    return ModelShape(int(layers), int(d), int(layers * (2 * d * d + 2 * d * kv_width + mlp)))


def cache_bytes(tokens: int, shape: ModelShape, dtype: str = "float16") -> int:
    """Disk of a cache: every layer's d_model vector per token, plus the token identity."""
    return tokens * (shape.n_layers * shape.d_model * DTYPE_BYTES[dtype] + TOKEN_ID_BYTES)


def latents_bytes(tokens: int, shape: ModelShape, k: int, arch: str = DEFAULT_ARCH) -> int:
    """Disk of an analysis's sparse latents at most (before parquet compression): k rows per token and layer,
    or per token for a crosscoder (its k latents are shared by all the token's layers)."""
    rows_per_token = k if arch == "crosscoder" else shape.n_layers * k
    return tokens * rows_per_token * LATENT_ROW_BYTES


def forward_flops(tokens: int, shape: ModelShape, seq_len: int) -> float:
    """Language-model forward: 2 x parameters per token, plus attention over the context (Kaplan et al. 2020)."""
    return tokens * (2 * shape.params + 2 * shape.n_layers * seq_len * shape.d_model)


def sae_vector_flops(d: int, n: int, k: int) -> float:
    """One (token, layer) vector of a training step: the dense encoder (2 d n) dominates; the decoder and the
    encoder's gradient touch only the k active latents (8 k d), AuxK the k_aux ~ d/2 dead ones (6 k_aux d)."""
    return 2 * d * n + 8 * k * d + 6 * (d // 2) * d


def sae_train_flops(tokens: int, shape: ModelShape, expansion_factor: int, k: int) -> float:
    """One MLSAE epoch: sae_vector_flops for every (token, layer) vector."""
    return tokens * shape.n_layers * sae_vector_flops(shape.d_model, expansion_factor * shape.d_model, k)


def gpu_seconds(flops: float, disk_bytes: float = 0.0, rate: float | None = None) -> float:
    """Time to do ``flops`` at ``rate`` FLOP/s (default: one H100 at the assumed utilisation), or to stream
    ``disk_bytes``, whichever is longer."""
    return max(flops / (rate or H100_BF16_PEAK * ASSUMED_UTILISATION), disk_bytes / ASSUMED_DISK_BYTES_PER_S)


def sae_rate(shape: ModelShape, rates: MeasuredRates | None) -> float | None:
    """The training rate for ``shape``'s width: measured where gpu.json has it, else None (the assumption)."""
    return rates.sae(shape.d_model) if rates else None


def estimate_basis(rates: MeasuredRates | None) -> str:
    """What the time estimates assume, in words (for --dry-run and the size table)."""
    assumed = f"one H100 at {ASSUMED_UTILISATION:.0%} of its bf16 peak"
    if rates is None:
        return f"{assumed}, reading or writing the caches at {ASSUMED_DISK_BYTES_PER_S / 1e9:.0f} GB/s"
    widths = ", ".join(f"d={d}: {rate / 1e12:.0f} TFLOP/s" for d, rate in sorted(rates.sae_by_width.items()))
    forward = f"the LM forward at the {rates.forward / 1e12:.0f} TFLOP/s measured for pythia-70m's shape" if rates.forward else f"the LM forward on {assumed}"
    return (f"training at the rates measured on one {rates.device} on {rates.date} (benchmarks/gpu.json; {widths}, each "
            f"width at the largest measured one below it), {forward}, caches at {ASSUMED_DISK_BYTES_PER_S / 1e9:.0f} GB/s")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_seconds(s: float) -> str:
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def size_table(tokens: int = 1_000_000_000, small_tokens: int = 10_000_000, seq_len: int = 2048) -> str:
    """The README's table per Pythia model: cache disk, latents at R=64, and estimated H100 times for 1B
    tokens, compute-bound and disk-bound apart (a stage takes the longer of the two)."""
    lines = ["| model | layers x d | cache, 1B tokens | cache, 10M tokens | latents at R=64 | LM forward, 1B tokens "
             "| SAE R=64 k=32, 1B tokens | 1B-token cache at 2 GB/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    rates = measured_rates()
    for name in ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b"):
        s = PYTHIA[name]
        big = cache_bytes(tokens, s)
        forward = gpu_seconds(forward_flops(tokens, s, seq_len), rate=rates.forward if rates else None)
        train = gpu_seconds(sae_train_flops(tokens, s, 64, 32), rate=sae_rate(s, rates))
        lines.append(f"| {name} | {s.n_layers} x {s.d_model} | {human_bytes(big)} | {human_bytes(cache_bytes(small_tokens, s))} "
                     f"| {64 * s.d_model:,} | {human_seconds(forward)} | {human_seconds(train)} | {human_seconds(gpu_seconds(0, big))} |")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The plan: one stage per command
# ----------------------------------------------------------------------------------------------------


STAGE_ORDER = ("lens", "cache", "train", "analyse", "compare")  # the stages come in this order (then the report)
STOP_AFTER = ("lens", "cache", "train")


@dataclass(eq=False)
class Stage:
    kind: str
    """lens, cache, train, analyse or report."""
    label: str
    module: str
    argv: list[str]
    done_file: Path
    needs: list[Stage] = field(default_factory=list)
    launched: bool = False
    """Runs under the config's launcher (torchrun) when one is set: the cache and train commands."""
    resume_marker: Path | None = None
    """train: when this exists the run was started, and --resume is added."""
    finished: Callable[[], bool] | None = None
    """A further test that ``done_file`` is this stage's finished output (cache: its tokens; train: the last step)."""
    disk_bytes: int | None = None
    seconds: float | None = None

    @property
    def command(self) -> str:
        return {"mlsae_cache.cli": "mlsae-cache", "mlsae_train.cli": "mlsae-train", "mlsae_analysis.cli": "mlsae-analyse",
                "mlsae_cache.lens_cli": "mlsae-lens"}[self.module]  # fmt: skip

    def is_done(self) -> bool:
        return self.done_file.exists() and (self.finished is None or self.finished())

    def status(self) -> str:
        if self.is_done():
            return "skip"
        if self.resume_marker is not None and self.resume_marker.exists():
            return "resume"
        return "to do"

    def full_argv(self) -> list[str]:
        return self.argv + (["--resume"] if self.status() == "resume" else [])


def _option_argv(options: dict[str, Any]) -> list[str]:
    """{"batch_tokens": 8, "verify": False, "layers": [1, 2]} -> --batch-tokens 8 --no-verify --layers 1 2."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


class Planner:
    """Turns a config's runs (those --only selects) into the ordered stages that make them."""

    def __init__(self, config: SweepConfig):
        self.config = config
        self.out = config.out
        self._lenses: dict[str, Stage] = {}
        self._caches: dict[tuple[str, bool, str], Stage] = {}
        self.rates = measured_rates()
        """The GPU rates the time estimates use (benchmarks/gpu.json), read once."""

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def analysis_dir(self, run: Run) -> Path:
        return self.out / "analysis" / run.name

    def stages(self, runs: list[Run]) -> list[Stage]:
        ordered: list[Stage] = []
        analyses: dict[Run, Stage] = {}
        for run in runs:
            caches = {split: self._cache(run.model, run.lens, split, ordered) for split in SPLITS}
            train = self._train(run, caches["train"])
            analyses[run] = self._analyse(run, train, caches["test"])
            ordered += [train, analyses[run]]
        return ordered + self._compares(analyses)

    def _compares(self, analyses: dict[Run, Stage]) -> list[Stage]:
        """``mlsae-analyse compare`` of the families of each (model, R, k, lens): one stage per group whose
        runs are of two or more families (they share the cache, so the comparison is a fair one)."""
        groups: dict[str, list[Run]] = {}
        for run in analyses:
            groups.setdefault(Run(run.model, run.expansion_factor, run.k, run.lens).name, []).append(run)
        stages = []
        for label, group in groups.items():
            if len({run.arch for run in group}) < 2:
                continue
            out = self.out / "compare" / label
            argv = ["compare", *(str(self.analysis_dir(run)) for run in group), "--out", str(out)]
            stages.append(Stage("compare", label, "mlsae_analysis.cli", argv, out / layout.COMPARISON, [analyses[r] for r in group]))
        return stages

    def _lens_dir(self, model: ModelSpec, ordered: list[Stage]) -> tuple[str, list[Stage]]:
        if model.lens:
            return model.lens, []
        if model.name not in self._lenses:
            out = self.out / "lenses" / model.name
            argv = ["train", "--model", model.path, "--dataset", self.config.dataset("train"), "--split",
                    self.config.data["train_split"], "--out", str(out), *_option_argv(self.config.options["lens"])]  # fmt: skip
            # training.json is what mlsae-lens train writes last; an unfinished lens training resumes by itself
            self._lenses[model.name] = stage = Stage("lens", model.name, "mlsae_cache.lens_cli", argv, out / "training.json")
            ordered.append(stage)
        return str(self.out / "lenses" / model.name), [self._lenses[model.name]]

    def _cache(self, model: ModelSpec, lens: bool, split: str, ordered: list[Stage]) -> Stage:
        key = (model.name, lens, split)
        if key not in self._caches:
            lens_argv, needs = [], []
            if lens:
                lens_path, needs = self._lens_dir(model, ordered)
                lens_argv = ["--lens", lens_path]
            group = model.name + ("-lens" if lens else "")
            out = self.out / "caches" / group / split
            data, options = self.config.data, self.config.options["cache"]
            tokens = data[f"{split}_tokens"]
            argv = ["--model", model.path, "--dataset", self.config.dataset(split), "--split", data[f"{split}_split"],
                    "--tokens", str(tokens), "--out", str(out), *lens_argv, *_option_argv(options)]  # fmt: skip
            stage = Stage("cache", f"{group} {split}", "mlsae_cache.cli", argv, out / "manifest.json", needs, launched=True,
                          finished=lambda: _cache_has_tokens(out, tokens))  # fmt: skip
            shape = model_shape(model.path)
            if shape is not None:
                stage.disk_bytes = cache_bytes(tokens, shape, options.get("dtype", "float16"))
                flops = forward_flops(tokens, shape, options.get("seq_len", 2048))
                stage.seconds = gpu_seconds(flops, stage.disk_bytes, rate=self.rates.forward if self.rates else None)
            self._caches[key] = stage
            ordered.append(stage)
        return self._caches[key]

    def _train(self, run: Run, cache: Stage) -> Stage:
        out = self.run_dir(run)
        argv = ["--shards", str(cache.done_file.parent), "--out", str(out), "--arch", run.arch,
                "--expansion-factor", str(run.expansion_factor), "-k", str(run.k), *_option_argv(self.config.options["train"])]  # fmt: skip
        if run.seed is not None:
            argv += ["--seed", str(run.seed)]
        stage = Stage("train", run.name, "mlsae_train.cli", argv, out / "sae.safetensors", [cache], launched=True,
                      resume_marker=out / "config.json", finished=lambda: run_is_finished(out))  # fmt: skip
        shape = model_shape(run.model.path)
        if shape is not None:
            epochs = self.config.options["train"].get("epochs", 1)
            # one estimate for every family: each one's dense encoder (2 d n per (token, layer) vector) dominates
            flops = sae_train_flops(epochs * self.config.data["train_tokens"], shape, run.expansion_factor, run.k)
            # each epoch reads the whole cache
            stage.seconds = gpu_seconds(flops, epochs * (cache.disk_bytes or 0), rate=sae_rate(shape, self.rates))
        return stage

    def _analyse(self, run: Run, train: Stage, test_cache: Stage) -> Stage:
        out = self.analysis_dir(run)
        options = self.config.options["analyse"]
        argv = ["--run", str(train.done_file.parent), "--shards", str(test_cache.done_file.parent), "--out", str(out),
                *_option_argv(options)]  # fmt: skip
        stage = Stage("analyse", run.name, "mlsae_analysis.cli", argv, out / layout.SUMMARY, [train, test_cache])
        shape = model_shape(run.model.path)
        if shape is not None:
            tokens = min(self.config.data["test_tokens"], options.get("max_tokens", self.config.data["test_tokens"]))
            stage.disk_bytes = latents_bytes(tokens, shape, run.k, run.arch)
        return stage


def _cache_has_tokens(cache: Path, tokens: int) -> bool:
    """A finished cache made for another token count is not this stage's: mlsae-cache then says so itself."""
    try:
        return json.loads((cache / "config.json").read_text()).get("tokens") == tokens
    except (OSError, ValueError):
        return False


def select_runs(runs: list[Run], patterns: Sequence[str]) -> list[Run]:
    """Runs whose name matches any --only glob (all runs without --only)."""
    if not patterns:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    if not chosen:
        raise MlsaeError(f"--only {' '.join(patterns)} matches none of the {len(runs)} runs (names look like {runs[0].name})")
    return chosen


# ----------------------------------------------------------------------------------------------------
# The report: rewritten only when the analysed runs changed
# ----------------------------------------------------------------------------------------------------


def analysed_runs(planner: Planner, runs: list[Run]) -> dict[str, str]:
    """{run name: mtime and sha256 of its summary.json} for every run of the config that has an analysis.

    The mtime makes a redone analysis count as new even when it reproduces its summary exactly."""
    found = {}
    for run in runs:
        summary = planner.analysis_dir(run) / layout.SUMMARY
        if summary.exists():
            found[run.name] = f"{summary.stat().st_mtime_ns}:{hashlib.sha256(summary.read_bytes()).hexdigest()}"
    return found


def report_is_current(report_dir: Path, fingerprint: dict[str, str]) -> bool:
    try:
        return json.loads((report_dir / REPORT_RUNS_FILE).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def write_report(planner: Planner, runs: list[Run], fingerprint: dict[str, str], call: Callable[[Stage], int]) -> int:
    """mlsae-analyse report into a fresh sibling, then swap it in place of OUT/report."""
    out = planner.out / "report"
    if out.exists() and not (out / REPORT_RUNS_FILE).is_file():  # replace only a report this sweep wrote
        print(f"error: {out} was not written by the sweep (it has no {REPORT_RUNS_FILE}); move it away so that the report "
              "can go there", file=sys.stderr)  # fmt: skip
        return 2
    for leftover in (".report.new-", ".report.old-", "..report.new-"):  # of a sweep killed while making its report
        remove_stale_partials(out, leftover)
    fresh, stale = out.parent / f".report.new-{os.getpid()}", out.parent / f".report.old-{os.getpid()}"
    dirs = [str(planner.analysis_dir(r)) for r in runs if r.name in fingerprint]
    code = call(Stage("report", f"{len(dirs)} runs", "mlsae_analysis.cli", ["report", *dirs, "--out", str(fresh)], out))
    if code != 0:
        return code
    atomic_write_json(fresh / REPORT_RUNS_FILE, fingerprint)
    if out.exists():
        os.rename(out, stale)
    os.rename(fresh, out)
    shutil.rmtree(stale, ignore_errors=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """A stage was stopped by Ctrl-C: stop the sweep (what finished is kept)."""


def stage_caller(config: SweepConfig, in_process: bool) -> Callable[[Stage], int]:
    """A function that runs one stage's command and returns its exit code."""

    def call(stage: Stage) -> int:
        argv = stage.full_argv()
        print(f"  $ {stage.command} {' '.join(argv)}", flush=True)
        if stage.kind in ("analyse", "compare"):
            Path(argv[argv.index("--out") + 1]).parent.mkdir(parents=True, exist_ok=True)
        if in_process:
            code = importlib.import_module(stage.module).main(argv)
        else:
            prefix = config.launcher if (stage.launched and config.launcher) else [sys.executable]
            code = subprocess.run([*prefix, "-m", stage.module, *argv]).returncode
        if code in (130, -2):  # the command was interrupted (Ctrl-C): it kept its progress
            raise Interrupted
        return code

    return call


def execute(stages: list[Stage], call: Callable[[Stage], int], total: int) -> dict[str, str]:
    """Run the stages in order; returns {stage title: why it failed or was skipped for a failure}."""
    failed: dict[int, str] = {}
    problems: dict[str, str] = {}
    for i, stage in enumerate(stages, 1):
        title = f"{stage.kind} {stage.label}"
        head = f"[{i}/{total}]"
        broken = [n for n in stage.needs if id(n) in failed]
        if broken:
            failed[id(stage)] = problems[title] = f"not run: {broken[0].kind} {broken[0].label} failed"
            print(f"{head} {title}: {problems[title]}", flush=True)
            continue
        status = stage.status()
        if status == "skip":
            print(f"{head} {title}: done ({stage.done_file.name} exists), skipped", flush=True)
            continue
        print(f"{head} {title}" + (" (resuming)" if status == "resume" else ""), flush=True)
        start = time.perf_counter()
        try:
            code = call(stage)
        except Interrupted:
            raise
        except Exception as exc:  # a bug in a command run in this process: report it, go on with the others
            import traceback

            traceback.print_exc()
            code, why = 1, f"{type(exc).__name__}: {exc}"
        else:
            why = f"exit {code}"
        elapsed = time.perf_counter() - start
        if code == 0 and stage.is_done():
            print(f"  done in {human_seconds(elapsed)}", flush=True)
            continue
        if code == 0:
            why = f"exit 0 but {stage.done_file} was not written"
        failed[id(stage)] = problems[title] = f"failed ({why}) after {human_seconds(elapsed)}"
        print(f"  {title} {problems[title]}; going on with the other runs", flush=True)
    return problems


def print_plan(config: SweepConfig, planner: Planner, stages: list[Stage], runs: list[Run], fingerprint: dict[str, str],
               stop_after: str | None = None) -> None:  # fmt: skip
    n_models = len({r.model.name for r in runs})
    print(f"sweep {config.source}: {len(runs)} runs of {n_models} models (of {len(config.runs)} in the grid) -> {config.out}")
    width = max(len(f"{s.kind} {s.label}") for s in stages)
    for i, stage in enumerate(stages, 1):
        status = stage.status()
        extra = []
        if stage.disk_bytes is not None:
            extra.append(human_bytes(stage.disk_bytes))
        if stage.seconds is not None and status != "skip":
            extra.append(f"~{human_seconds(stage.seconds)} GPU".replace("~<", "<"))
        print(f"  [{i}/{len(stages) + 1}] {stage.kind + ' ' + stage.label:<{width}}  {status:<6}  {'  '.join(extra)}")
    will_analyse = {s.label for s in stages if s.kind == "analyse" and s.status() != "skip"}
    report_runs = len(set(fingerprint) | will_analyse)
    report_todo = not stop_after and report_runs and (will_analyse or not report_is_current(config.out / "report", fingerprint))
    print(f"  [{len(stages) + 1}/{len(stages) + 1}] {'report ' + str(report_runs) + ' runs':<{width}}  {'to do' if report_todo else 'skip'}")
    print_estimates(config, stages, planner.rates)


def print_estimates(config: SweepConfig, stages: list[Stage], rates: MeasuredRates | None) -> None:
    caches = [s for s in stages if s.kind == "cache"]
    total = sum(s.disk_bytes or 0 for s in caches)
    to_write = sum(s.disk_bytes or 0 for s in stages if s.status() != "skip")
    latents = sum(s.disk_bytes or 0 for s in stages if s.kind == "analyse" and s.status() != "skip")
    unknown = sorted({s.label.split()[0].split("/")[0] for s in stages if s.kind in ("cache", "analyse") and s.disk_bytes is None})
    existing = next(p for p in [config.out, *config.out.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    fits = "fits" if to_write <= free else "DOES NOT FIT: lower data.train_tokens or free disk"
    print(f"disk: caches {human_bytes(total)} in all; still to write {human_bytes(to_write)} (of which analysis latents "
          f"{human_bytes(latents)}, before compression); {human_bytes(free)} free under {existing} ({fits})"
          + (f"; size unknown for {', '.join(unknown)}" if unknown else ""))  # fmt: skip
    seconds = sum(s.seconds or 0 for s in stages if s.status() != "skip")
    print(f"time (estimate): {human_seconds(seconds)} of caching and training, {estimate_basis(rates)}; "
          "lens training and analysis not included")


def sweep(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config), args.set)
    runs = select_runs(config.runs, args.only)
    planner = Planner(config)
    stages = planner.stages(runs)
    if args.stop_after:  # the stages up to that kind, and no report
        stages = [s for s in stages if STAGE_ORDER.index(s.kind) <= STAGE_ORDER.index(args.stop_after)]
        if not stages:
            raise MlsaeError(f"--stop-after {args.stop_after} leaves no stage to run (no run of this sweep trains a "
                             f"{args.stop_after}); stop after a later stage")  # fmt: skip
    if args.dry_run:
        print_plan(config, planner, stages, runs, analysed_runs(planner, config.runs), args.stop_after)
        return 0
    config.out.mkdir(parents=True, exist_ok=True)
    total = len(stages) + 1
    print(f"sweep {config.source}: {len(runs)} runs, {total} stages -> {config.out}", flush=True)
    call = stage_caller(config, args.in_process)
    started = time.perf_counter()
    try:
        problems = execute(stages, call, total)
        fingerprint = analysed_runs(planner, config.runs)
        head = f"[{total}/{total}] report"
        if args.stop_after:
            print(f"{head}: not made (--stop-after {args.stop_after})", flush=True)
        elif not fingerprint:
            print(f"{head}: no analysed run yet, nothing to report", flush=True)
        elif report_is_current(config.out / "report", fingerprint):
            print(f"{head}: {config.out / 'report'} already covers the {len(fingerprint)} analysed runs, skipped", flush=True)
        else:
            print(f"{head} of {len(fingerprint)} analysed runs", flush=True)
            code = write_report(planner, config.runs, fingerprint, call)
            if code != 0:
                problems["report"] = f"failed (exit {code})"
    except Interrupted:
        print("sweep interrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    elapsed = human_seconds(time.perf_counter() - started)
    if problems:
        print(f"sweep finished in {elapsed} with {len(problems)} problem(s):", file=sys.stderr)
        for title, why in problems.items():
            print(f"  {title}: {why}", file=sys.stderr)
        return 1
    done = f"stopped after the {args.stop_after} stages" if args.stop_after else f"report in {config.out / 'report'}"
    print(f"sweep finished in {elapsed}: {done}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mlsae_cache.clitools import OneLineErrorParser

    parser = OneLineErrorParser(prog="sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="sweep config (.toml), e.g. sweeps/tiny.toml or sweeps/paper.toml")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (stages to do or skip, disk and time estimates); run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="run only the runs whose name matches this glob, e.g. 'pythia-70m/*' or '*-lens' (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.train_tokens=100_000_000 --set out=/scratch/sweep")
    parser.add_argument("--in-process", action="store_true",
                        help="run each command in this Python process (faster start for small sweeps; no launcher)")
    parser.add_argument("--stop-after", choices=STOP_AFTER, default=None,
                        help="run only the stages up to this kind (lens < cache < train), no analysis and no report; "
                        "e.g. train every family before the analyses (or on another machine)")
    parser.add_argument("--size-table", action="store_true", help="print the README's table of Pythia sizes and estimated times")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.size_table:
        print(size_table())
        return 0
    if not args.config:
        raise MlsaeError("give a sweep config, e.g. scripts/sweep.py sweeps/tiny.toml (or --size-table)")
    return sweep(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
