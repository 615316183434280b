"""The fault-injection suite (issue 12, item 7): every command through every fault class.

Commands: mlsae-cache (fresh and resumed), mlsae-cache verify, mlsae-train (fresh and --resume),
mlsae-analyse (of a run, and of a SAELens export as an imported baseline), mlsae-analyse report, the HTML
page rebuild, mlsae-lens train (fresh and resumed) and eval, mlsae-export saelens, scripts/sweep.py. Fault
classes, each one parametrized test (one test id per case):

- ``test_output_fault``: a read-only output folder (EACCES) and a full disk (ENOSPC, at once and after a
  few files were written); the same command once the fault is gone must then finish to the exact output
  of an undisturbed run. Also read-only *inputs*, which must simply work.
- ``test_signal``: SIGINT and SIGKILL at a seeded random point of a subprocess; the same command again
  (``--resume`` for the trainer) finishes to a byte-identical output.
- ``test_damaged_file``: every kind of file the pipeline writes, truncated and bit-flipped, then read by
  each command that reads it; ``test_every_written_file_kind_has_a_damage_case`` keeps that list complete.
- ``test_non_finite_shard``: a NaN in a shard whose recorded checksum is right.
- ``test_wrong_kind_of_path``: a file for a folder, a run for a cache, a cache for a run, ...

``test_injected_faults_are_real`` checks the injectors themselves (tests/faults.py).

Each case asserts: a non-zero exit with exactly one ``error:`` line and no traceback, or a correct result
(byte-identical to the undisturbed output); and every file written before the fault byte-identical after
it. Commands run in this process through their ``main(argv)`` (fast); signals go to child processes forked
from one that imported every command once (tests/faults.py: Zygote). The tiny
pipeline (a 2-layer GPT-NeoX of width 16, 256 tokens) is built once per module.
``test_case_count`` states the number of cases: 211 (38 output faults, 12 signals, 104 damaged files,
2 non-finite shards, 55 wrong kinds of path).
"""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import re
import shutil
import signal
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from faults import (
    DAMAGES, FRESH_PROCESS_TORCH_SEED, REPO, Outcome, Zygote, assert_one_line_failure, assert_unchanged, call_main,
    digest_hex, failing_writes, finish, flip_byte, signal_at_random_point, snapshot, truncate,
)  # fmt: skip
from models import build_tiny_model, write_english

from mlsae_analysis import html_report
from mlsae_analysis.cli import main as analyse_main
from mlsae_cache import lens_train
from mlsae_cache import shard_format as sf
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lens_cli import main as lens_main
from mlsae_export.cli import main as export_main
from mlsae_train.cli import main as train_main
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import train

_spec = importlib.util.spec_from_file_location("sweep_script_for_faults", REPO / "scripts" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep_script_for_faults"] = sweep
_spec.loader.exec_module(sweep)

SEQ_LEN, N_SEQUENCES = 16, 16
TRAIN_OPTIONS = {"expansion_factor": 2, "k": 4, "batch_tokens": 32, "save_every_tokens": 64, "lr": 1e-3}
UNFINISHED_STEPS = 3  # the unfinished run was stopped after 3 of its ~7 steps (its last checkpoint: step 2)
LENS_OPTIONS = ["--seq-len", str(SEQ_LEN), "--batch-size", "2", "--tokens", str(SEQ_LEN * 8), "--eval-tokens", str(SEQ_LEN * 4),
                "--steps", "4", "--checkpoint-every", "2", "--device", "cpu"]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The tiny pipeline, built once; each case works on its own copy


@dataclass
class World:
    root: Path
    cache: Path
    unfinished_cache: Path
    """The cache as a kill after its third shard leaves it: no manifest, shards 0-2 with their sidecars."""
    run: Path
    unfinished_run: Path
    analysis: Path
    report: Path
    lens: Path
    unfinished_lens: Path
    lens_cache: Path
    saelens: Path
    """The run exported by ``mlsae-export saelens``: one SAELens SAE folder per layer."""
    model: Path
    text: Path
    saelens_analysis: Path | None = None
    """``saelens`` analysed as an imported per-layer baseline: compared with, never copied."""

    ARTIFACTS = ("cache", "unfinished_cache", "run", "unfinished_run", "analysis", "report", "lens", "unfinished_lens", "lens_cache",
                 "saelens")  # fmt: skip

    def copy(self, dest: Path) -> "World":
        """Every artifact copied under ``dest`` (same names); the model and the text stay shared inputs."""
        moved = {}
        for name in self.ARTIFACTS:
            shutil.copytree(getattr(self, name), dest / name, symlinks=True)
            moved[name] = dest / name
        return replace(self, root=dest, **moved)


def cache_argv(w: World, out: Path, *extra: str) -> list[str]:
    return ["--model", str(w.model), "--dataset", str(w.text), "--out", str(out), "--seq-len", str(SEQ_LEN),
            "--tokens", str(SEQ_LEN * N_SEQUENCES), "--batch-size", "4", "--shard-mb", "0.004", "--device", "cpu",
            "--no-progress", *extra]  # fmt: skip


def train_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    options = [f"--{k.replace('_', '-')}={v}" if k != "k" else f"-k={v}" for k, v in TRAIN_OPTIONS.items()]
    return ["--shards", str(shards), "--out", str(out), *options, "--device", "cpu", "--no-progress", *extra]


def analyse_argv(run: Path, shards: Path, out: Path) -> list[str]:
    return ["--run", str(run), "--shards", str(shards), "--out", str(out), "--no-downstream", "--no-progress"]


def export_saelens_argv(run: Path, out: Path) -> list[str]:
    return ["saelens", str(run), "--out", str(out)]


def lens_train_argv(w: World, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(w.model), "--dataset", str(w.text), "--out", str(out), *LENS_OPTIONS, "--no-progress", *extra]


def lens_eval_argv(w: World, lens: Path) -> list[str]:
    # with progress: the KL table it prints is the result compared
    return ["eval", "--model", str(w.model), "--dataset", str(w.text), "--lens", str(lens), "--seq-len", str(SEQ_LEN),
            "--batch-size", "2", "--tokens", str(SEQ_LEN * 4), "--device", "cpu"]  # fmt: skip


def write_sweep_config(w: World, folder: Path, out: Path) -> Path:
    """A sweep whose one run is the world's: its train cache and SAE equal the world's (a small test split)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "sweep.toml"
    config.write_text(f"""
out = "{out}"
[data]
dataset = "{w.text}"
train_tokens = {SEQ_LEN * N_SEQUENCES}
test_tokens = {SEQ_LEN * 4}
[cache]
seq_len = {SEQ_LEN}
batch_size = 4
shard_mb = 0.004
device = "cpu"
progress = false
[train]
batch_tokens = {TRAIN_OPTIONS['batch_tokens']}
save_every_tokens = {TRAIN_OPTIONS['save_every_tokens']}
lr = {TRAIN_OPTIONS['lr']}
device = "cpu"
progress = false
[analyse]
downstream = false
progress = false
[[models]]
name = "tiny"
path = "{w.model}"
[[grid]]
models = ["tiny"]
expansion_factor = {TRAIN_OPTIONS['expansion_factor']}
k = {TRAIN_OPTIONS['k']}
""")
    return config


def sweep_argv(config: Path) -> list[str]:
    return ["--in-process", str(config)]


class _NoCapture:
    """capsys for the module fixture, which cannot use the function-scoped one."""

    def readouterr(self):
        return type("Captured", (), {"out": "", "err": ""})()


def _must(main, argv) -> None:
    outcome = call_main(main, argv, _NoCapture())
    assert outcome.code == 0, f"building the tiny pipeline failed: {argv}\n{outcome.describe()}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, pythia_tokenizer_dir) -> World:
    root = tmp_path_factory.mktemp("faults")
    model = build_tiny_model(root / "model", pythia_tokenizer_dir, n_layers=2, d_model=16, context=64)
    text = write_english(root / "text", n_files=3, words_per_file=300)
    w = World(root, *(root / name for name in World.ARTIFACTS), model=model, text=text)
    _must(cache_main, cache_argv(w, w.cache))
    shutil.copytree(w.cache, w.unfinished_cache)
    (w.unfinished_cache / "manifest.json").unlink()
    for name in ("shard-000003.h5", "shard-000003.json"):
        (w.unfinished_cache / "shards" / name).unlink()
    _must(train_main, train_argv(w.cache, w.run))
    unfinished = TrainConfig(shards=[str(w.cache)], out=str(w.unfinished_run), device="cpu", progress=False, **TRAIN_OPTIONS)
    torch.manual_seed(FRESH_PROCESS_TORCH_SEED)  # as the command would start: its checkpoint holds this generator
    train(unfinished, stop_after_steps=UNFINISHED_STEPS)
    _must(analyse_main, analyse_argv(w.run, w.cache, w.analysis))
    _must(analyse_main, ["report", str(w.analysis), "--out", str(w.report)])
    _must(lens_main, lens_train_argv(w, w.lens))
    _build_unfinished_lens(w)
    _must(cache_main, cache_argv(w, w.lens_cache, "--lens", str(w.lens)))
    _must(export_main, export_saelens_argv(w.run, w.saelens))
    w.saelens_analysis = root / "saelens_analysis"
    _must(analyse_main, analyse_argv(w.saelens, w.cache, w.saelens_analysis))
    w.shared_inputs = snapshot(w.model, w.text)  # every case reads these in place; the last test checks them
    return w


def _build_unfinished_lens(w: World) -> None:
    """A lens training stopped by Ctrl-C after its step-2 checkpoint."""
    real, calls = lens_train.lens_targets, []

    def interrupt_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    lens_train.lens_targets = interrupt_at_step_three
    try:
        code = call_main(lens_main, lens_train_argv(w, w.unfinished_lens), _NoCapture()).code
    finally:
        lens_train.lens_targets = real
    assert code == 130 and (w.unfinished_lens / lens_train.CHECKPOINT_FILE).exists()


@pytest.fixture(scope="module")
def lens_eval_stdout(world) -> str:
    """What mlsae-lens eval prints for the undamaged lens (its KL table)."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert lens_main(lens_eval_argv(world, world.lens)) == 0
    return buffer.getvalue()


@pytest.fixture
def w(world, tmp_path) -> World:
    return world.copy(tmp_path / "w")


# ----------------------------------------------------------------------------------------------------
# Results: what an undisturbed command writes, normalised for where the copy lives

UNSTABLE_SUFFIXES = (".pdf",)  # matplotlib stamps a creation date into PDFs


def result_files(
    folder: Path, names: tuple[str, ...] | None = None, case_root: Path | None = None, world_root: Path | None = None
) -> dict[str, bytes]:
    """{relative path: bytes} of a command's output (the given names, or every stable file), with the
    copy's root path written as the world's, so that a copy's output compares with the original.
    A torch file compares by its tensors: torch.save names its zip records after the (temporary) file name."""
    folder = Path(folder)
    paths = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*") if p.is_file())
    found = {}
    for path in paths:
        if path.suffix in UNSTABLE_SUFFIXES or not path.exists():
            continue
        data = path.read_bytes()
        if path.name == CHECKSUM_RECORD:
            data = _checked_record(path)
        elif path.suffix == ".pt":
            data = _tensor_bytes(torch.load(path, map_location="cpu", weights_only=True))
        elif case_root is not None:
            data = data.replace(str(case_root).encode(), str(world_root).encode())
        found[str(path.relative_to(folder))] = data
    return found


CHECKSUM_RECORD = "checksums.json"


def _checked_record(record: Path) -> bytes:
    """A folder's checksum record as {file: whether its size and digest match the file now}: the record of
    files that hold paths or dates differs between two correct runs, its truth does not."""
    files = json.loads(record.read_text())["files"]
    checked = {}
    for name, entry in sorted(files.items()):
        path = record.parent / name
        algorithm, _, digest = entry["digest"].partition(":")
        actual = digest_hex(path, algorithm) if path.is_file() else None
        checked[name] = path.is_file() and entry["bytes"] == path.stat().st_size and actual == digest
    return json.dumps(checked, sort_keys=True).encode()


def _tensor_bytes(obj) -> bytes:
    """Name, dtype, shape and bytes of every tensor of a (nested) state dict, in key order."""
    if isinstance(obj, dict):
        return b"".join(str(key).encode() + b"=" + _tensor_bytes(obj[key]) for key in sorted(obj, key=str))
    if torch.is_tensor(obj):
        t = obj.detach().contiguous()
        return f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return repr(obj).encode()


RUN_RESULT = ("sae.safetensors", "checkpoint.safetensors")
LENS_RESULT = ("params.pt", "config.json")
REPORT_RESULT = ("tables.csv", "table1.csv", "table2.csv", "variance_ratios.csv", "per_layer.csv")


def assert_same_result(produced: dict[str, bytes], expected: dict[str, bytes], what: str) -> None:
    assert set(produced) == set(expected), f"{what}: files differ: {sorted(set(produced) ^ set(expected))}"
    differing = sorted(name for name in expected if produced[name] != expected[name])
    assert not differing, f"silent wrong result: {what} exited 0 but {differing} differ from the undisturbed output"


def check_failure_or_correct(outcome: Outcome, produced: Callable[[], dict[str, bytes]], expected: dict[str, bytes] | None,
                             what: str, *fragments: str) -> None:  # fmt: skip
    """Either one clean error line, or (exit 0) exactly the undisturbed output; ``expected`` None: only failing is right."""
    assert not outcome.has_traceback, outcome.describe()
    if outcome.code == 0 and expected is not None:
        assert_same_result(produced(), expected, what)
        return
    assert outcome.code != 0, f"silent wrong result: {what} exited 0\n{outcome.describe()}"
    assert_one_line_failure(outcome, *fragments)


# ----------------------------------------------------------------------------------------------------
# 1. Read-only and full output folders


@dataclass
class OutputCase:
    """A command whose writes under ``root`` fail; ``result`` checks a finished rerun against the world."""

    main: Callable
    argv: Callable[[World, Path], list[str]]
    root: Callable[[World, Path], Path]
    result: Callable[[World, Path, World], None] | None
    """Checks the rerun's output (after the fault is gone) against the undisturbed one."""
    inputs_only: bool = False
    """The faulted folder holds only inputs: the command must succeed."""


def _check_cache(out: Path, case: World, world: World) -> None:
    assert_same_result(result_files(out, None, case.root, world.root), result_files(world.cache), "mlsae-cache")


def _check_run(out: Path, case: World, world: World) -> None:
    assert_same_result(result_files(out, RUN_RESULT, case.root, world.root), result_files(world.run, RUN_RESULT), "mlsae-train")


def _check_analysis(out: Path, case: World, world: World) -> None:
    assert_same_result(result_files(out, None, case.root, world.root), result_files(world.analysis), "mlsae-analyse")


def _check_lens(out: Path, case: World, world: World) -> None:
    assert_same_result(result_files(out, LENS_RESULT, case.root, world.root), result_files(world.lens, LENS_RESULT), "mlsae-lens train")


def _check_report(out: Path, case: World, world: World) -> None:
    produced = result_files(out, REPORT_RESULT, case.root, world.root)
    assert_same_result(produced, result_files(world.report, REPORT_RESULT), "mlsae-analyse report")


def _check_saelens(out: Path, case: World, world: World) -> None:
    assert_same_result(result_files(out, None, case.root, world.root), result_files(world.saelens), "mlsae-export saelens")


def _check_sweep(out: Path, case: World, world: World) -> None:
    run = out / "runs" / "tiny" / f"R{TRAIN_OPTIONS['expansion_factor']}-k{TRAIN_OPTIONS['k']}"
    # the weights only: the checkpoint holds torch's global generator, which the sweep's cache stages drew from
    assert_same_result(result_files(run, ("sae.safetensors",)), result_files(world.run, ("sae.safetensors",)), "sweep.py (its run)")
    assert_same_result(result_files(out / "caches" / "tiny" / "train"), result_files(world.cache), "sweep.py (its train cache)")


def _sweep_argv(w: World, tmp: Path) -> list[str]:
    return sweep_argv(write_sweep_config(w, tmp / "config", tmp / "out" / "sweep"))


OUTPUT_COMMANDS: dict[str, OutputCase] = {
    "mlsae-cache": OutputCase(cache_main, lambda w, t: cache_argv(w, t / "out" / "cache"), lambda w, t: t / "out",
                              lambda w, t, world: _check_cache(t / "out" / "cache", w, world)),
    "mlsae-cache-resume": OutputCase(cache_main, lambda w, t: cache_argv(w, w.unfinished_cache), lambda w, t: w.unfinished_cache,
                                     lambda w, t, world: _check_cache(w.unfinished_cache, w, world)),
    "mlsae-train": OutputCase(train_main, lambda w, t: train_argv(w.cache, t / "out" / "run"), lambda w, t: t / "out",
                              lambda w, t, world: _check_run(t / "out" / "run", w, world)),
    "mlsae-train-resume": OutputCase(train_main, lambda w, t: train_argv(w.cache, w.unfinished_run, "--resume"),
                                     lambda w, t: w.unfinished_run, lambda w, t, world: _check_run(w.unfinished_run, w, world)),
    "mlsae-analyse": OutputCase(analyse_main, lambda w, t: analyse_argv(w.run, w.cache, t / "out" / "analysis"), lambda w, t: t / "out",
                                lambda w, t, world: _check_analysis(t / "out" / "analysis", w, world)),
    "mlsae-analyse-report": OutputCase(analyse_main, lambda w, t: ["report", str(w.analysis), "--out", str(t / "out" / "report")],
                                       lambda w, t: t / "out", lambda w, t, world: _check_report(t / "out" / "report", w, world)),
    "html-page-rebuild": OutputCase(html_report.main, lambda w, t: [str(w.analysis)], lambda w, t: w.analysis, None),
    "mlsae-lens-train": OutputCase(lens_main, lambda w, t: lens_train_argv(w, t / "out" / "lens"), lambda w, t: t / "out",
                                   lambda w, t, world: _check_lens(t / "out" / "lens", w, world)),
    "mlsae-lens-train-resume": OutputCase(lens_main, lambda w, t: lens_train_argv(w, w.unfinished_lens), lambda w, t: w.unfinished_lens,
                                          lambda w, t, world: _check_lens(w.unfinished_lens, w, world)),
    "sweep.py": OutputCase(sweep.main, _sweep_argv, lambda w, t: t / "out", lambda w, t, world: _check_sweep(t / "out" / "sweep", w, world)),
    "mlsae-export-saelens": OutputCase(export_main, lambda w, t: export_saelens_argv(w.run, t / "out" / "saelens"), lambda w, t: t / "out",
                                       lambda w, t, world: _check_saelens(t / "out" / "saelens", w, world)),
}  # fmt: skip

READ_ONLY_INPUTS: dict[str, OutputCase] = {
    "mlsae-cache-verify": OutputCase(cache_main, lambda w, t: ["verify", str(w.cache)], lambda w, t: w.cache, None, True),
    "mlsae-train-from-read-only-cache": OutputCase(train_main, lambda w, t: train_argv(w.cache, t / "out" / "run"), lambda w, t: w.cache,
                                                   lambda w, t, world: _check_run(t / "out" / "run", w, world), True),
    "mlsae-analyse-of-read-only-run-and-cache": OutputCase(
        analyse_main, lambda w, t: analyse_argv(w.run, w.cache, t / "out" / "analysis"), lambda w, t: w.root,
        lambda w, t, world: _check_analysis(t / "out" / "analysis", w, world), True),
    "mlsae-lens-eval-of-read-only-lens": OutputCase(lens_main, lambda w, t: lens_eval_argv(w, w.lens), lambda w, t: w.lens, None, True),
    "mlsae-export-saelens-of-read-only-run": OutputCase(
        export_main, lambda w, t: export_saelens_argv(w.run, t / "out" / "saelens"), lambda w, t: w.run,
        lambda w, t, world: _check_saelens(t / "out" / "saelens", w, world), True),
}  # fmt: skip

# (fault, writes allowed before it) -> id
OUTPUT_FAULTS = {"read-only": (errno.EACCES, 0), "disk-full-at-once": (errno.ENOSPC, 0), "disk-full-midway": (errno.ENOSPC, 2)}
OUTPUT_CASES = [pytest.param(fault, command, id=f"{fault}/{command}") for fault in OUTPUT_FAULTS for command in OUTPUT_COMMANDS]
OUTPUT_CASES += [pytest.param("read-only", command, id=f"read-only-input/{command}") for command in READ_ONLY_INPUTS]


def assert_clean_failure(command: str, outcome: Outcome) -> None:
    """One error line; the sweep runs several commands and prints one line for each that failed."""
    if command != "sweep.py":
        assert_one_line_failure(outcome)
        return
    assert not outcome.has_traceback and outcome.code != 0, outcome.describe()
    failed_stages = [line for line in outcome.stderr.splitlines() if re.search(r": failed \(exit -?\d+\)", line)]
    assert len(outcome.error_lines) == max(1, len(failed_stages)), outcome.describe()


def rerun_argv(command: str, argv: list[str]) -> list[str]:
    """The command a user runs next: the trainer continues a started run only with --resume."""
    if command.startswith("mlsae-train") and "--resume" not in argv:
        out = Path(argv[argv.index("--out") + 1])
        if (out / "config.json").exists():
            return [*argv, "--resume"]
    return argv


@pytest.mark.parametrize("fault, command", OUTPUT_CASES)
def test_output_fault(fault, command, world, w, tmp_path, capsys, monkeypatch):
    case = OUTPUT_COMMANDS.get(command) or READ_ONLY_INPUTS[command]
    code, after = OUTPUT_FAULTS[fault]
    argv = case.argv(w, tmp_path)
    root = case.root(w, tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    # a resumed run or lens moves its own checkpoint on (and drops the log lines after it): the rerun
    # below proves those files consistent; every other file must stay as it was
    resumed = root if command.endswith("-resume") else None

    def state() -> dict[str, str]:
        return {k: v for k, v in snapshot(tmp_path).items() if resumed is None or not Path(k).is_relative_to(resumed)}

    before = state()
    with failing_writes(monkeypatch, root, code, after) as failed:
        outcome = call_main(case.main, argv, capsys)
    assert not outcome.has_traceback, outcome.describe()
    assert_unchanged(before, state())
    if case.inputs_only or not failed:  # read-only inputs, or a command that wrote too few files to meet the fault
        assert outcome.code == 0, f"{command} failed though no write of its own failed\n{outcome.describe()}"
        if case.result is not None:
            case.result(w, tmp_path, world)
        return
    assert_clean_failure(command, outcome)
    if fault == "disk-full-midway" and case.result is not None:
        # the disk has room again: the command the user is told to run finishes to the undisturbed output
        rerun = call_main(case.main, rerun_argv(command, argv), capsys)
        assert rerun.code == 0, rerun.describe()
        case.result(w, tmp_path, world)


# ----------------------------------------------------------------------------------------------------
# 2. SIGINT and SIGKILL at a random point of a subprocess


@dataclass
class SignalCase:
    target: str
    """What the zygote runs: module:function, or a script's path (its main)."""
    main: Callable
    argv: Callable[[World, Path], list[str]]
    started: Callable[[World, Path], Callable[[], bool]]
    """True once the command has begun writing (the random point is drawn after it)."""
    window_s: float
    """About how long the command writes on this machine: the signal lands in [0, window_s) after it began."""
    rerun_argv: Callable[[World, Path], list[str]]
    result: Callable[[World, Path, World], None]


def _train_rerun(w: World, t: Path) -> list[str]:
    out = t / "out" / "run"
    return train_argv(w.cache, out, "--resume") if (out / "config.json").exists() else train_argv(w.cache, out)


def _partial_of(out: Path) -> Callable[[], bool]:
    return lambda: out.exists() or any(out.parent.glob(f".{out.name}.partial-*"))


SIGNAL_COMMANDS: dict[str, SignalCase] = {
    "mlsae-cache": SignalCase("mlsae_cache.cli:main", cache_main, lambda w, t: cache_argv(w, t / "out" / "cache"),
                              lambda w, t: (t / "out" / "cache" / "config.json").exists, 0.5,
                              lambda w, t: cache_argv(w, t / "out" / "cache"), lambda w, t, world: _check_cache(t / "out" / "cache", w, world)),
    "mlsae-train": SignalCase("mlsae_train.cli:main", train_main, lambda w, t: train_argv(w.cache, t / "out" / "run"),
                              lambda w, t: (t / "out" / "run" / "config.json").exists, 0.8, _train_rerun,
                              lambda w, t, world: _check_run(t / "out" / "run", w, world)),
    "mlsae-analyse": SignalCase("mlsae_analysis.cli:main", analyse_main, lambda w, t: analyse_argv(w.run, w.cache, t / "out" / "analysis"),
                                lambda w, t: _partial_of(t / "out" / "analysis"), 2.5,
                                lambda w, t: analyse_argv(w.run, w.cache, t / "out" / "analysis"),
                                lambda w, t, world: _check_analysis(t / "out" / "analysis", w, world)),
    "mlsae-lens-train": SignalCase("mlsae_cache.lens_cli:main", lens_main, lambda w, t: lens_train_argv(w, t / "out" / "lens"),
                                   lambda w, t: (t / "out" / "lens").exists, 1.5, lambda w, t: lens_train_argv(w, t / "out" / "lens"),
                                   lambda w, t, world: _check_lens(t / "out" / "lens", w, world)),
    "mlsae-export-saelens": SignalCase("mlsae_export.cli:main", export_main, lambda w, t: export_saelens_argv(w.run, t / "out" / "saelens"),
                                       lambda w, t: _partial_of(t / "out" / "saelens"), 0.3,
                                       lambda w, t: export_saelens_argv(w.run, t / "out" / "saelens"),
                                       lambda w, t, world: _check_saelens(t / "out" / "saelens", w, world)),
    "sweep.py": SignalCase(str(REPO / "scripts" / "sweep.py"), sweep.main, _sweep_argv, lambda w, t: (t / "out" / "sweep").exists, 6.0,
                           lambda w, t: sweep_argv(t / "config" / "sweep.toml"), lambda w, t, world: _check_sweep(t / "out" / "sweep", w, world)),
}  # fmt: skip
SIGNALS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}


@pytest.fixture(scope="module")
def zygote():
    preload = ["mlsae_cache.runner", "mlsae_train.trainer", "mlsae_cache.lens_train", "transformers.models.gpt_neox.modeling_gpt_neox"]
    forker = Zygote([case.target for case in SIGNAL_COMMANDS.values()], preload)
    yield forker
    forker.close()


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("command", SIGNAL_COMMANDS)
def test_signal(command, sig, world, w, tmp_path, capsys, zygote):
    case = SIGNAL_COMMANDS[command]
    signum = SIGNALS[sig]
    (tmp_path / "out").mkdir()
    argv = case.argv(w, tmp_path)
    inputs = snapshot(w.root)
    child, out, err = zygote.run(case.target, argv, tmp_path / "logs")
    signal_at_random_point(child, case.started(w, tmp_path), signum, seed=f"{command}/{sig}", window_s=case.window_s)
    outcome = finish(child, out, err)
    assert not outcome.has_traceback, outcome.describe()
    if signum == signal.SIGINT:  # Ctrl-C: it finished, or it stopped saying so in one line
        assert outcome.code in (0, 130, -signal.SIGINT), outcome.describe()
        said = [line for line in outcome.stderr.splitlines() if line.startswith(("error:", "interrupted"))]
        assert len(said) == (0 if outcome.code == 0 else 1), outcome.describe()
    else:
        assert outcome.code in (0, -signal.SIGKILL), outcome.describe()
    assert_unchanged(inputs, snapshot(w.root))
    if outcome.code != 0:  # stopped: the same command (--resume for the trainer) finishes the job
        rerun = call_main(case.main, case.rerun_argv(w, tmp_path), capsys)
        assert rerun.code == 0, rerun.describe()
    case.result(w, tmp_path, world)
    leftovers = [p.name for p in tmp_path.joinpath("out").rglob(".*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    assert not leftovers, f"the rerun left debris of the {sig}ed run: {leftovers}"


# ----------------------------------------------------------------------------------------------------
# 3. Every kind of written file, truncated and bit-flipped, then read


@dataclass
class Reader:
    """A command that reads an artifact of the world copy; ``expected`` gives the undisturbed result
    (None: the damage must be reported, a silent exit 0 is wrong)."""

    run: Callable[[World, Path, object], Outcome]
    produced: Callable[[World, Path, World], dict[str, bytes]] | None
    expected: Callable[[World, str], dict[str, bytes]] | None


def _analysis_result(w: World, t: Path, world: World) -> dict[str, bytes]:
    return result_files(t / "out" / "analysis", case_root=w.root, world_root=world.root)


READERS: dict[str, Reader] = {
    "verify": Reader(lambda w, t, c: call_main(cache_main, ["verify", str(w.cache)], c), None, None),
    "train": Reader(lambda w, t, c: call_main(train_main, train_argv(w.cache, t / "out" / "run"), c),
                    lambda w, t, world: result_files(t / "out" / "run", RUN_RESULT), lambda world, _: result_files(world.run, RUN_RESULT)),
    "resume": Reader(lambda w, t, c: call_main(train_main, train_argv(w.cache, w.unfinished_run, "--resume"), c),
                     lambda w, t, world: result_files(w.unfinished_run, RUN_RESULT), lambda world, _: result_files(world.run, RUN_RESULT)),
    "analyse": Reader(lambda w, t, c: call_main(analyse_main, analyse_argv(w.run, w.cache, t / "out" / "analysis"), c),
                      _analysis_result, lambda world, _: result_files(world.analysis)),
    "cache-resume": Reader(lambda w, t, c: call_main(cache_main, cache_argv(w, w.unfinished_cache), c),
                           lambda w, t, world: result_files(w.unfinished_cache, None, w.root, world.root), lambda world, _: result_files(world.cache)),
    "lens-eval": Reader(lambda w, t, c: call_main(lens_main, lens_eval_argv(w, w.lens), c), None, None),  # stdout compared below
    "cache-with-lens": Reader(lambda w, t, c: call_main(cache_main, cache_argv(w, t / "out" / "lens_cache", "--lens", str(w.lens)), c),
                              lambda w, t, world: result_files(t / "out" / "lens_cache", case_root=w.root, world_root=world.root),
                              lambda world, _: result_files(world.lens_cache)),
    "lens-rerun": Reader(lambda w, t, c: call_main(lens_main, lens_train_argv(w, w.lens), c),
                         lambda w, t, world: result_files(w.lens, None, w.root, world.root), lambda world, _: result_files(world.lens)),
    "lens-resume": Reader(lambda w, t, c: call_main(lens_main, lens_train_argv(w, w.unfinished_lens), c),
                          lambda w, t, world: result_files(w.unfinished_lens, LENS_RESULT, w.root, world.root), lambda world, _: result_files(world.lens, LENS_RESULT)),
    "report": Reader(lambda w, t, c: call_main(analyse_main, ["report", str(w.analysis), "--out", str(t / "out" / "report")], c),
                     lambda w, t, world: result_files(t / "out" / "report", REPORT_RESULT, w.root, world.root), lambda world, _: result_files(world.report, REPORT_RESULT)),
    "html-page-rebuild": Reader(lambda w, t, c: call_main(html_report.main, [str(w.analysis)], c),
                                lambda w, t, world: result_files(w.analysis, ("report.html",), w.root, world.root),
                                lambda world, _: result_files(world.analysis, ("report.html",))),
    "export-saelens": Reader(lambda w, t, c: call_main(export_main, export_saelens_argv(w.run, t / "out" / "saelens"), c),
                             lambda w, t, world: result_files(t / "out" / "saelens", None, w.root, world.root),
                             lambda world, _: result_files(world.saelens)),
    "analyse-imported": Reader(lambda w, t, c: call_main(analyse_main, analyse_argv(w.saelens, w.cache, t / "out" / "analysis"), c),
                               _analysis_result, lambda world, _: result_files(world.saelens_analysis)),
}  # fmt: skip

# (artifact, file inside it) -> the commands that read it
DAMAGE_TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("cache", "config.json"): ("verify", "train"),
    ("cache", "manifest.json"): ("verify", "train", "analyse"),
    ("cache", "shards/shard-000001.h5"): ("verify", "train", "analyse"),
    ("cache", "shards/shard-000001.json"): ("verify", "train"),
    ("unfinished_cache", "config.json"): ("cache-resume",),
    ("unfinished_cache", "shards/shard-000001.h5"): ("cache-resume",),
    ("unfinished_cache", "shards/shard-000001.json"): ("cache-resume",),
    ("run", "sae.safetensors"): ("analyse", "export-saelens"),
    ("run", "config.json"): ("analyse", "export-saelens"),
    ("run", "checkpoint.safetensors"): ("analyse",),
    ("unfinished_run", "config.json"): ("resume",),
    ("unfinished_run", "sae.safetensors"): ("resume",),
    ("unfinished_run", "checkpoint.safetensors"): ("resume",),
    ("unfinished_run", "metrics.jsonl"): ("resume",),
    ("unfinished_run", "checksums.json"): ("resume",),
    ("run", "checksums.json"): ("analyse", "export-saelens"),
    ("lens", "params.pt"): ("lens-eval", "cache-with-lens"),
    ("lens", "config.json"): ("lens-eval", "cache-with-lens"),
    ("lens", "training.json"): ("lens-rerun",),
    ("lens", "checksums.json"): ("lens-eval", "cache-with-lens"),
    ("unfinished_lens", "checkpoint.pt"): ("lens-resume",),
    ("analysis", "summary.json"): ("report", "html-page-rebuild"),
    ("analysis", "checksums.json"): ("report", "html-page-rebuild"),
    ("analysis", "metrics.csv"): ("report", "html-page-rebuild"),
    ("analysis", "mmcs.csv"): ("html-page-rebuild",),
    ("analysis", "residual.csv"): ("html-page-rebuild",),
    ("analysis", "variance_ratios.csv"): ("report",),
    ("analysis", "latent_layers.parquet"): ("report", "html-page-rebuild"),
    ("analysis", "examples.parquet"): ("html-page-rebuild",),
    ("analysis", "token_texts.parquet"): ("html-page-rebuild",),
    ("analysis", "neighbours.parquet"): ("html-page-rebuild",),
    ("analysis", "layer_distributions.parquet"): ("html-page-rebuild",),
    ("analysis", "latents/part-00000.parquet"): ("html-page-rebuild",),
    ("analysis", "latents/tokens.parquet"): ("html-page-rebuild",),
    ("saelens", "blocks.1.hook_resid_post/cfg.json"): ("analyse-imported",),
    ("saelens", "blocks.1.hook_resid_post/sae_weights.safetensors"): ("analyse-imported",),
}
DAMAGE_CASES = [
    pytest.param(artifact, name, reader, damage, id=f"{damage}/{artifact}/{name}/{reader}")
    for (artifact, name), readers in DAMAGE_TARGETS.items()
    for reader in readers
    for damage in DAMAGES
]


def test_a_damaged_run_config_that_is_still_valid_json_is_named_before_its_settings_are_compared(w, capsys):
    """A flipped digit in a setting leaves valid JSON that reads as another setting: --resume must call the
    file damaged, not the command's settings different (a flip at one offset once gave exactly that)."""
    config = w.unfinished_run / "config.json"
    text = config.read_text()
    assert '"lr": 0.001' in text
    before = snapshot(w.unfinished_run)
    config.write_text(text.replace('"lr": 0.001', '"lr": 0.002', 1))
    outcome = call_main(train_main, train_argv(w.cache, w.unfinished_run, "--resume"), capsys)
    assert_clean_failure("mlsae-train --resume", outcome)
    assert "config.json is damaged" in outcome.error_lines[0] and "--lr" not in outcome.error_lines[0]
    assert {k: v for k, v in snapshot(w.unfinished_run).items() if not k.endswith("config.json")} == {
        k: v for k, v in before.items() if not k.endswith("config.json")}  # fmt: skip


EXPORTED_CFG_EDITS = {"renamed-normalisation-key": ('\n "normalize_activations"', '\n "Normalize_activations"'),
                      "k-4-to-5": ('\n "k": 4,', '\n "k": 5,')}  # fmt: skip


@pytest.mark.parametrize("edit", EXPORTED_CFG_EDITS)
def test_a_damaged_exported_cfg_that_is_still_valid_json_is_named(edit, w, tmp_path, capsys):
    """One flipped bit can leave an exported cfg.json valid JSON that reads as another SAE: a renamed
    normalize_activations key reads as no normalisation (the whole analysis silently wrong, exit 0, before its
    digest was recorded in sae_weights.safetensors), and k 4 -> 5 of one imported layer passes every shape check."""
    folder = w.saelens / "blocks.1.hook_resid_post"
    config = folder / "cfg.json"
    old, new = EXPORTED_CFG_EDITS[edit]
    text = config.read_text()
    differing = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(differing) == 1 and bin(ord(differing[0][0]) ^ ord(differing[0][1])).count("1") == 1  # one flipped bit
    assert text.count(old) == 1
    config.write_text(text.replace(old, new))
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    outcome = call_main(analyse_main, analyse_argv(folder, w.cache, tmp_path / "out" / "analysis"), capsys)
    assert_one_line_failure(outcome, f"{config} is damaged")
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("artifact, name, reader, damage", DAMAGE_CASES)
def test_damaged_file(artifact, name, reader, damage, world, w, tmp_path, capsys, lens_eval_stdout):
    target = getattr(w, artifact) / name
    assert target.is_file(), f"the pipeline no longer writes {artifact}/{name}: update DAMAGE_TARGETS"
    DAMAGES[damage](target)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    spec = READERS[reader]
    outcome = spec.run(w, tmp_path, capsys)
    if reader == "lens-eval":  # no file written: what it prints is its result
        check_failure_or_correct(outcome, lambda: {"stdout": outcome.stdout.encode()}, {"stdout": lens_eval_stdout.encode()}, reader)
    else:
        expected = spec.expected(world, name) if spec.expected else None
        check_failure_or_correct(outcome, lambda: spec.produced(w, tmp_path, world), expected, f"{reader} of a {damage} {artifact}/{name}")
    if outcome.code != 0:
        assert_unchanged(before, snapshot(tmp_path))
        # the line names the damaged file (a damaged checksum record makes the files it covers look damaged)
        named = target.name in outcome.error_lines[0] or (target.name == CHECKSUM_RECORD and "checksum" in outcome.error_lines[0])
        assert named, f"the error does not name {target.name}: {outcome.error_lines[0]}"


# files no command reads back as data: figures (PNG, PDF) and the pages made of them
NOT_READ_BACK = ("*.png", "*.pdf", "report.html")


def test_every_written_file_kind_has_a_damage_case(world):
    """A file kind the pipeline starts writing (a checksum file, a new table) needs its own damage cases."""
    covered = {(artifact, name) for artifact, name in DAMAGE_TARGETS}
    uncovered = []
    for artifact in ("cache", "run", "unfinished_run", "analysis", "lens", "unfinished_lens", "saelens"):
        folder = getattr(world, artifact)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = str(path.relative_to(folder))
            kind = name.replace("000000", "000001").replace("000002", "000001").replace("000003", "000001")
            kind = re.sub(r"^blocks\.\d+\.", "blocks.1.", kind)  # one SAELens folder per layer, all alike
            if any(path.match(pattern) for pattern in NOT_READ_BACK):
                continue
            alike = {artifact, artifact.replace("unfinished_", ""), f"unfinished_{artifact}"}  # the same files
            if not any((other, kind) in covered for other in alike):
                uncovered.append(f"{artifact}/{name}")
    assert not uncovered, f"written but never damaged in this suite: {uncovered}"


# ----------------------------------------------------------------------------------------------------
# 4. Non-finite values in a shard whose checksum is right


def poison_shard(cache: Path, index: int = 1) -> None:
    """Write NaN into one activation of a shard, then record the shard's new checksum wherever the old one was."""
    shard = cache / "shards" / f"shard-{index:06d}.h5"
    algorithms = ("sha256", "blake3")
    old = {a: digest_hex(shard, a) for a in algorithms}
    with h5py.File(shard, "r+") as f:
        acts = f["activations"]
        row = acts[3]
        row[1, 5] = np.nan
        acts[3] = row
    new = {a: digest_hex(shard, a) for a in algorithms}
    replaced = 0
    for record in [cache / "manifest.json", *(cache / "shards").glob("*.json")]:
        text = record.read_text()
        for a in algorithms:
            replaced += text.count(old[a])
            text = text.replace(old[a], new[a])
        record.write_text(text)
    assert replaced >= 2, "the shard's checksum is recorded in neither its sidecar nor the manifest any more"
    # the manifest also records the sidecars' digests and its own: seal it again as the writer does
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.pop(sf.MANIFEST_DIGEST)
    (cache / "manifest.json").write_text(json.dumps(sf.seal_manifest(cache, manifest, manifest["n_shards"])))


@pytest.mark.parametrize("reader", ["train", "analyse"])
def test_non_finite_shard(reader, world, w, tmp_path, capsys):
    poison_shard(w.cache)
    verified = call_main(cache_main, ["verify", str(w.cache)], capsys)
    assert verified.code == 0, "the checksum records were not updated: this case would test the checksum instead"
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    outcome = READERS[reader].run(w, tmp_path, capsys)
    assert_one_line_failure(outcome, "shard-000001")
    assert_unchanged(before, snapshot(tmp_path))


# ----------------------------------------------------------------------------------------------------
# 5. Wrong kinds of path


def _a_file(t: Path) -> Path:
    path = t / "a_file.txt"
    if not path.exists():
        path.write_text("not a folder\n")
    return path


def _sweep_in_folder(w: World, t: Path) -> list[str]:
    (t / "config_dir").mkdir(exist_ok=True)
    return sweep_argv(t / "config_dir")


def _sweep_out_is_a_file(w: World, t: Path) -> list[str]:
    return sweep_argv(write_sweep_config(w, t / "config", _a_file(t)))


WRONG_KINDS: dict[str, tuple[Callable, Callable[[World, Path], list[str]]]] = {
    "cache --out FILE": (cache_main, lambda w, t: cache_argv(w, _a_file(t))),
    "cache --out RUN": (cache_main, lambda w, t: cache_argv(w, w.run)),
    "cache --out RUN --overwrite": (cache_main, lambda w, t: cache_argv(w, w.run, "--overwrite")),
    "cache --out ANALYSIS --overwrite": (cache_main, lambda w, t: cache_argv(w, w.analysis, "--overwrite")),
    "cache --dataset RUN": (cache_main, lambda w, t: [*cache_argv(w, t / "out" / "c"), "--dataset", str(w.run)]),
    "cache --model CACHE": (cache_main, lambda w, t: [*cache_argv(w, t / "out" / "c"), "--model", str(w.cache)]),
    "cache --lens RUN": (cache_main, lambda w, t: cache_argv(w, t / "out" / "c", "--lens", str(w.run))),
    "cache --lens FILE": (cache_main, lambda w, t: cache_argv(w, t / "out" / "c", "--lens", str(_a_file(t)))),
    "verify FILE": (cache_main, lambda w, t: ["verify", str(_a_file(t))]),
    "verify RUN": (cache_main, lambda w, t: ["verify", str(w.run)]),
    "verify ANALYSIS": (cache_main, lambda w, t: ["verify", str(w.analysis)]),
    "train --shards FILE": (train_main, lambda w, t: train_argv(_a_file(t), t / "out" / "r")),
    "train --shards RUN": (train_main, lambda w, t: train_argv(w.run, t / "out" / "r")),
    "train --shards ANALYSIS": (train_main, lambda w, t: train_argv(w.analysis, t / "out" / "r")),
    "train --out FILE": (train_main, lambda w, t: train_argv(w.cache, _a_file(t))),
    "train --out CACHE": (train_main, lambda w, t: train_argv(w.cache, w.cache)),
    "train --out LENS": (train_main, lambda w, t: train_argv(w.cache, w.lens)),
    "train --resume --out CACHE": (train_main, lambda w, t: train_argv(w.cache, w.cache, "--resume")),
    "train --resume --out ANALYSIS": (train_main, lambda w, t: train_argv(w.cache, w.analysis, "--resume")),
    "analyse --run CACHE": (analyse_main, lambda w, t: analyse_argv(w.cache, w.cache, t / "out" / "a")),
    "analyse --run FILE": (analyse_main, lambda w, t: analyse_argv(_a_file(t), w.cache, t / "out" / "a")),
    "analyse --run ANALYSIS": (analyse_main, lambda w, t: analyse_argv(w.analysis, w.cache, t / "out" / "a")),
    "analyse --shards RUN": (analyse_main, lambda w, t: analyse_argv(w.run, w.run, t / "out" / "a")),
    "analyse --shards FILE": (analyse_main, lambda w, t: analyse_argv(w.run, _a_file(t), t / "out" / "a")),
    "analyse --out FILE": (analyse_main, lambda w, t: analyse_argv(w.run, w.cache, _a_file(t))),
    "analyse --out ANALYSIS": (analyse_main, lambda w, t: analyse_argv(w.run, w.cache, w.analysis)),
    "analyse --out FILE/child": (analyse_main, lambda w, t: analyse_argv(w.run, w.cache, _a_file(t) / "a")),
    "report RUN": (analyse_main, lambda w, t: ["report", str(w.run), "--out", str(t / "out" / "rep")]),
    "report CACHE": (analyse_main, lambda w, t: ["report", str(w.cache), "--out", str(t / "out" / "rep")]),
    "report FILE": (analyse_main, lambda w, t: ["report", str(_a_file(t)), "--out", str(t / "out" / "rep")]),
    "report --out FILE": (analyse_main, lambda w, t: ["report", str(w.analysis), "--out", str(_a_file(t))]),
    "report --out ANALYSIS": (analyse_main, lambda w, t: ["report", str(w.analysis), "--out", str(w.analysis)]),
    "html page of RUN": (html_report.main, lambda w, t: [str(w.run)]),
    "html page of FILE": (html_report.main, lambda w, t: [str(_a_file(t))]),
    "lens train --out FILE": (lens_main, lambda w, t: lens_train_argv(w, _a_file(t))),
    "lens train --out CACHE": (lens_main, lambda w, t: lens_train_argv(w, w.cache)),
    "lens train --out RUN --overwrite": (lens_main, lambda w, t: lens_train_argv(w, w.run, "--overwrite")),
    "lens train --model CACHE": (lens_main, lambda w, t: [*lens_train_argv(w, t / "out" / "l"), "--model", str(w.cache)]),
    "lens eval --lens RUN": (lens_main, lambda w, t: lens_eval_argv(w, w.run)),
    "lens eval --lens CACHE": (lens_main, lambda w, t: lens_eval_argv(w, w.cache)),
    "lens eval --lens FILE": (lens_main, lambda w, t: lens_eval_argv(w, _a_file(t))),
    "sweep CONFIG=folder": (sweep.main, _sweep_in_folder),
    "sweep out=FILE": (sweep.main, _sweep_out_is_a_file),
    "export saelens CACHE": (export_main, lambda w, t: export_saelens_argv(w.cache, t / "out" / "s")),
    "export saelens ANALYSIS": (export_main, lambda w, t: export_saelens_argv(w.analysis, t / "out" / "s")),
    "export saelens FILE": (export_main, lambda w, t: export_saelens_argv(_a_file(t), t / "out" / "s")),
    "export saelens SAELENS": (export_main, lambda w, t: export_saelens_argv(w.saelens, t / "out" / "s")),
    "export saelens UNFINISHED_RUN": (export_main, lambda w, t: export_saelens_argv(w.unfinished_run, t / "out" / "s")),
    "export saelens --out FILE": (export_main, lambda w, t: export_saelens_argv(w.run, _a_file(t))),
    "export saelens --out FILE/child": (export_main, lambda w, t: export_saelens_argv(w.run, _a_file(t) / "s")),
    "export saelens --out RUN": (export_main, lambda w, t: export_saelens_argv(w.run, w.run)),
    "export saelens --out SAELENS": (export_main, lambda w, t: export_saelens_argv(w.run, w.saelens)),
    "export hub CACHE": (export_main, lambda w, t: ["hub", str(w.cache), "--repo", "org/name"]),
    "analyse --run SAELENS --shards SAELENS": (analyse_main, lambda w, t: analyse_argv(w.saelens, w.saelens, t / "out" / "a")),
    "analyse --run SAELENS --out SAELENS": (analyse_main, lambda w, t: analyse_argv(w.saelens, w.cache, w.saelens)),
}  # fmt: skip


@pytest.mark.parametrize("case", WRONG_KINDS)
def test_wrong_kind_of_path(case, world, w, tmp_path, capsys):
    main, argv = WRONG_KINDS[case]
    (tmp_path / "out").mkdir()
    argv = argv(w, tmp_path)
    before = snapshot(tmp_path)
    outcome = call_main(main, argv, capsys)
    assert_one_line_failure(outcome)
    assert_unchanged(before, snapshot(tmp_path))
    assert not list((tmp_path / "out").iterdir()), "a refused command left files behind"


@pytest.mark.parametrize("case", ["export saelens CACHE", "export hub CACHE"])
def test_export_names_a_cache_given_as_its_run(case, w, tmp_path, capsys):
    """Said as such, not as a missing sae.safetensors or (hub) an unreachable hub: the hub is never probed."""
    main, argv = WRONG_KINDS[case]
    (tmp_path / "out").mkdir()
    outcome = call_main(main, argv(w, tmp_path), capsys)
    assert_one_line_failure(outcome, f"RUN {w.cache} is an activation cache")
    assert "--shards" not in outcome.error_lines[0]  # mlsae-export takes no cache: the fix names none


# ----------------------------------------------------------------------------------------------------
# The injectors themselves: each fault is real, or the cases above would pass for nothing


def test_injected_faults_are_real(tmp_path, monkeypatch):
    from mlsae_cache.atomic import atomic_write_text

    target = tmp_path / "f.bin"
    target.write_bytes(bytes(range(256)) * 4)
    before = target.read_bytes()
    flip_byte(target)
    flipped = target.read_bytes()
    differing = [i for i in range(len(before)) if before[i] != flipped[i]]
    assert len(differing) == 1 and bin(before[differing[0]] ^ flipped[differing[0]]).count("1") == 1
    truncate(target)
    assert target.read_bytes() == flipped[: len(flipped) // 2]

    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "kept.txt").write_text("kept")
    with failing_writes(monkeypatch, folder, errno.EACCES) as failed:
        with pytest.raises(PermissionError):
            atomic_write_text(folder / "new.txt", "x")
        with pytest.raises(PermissionError):
            (folder / "sub").mkdir()
        with pytest.raises(PermissionError):
            (folder / "kept.txt").unlink()
        atomic_write_text(tmp_path / "elsewhere.txt", "x")  # only the folder is read-only
    assert len(failed) == 3 and sorted(p.name for p in folder.iterdir()) == ["kept.txt"]

    with failing_writes(monkeypatch, folder, errno.ENOSPC, after=1) as failed:
        atomic_write_text(folder / "first.txt", "fits")
        with pytest.raises(OSError) as full:
            atomic_write_text(folder / "second.txt", "does not fit")
        (folder / "sub").mkdir()  # a full disk still makes folders
    assert full.value.errno == errno.ENOSPC and len(failed) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["first.txt", "kept.txt", "sub"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------

CASE_COUNT = len(OUTPUT_CASES) + len(SIGNAL_COMMANDS) * len(SIGNALS) + len(DAMAGE_CASES) + 2 + len(WRONG_KINDS)


def test_case_count():
    """The closing note's number of cases; every class of the issue is present."""
    assert CASE_COUNT == 38 + 12 + 104 + 2 + 55 == 211
    assert {"read-only", "disk-full-at-once", "disk-full-midway"} <= set(OUTPUT_FAULTS) and set(SIGNALS) == {"SIGINT", "SIGKILL"}
    assert set(DAMAGES) == {"flipped", "truncated"}


def test_shared_inputs_are_untouched(world):
    """Runs last: no case wrote into the model or the text that all cases read in place."""
    assert_unchanged(world.shared_inputs, snapshot(world.model, world.text))
