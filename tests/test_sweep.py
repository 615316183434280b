"""scripts/sweep.py: the paper's grid, the dry-run plan, resuming a real tiny sweep, bad configs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from models import assert_one_line_error, build_tiny_model, write_english
from safetensors.torch import load_file

from mlsae_analysis.config import AnalyseConfig
from mlsae_cache.cli import main as cache_main
from mlsae_cache.clitools import add_dataclass_arguments, config_from_args
from mlsae_cache.config import CacheConfig
from mlsae_cache.lens_cli import LensTrainConfig
from mlsae_train.checkpoint import CHECKPOINT_FILE, read_progress
from mlsae_train.config import TrainConfig
from mlsae_train.trainer import train

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep_script", REPO / "scripts" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep_script"] = sweep
_spec.loader.exec_module(sweep)

PLAN_LINE = re.compile(r"\[\d+/\d+\] (.+?)\s{2,}(to do|skip|resume)")  # a --dry-run line: stage, status
PYTHIA_WIDTHS = {"pythia-70m": (6, 512), "pythia-160m": (12, 768), "pythia-410m": (24, 1024), "pythia-1b": (16, 2048),
                 "pythia-1.4b": (24, 2048), "pythia-2.8b": (32, 2560)}  # fmt: skip


def papers_runs() -> set[str]:
    """The paper's experiments written out by hand (section 3, appendices A and D; table 1 has no lens for 1b)."""
    runs = {f"{m}/R64-k32" for m in ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b")}
    runs |= {f"{m}/R64-k32-lens" for m in ("pythia-70m", "pythia-160m", "pythia-410m")}
    for model, suffix in (("pythia-70m", ""), ("pythia-160m", ""), ("pythia-70m", "-lens")):
        runs |= {f"{model}/R{2**i}-k32{suffix}" for i in range(9)}  # R = 1 .. 256
        runs |= {f"{model}/R64-k{2**i}{suffix}" for i in range(4, 10)}  # k = 16 .. 512
    return runs


def test_paper_config_expands_to_the_papers_runs_and_stages(tmp_path):
    config = sweep.load_config(REPO / "sweeps" / "paper.toml", [f"out={tmp_path / 'paper'}"])
    names = [run.name for run in config.runs]
    assert len(names) == len(set(names)) == 48
    assert set(names) == papers_runs()
    stages = sweep.Planner(config).stages(config.runs)
    kinds = [s.kind for s in stages]
    assert (kinds.count("lens"), kinds.count("cache"), kinds.count("train"), kinds.count("analyse")) == (3, 18, 48, 48)
    caches = {s.label: s for s in stages if s.kind == "cache"}
    train_cache = caches["pythia-160m-lens train"].argv
    assert train_cache[train_cache.index("--tokens") + 1] == "1000000000"
    assert train_cache[train_cache.index("--lens") + 1] == str(tmp_path / "paper" / "lenses" / "pythia-160m")
    assert caches["pythia-1b test"].argv[caches["pythia-1b test"].argv.index("--split") + 1] == "test"
    # every stage comes after the stages it needs, and a run trains on its own model's cache
    position = {id(s): i for i, s in enumerate(stages)}
    assert all(position[id(n)] < position[id(s)] for s in stages for n in s.needs)
    train = next(s for s in stages if s.label == "pythia-410m/R64-k32-lens" and s.kind == "train")
    assert train.argv[train.argv.index("--shards") + 1] == str(tmp_path / "paper" / "caches" / "pythia-410m-lens" / "train")
    assert train.argv[train.argv.index("--expansion-factor") + 1] == "64" and train.argv[train.argv.index("-k") + 1] == "32"
    # every planned command line is one its command accepts, with the config's options in it
    for stage in stages:
        parsed = parse_like_the_command(stage)
        assert Path(parsed.out) == stage.done_file.parent
    assert parse_like_the_command(caches["pythia-70m train"]).model_dtype == "float16"
    assert parse_like_the_command(train).verify is False and parse_like_the_command(train).batch_tokens == 131072
    lens = next(s for s in stages if s.kind == "lens")
    assert parse_like_the_command(lens).steps == 2000


def parse_like_the_command(stage):
    """The stage's command line parsed by the options of the command it runs (lens: after `train`)."""
    cls = {"cache": CacheConfig, "train": TrainConfig, "analyse": AnalyseConfig, "lens": LensTrainConfig}[stage.kind]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_arguments(parser, cls, short={"k": "-k"} if stage.kind == "train" else None)
    return parser.parse_args(stage.argv[1:] if stage.kind == "lens" else stage.argv)


def test_disk_estimate_is_tokens_times_layers_times_width(tmp_path):
    for name, (layers, width) in PYTHIA_WIDTHS.items():
        shape = sweep.model_shape(name)
        assert (shape.n_layers, shape.d_model) == (layers, width)
        assert sweep.cache_bytes(10**9, shape, "float16") == 10**9 * (layers * width * 2 + 16)
        assert sweep.cache_bytes(10, shape, "float32") == 10 * (layers * width * 4 + 16)
    assert sweep.model_shape("EleutherAI/pythia-70m-deduped") == sweep.model_shape("pythia-70m")
    # an analysis stores k latents per (token, layer) vector, a crosscoder's k per token
    shape = sweep.model_shape("pythia-70m")
    assert sweep.latents_bytes(100, shape, 32) == 100 * 6 * 32 * sweep.LATENT_ROW_BYTES
    assert sweep.latents_bytes(100, shape, 32, "per-layer") == 100 * 6 * 32 * sweep.LATENT_ROW_BYTES
    assert sweep.latents_bytes(100, shape, 32, "crosscoder") == 100 * 32 * sweep.LATENT_ROW_BYTES
    # a local model: read from its config.json; the parameter count is the architecture's, not a guess
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "num_hidden_layers": 6, "hidden_size": 512,
                                                   "num_attention_heads": 8, "intermediate_size": 2048}))  # fmt: skip
    assert sweep.model_shape(str(local)) == sweep.ModelShape(6, 512, 6 * 12 * 512 * 512)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "paper"
    code = sweep.main([str(REPO / "sweeps" / "paper.toml"), "--dry-run", "--set", f"out={out}", "--only", "pythia-70m/R64-k32",
                       "--set", "data.train_tokens=100_000_000"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "1 runs of 1 models (of 48 in the grid)" in printed
    assert PLAN_LINE.findall(printed) == [("cache pythia-70m train", "to do"), ("cache pythia-70m test", "to do"),
                                          ("train pythia-70m/R64-k32", "to do"), ("analyse pythia-70m/R64-k32", "to do"),
                                          ("report 1 runs", "to do")]  # fmt: skip
    train_bytes, test_bytes = 100_000_000 * (6 * 512 * 2 + 16), 10_000_000 * (6 * 512 * 2 + 16)
    assert f"to do   {sweep.human_bytes(train_bytes)}" in printed  # 616.0 GB
    assert f"caches {sweep.human_bytes(train_bytes + test_bytes)} in all" in printed


@pytest.fixture(scope="module")
def tiny_sweep_config(pythia_tokenizer_dir, tmp_path_factory):
    """A real sweep over a tiny GPT-NeoX: two good runs and one whose k exceeds its latents (16 < 32)."""
    root = tmp_path_factory.mktemp("sweep")
    model = build_tiny_model(root / "model", pythia_tokenizer_dir, n_layers=2, d_model=16, context=64)
    train_text = write_english(root / "train", n_files=2, words_per_file=200, seed=1)
    test_text = write_english(root / "test", n_files=1, words_per_file=100, seed=2)
    config = root / "tiny.toml"
    config.write_text(f"""
out = "{root / 'out'}"
[data]
train_dataset = "{train_text}"
test_dataset = "{test_text}"
train_tokens = 192
test_tokens = 64
[cache]
seq_len = 32
batch_size = 2
progress = false
[train]
batch_tokens = 64
lr = 1e-3
save_every_tokens = 64
progress = false
[analyse]
downstream = false
progress = false
[[models]]
name = "tiny"
path = "{model}"
[[grid]]
models = ["tiny"]
expansion_factor = [2, 4]
k = 4
[[grid]]
models = ["tiny"]
expansion_factor = 1
k = 32
""")
    return config, root / "out"


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def train_from_argv(argv: list[str], **kwargs) -> None:
    """mlsae-train's own parsing of a planned train stage's command line, then the trainer itself."""
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig, short={"k": "-k"})
    train(config_from_args(TrainConfig, parser.parse_args(argv)), **kwargs)


@pytest.mark.slow
def test_sweep_runs_everything_then_skips_then_redoes_only_what_is_missing(tiny_sweep_config, tmp_path, capsys):
    config_path, out = tiny_sweep_config
    run = ["--in-process", str(config_path)]

    # 0: the train cache exists and R4-k4 was killed after its first checkpoint (the trainer's test hook on the
    #    sweep's own command line); the same command uninterrupted, elsewhere, gives the reference weights
    config = sweep.load_config(config_path)
    stages = {(s.kind, s.label): s for s in sweep.Planner(config).stages(config.runs)}
    assert cache_main(stages["cache", "tiny train"].argv) == 0
    r4 = stages["train", "tiny/R4-k4"]
    train_from_argv(r4.argv, stop_after_steps=1)
    progress = read_progress(r4.done_file.parent / CHECKPOINT_FILE)
    assert r4.done_file.exists() and progress["step"] == 1 < progress["total_steps"]  # an unfinished run's weights
    reference = tmp_path / "reference"
    train_from_argv([str(reference) if a == str(r4.done_file.parent) else a for a in r4.argv])
    assert sweep.main([*run, "--dry-run"]) == 0
    plan = dict(PLAN_LINE.findall(capsys.readouterr().out))
    assert plan["cache tiny train"] == "skip" and plan["cache tiny test"] == "to do" and plan["train tiny/R4-k4"] == "resume"

    # 1: everything else runs; R4-k4 resumes to the uninterrupted weights; the impossible run fails, is
    #    listed, and the others go on to the report
    assert sweep.main(run) == 1
    captured = capsys.readouterr()
    assert "train tiny/R1-k32: failed (exit 2)" in captured.err and "analyse tiny/R1-k32: not run: train tiny/R1-k32 failed" in captured.err
    assert "-k 32 is more than the 16 latents" in captured.err
    commands = [line for line in captured.out.splitlines() if line.startswith("  $ ")]
    assert [c.split()[1] for c in commands] == ["mlsae-cache", *["mlsae-train", "mlsae-analyse"] * 2, "mlsae-train", "mlsae-analyse"]
    assert [c.endswith("--resume") for c in commands if "mlsae-train" in c] == [False, True, False]
    resumed, uninterrupted = load_file(r4.done_file), load_file(reference / "sae.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[n], uninterrupted[n]) for n in resumed)
    for name in ("R2-k4", "R4-k4"):
        assert (out / "runs" / "tiny" / name / "sae.safetensors").exists()
        assert json.loads((out / "analysis" / "tiny" / name / "summary.json").read_text())["n_latents"] == int(name[1]) * 16
    report_runs = json.loads((out / "report" / sweep.REPORT_RUNS_FILE).read_text())
    assert sorted(report_runs) == ["tiny/R2-k4", "tiny/R4-k4"]
    assert len((out / "report" / "tables.csv").read_text().strip().splitlines()) == 1 + 2

    # 2: the good runs again: every stage is skipped and nothing is rewritten
    good = [*run, "--only", "tiny/*-k4"]
    before = mtimes(out)
    assert sweep.main(good) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 6 + 1 and "$ " not in printed  # 2 caches, 2 trains, 2 analyses, the report
    assert mtimes(out) == before

    # 3: one analysis deleted: only it and the report are redone
    shutil.rmtree(out / "analysis" / "tiny" / "R2-k4")
    assert sweep.main([*good, "--dry-run"]) == 0
    plan = dict(PLAN_LINE.findall(capsys.readouterr().out))
    assert len(plan) == 7 and plan["analyse tiny/R2-k4"] == "to do" and plan["report 2 runs"] == "to do"
    assert sum(status == "skip" for status in plan.values()) == 5
    assert sweep.main(good) == 0
    printed = capsys.readouterr().out
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("  $ ")] == ["mlsae-analyse", "mlsae-analyse"]
    after = mtimes(out)
    redone = {p for p in after if after[p] != before.get(p)}
    assert redone and all(p.startswith(("analysis/tiny/R2-k4/", "report/")) for p in redone), redone
    assert "report/tables.csv" in redone and not any(p.startswith("analysis/tiny/R4-k4/") for p in redone)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda t: t.replace('out = ', 'outdir = "x"\nout = '), ["unknown key 'outdir'"]),
        (lambda t: t.replace("[train]\n", "[train]\nbatch_size = 8\n"), ["[train] has no option 'batch_size'"]),
        (lambda t: t.replace("[train]\n", "[train]\nepochs = \"two\"\n"), ["[train] epochs = 'two' has the wrong type"]),
        (lambda t: t.replace("[train]\n", "[train]\nk = 8\n"), ["[train] k is set by the sweep"]),
        (lambda t: t.replace('models = ["tiny"]\nexpansion_factor = 1', 'models = ["tiny", "pythia-9b"]\nexpansion_factor = 1'),
         ["names model 'pythia-9b'", "no [[models]] entry"]),
        (lambda t: t.replace("[[models]]", "[[modelz]]"), ["unknown key 'modelz'"]),
        (lambda t: t.split("[[models]]")[0], ["no models"]),
    ],
)
def test_bad_config_is_one_line_and_nonzero(edit, fragments, tiny_sweep_config, tmp_path, capsys):
    config, _ = tiny_sweep_config
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(config.read_text()).replace(str(config.parent / "out"), str(tmp_path / "out")))
    assert sweep.main([str(bad)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(bad), *fragments)
    assert not (tmp_path / "out").exists()


def test_only_that_matches_nothing_is_one_line(capsys):
    assert sweep.main([str(REPO / "sweeps" / "paper.toml"), "--dry-run", "--only", "gpt2/*"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--only gpt2/* matches none of the 48 runs")


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """From any folder, the config's own relative paths mean the same files; a hub id stays a hub id."""
    conf = tmp_path / "project" / "sweeps"
    conf.mkdir(parents=True)
    (conf / "text").mkdir()
    (conf / "model").mkdir()
    (conf / "my.toml").write_text(
        'out = "../outputs"\n[data]\ntrain_dataset = "text"\ntest_dataset = "monology/pile-uncopyrighted"\n'
        'train_tokens = 64\ntest_tokens = 64\n[cache]\ntokenizer = "model"\n'
        '[[models]]\nname = "tiny"\npath = "model"\nlens = "lenses/tiny"\n[[models]]\nname = "pythia-70m"\n'
        '[[grid]]\nmodels = ["tiny", "pythia-70m"]\nexpansion_factor = 1\nk = 4\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = sweep.load_config(Path("../project/sweeps/my.toml"))
    assert config.out == (tmp_path / "project" / "outputs").resolve()
    assert config.dataset("train") == str((conf / "text").resolve())
    assert config.dataset("test") == "monology/pile-uncopyrighted"  # no such path beside the config: a hub id
    assert config.models["tiny"].path == str((conf / "model").resolve())
    assert config.models["tiny"].lens == str((conf / "lenses" / "tiny").resolve())  # always a path, made later
    assert config.models["pythia-70m"].path == "pythia-70m"
    assert config.options["cache"]["tokenizer"] == str((conf / "model").resolve())
    overridden = sweep.load_config(Path("../project/sweeps/my.toml"), ["out=here"])  # typed here: relative to here
    assert overridden.out == Path("here")


def test_the_report_replaces_only_a_report_the_sweep_wrote(tmp_path, capsys):
    config = sweep.load_config(REPO / "sweeps" / "paper.toml", [f"out={tmp_path / 'out'}"])
    mine = tmp_path / "out" / "report"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    calls = []
    code = sweep.write_report(sweep.Planner(config), config.runs, {"a": "b"}, lambda stage: calls.append(stage) or 0)
    assert code == 2 and calls == []
    assert_one_line_error(capsys.readouterr().err, str(mine), "not written by the sweep")
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_killed_sweeps_report_leftovers_are_removed(tmp_path, capsys):
    import subprocess

    config = sweep.load_config(REPO / "sweeps" / "paper.toml", [f"out={tmp_path / 'out'}"])
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process that no longer runs
    stale = [tmp_path / "out" / f".report.{kind}-{child.pid}" for kind in ("new", "old")]
    stale.append(tmp_path / "out" / f"..report.new-{child.pid}.partial-{child.pid}")  # mlsae-analyse report's own partial
    for folder in stale:
        folder.mkdir(parents=True)
    calls = []
    assert sweep.write_report(sweep.Planner(config), config.runs, {}, lambda stage: calls.append(stage) or 1) == 1
    assert len(calls) == 1 and not any(folder.exists() for folder in stale)


def test_a_folder_for_the_config_or_a_file_for_out_is_one_line(tiny_sweep_config, tmp_path, capsys):
    assert sweep.main([str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(tmp_path), "is a folder", ".toml")
    config, _ = tiny_sweep_config
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    assert sweep.main([str(config), "--dry-run", "--set", f"out={a_file}"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(a_file), "is a file")
    assert a_file.read_text() == "mine"


# ----------------------------------------------------------------------------------------------------
# arch: the dictionary family as a grid axis
# ----------------------------------------------------------------------------------------------------

FAMILY_RUNS = ["smollm2/R4-k32", "smollm2/R4-k32-per-layer-s1", "smollm2/R4-k32-crosscoder-s2"]


def test_families_config_trains_the_three_families_on_one_cache_at_equal_n_and_k(tmp_path):
    config = sweep.load_config(REPO / "sweeps" / "families.toml", [f"out={tmp_path / 'out'}"])
    assert [run.name for run in config.runs] == FAMILY_RUNS  # the MLSAE keeps its name (no family suffix)
    stages = sweep.Planner(config).stages(config.runs)
    kinds = [s.kind for s in stages]
    assert (kinds.count("cache"), kinds.count("train"), kinds.count("analyse")) == (2, 3, 3)
    trains = [parse_like_the_command(s) for s in stages if s.kind == "train"]
    assert [t.arch for t in trains] == ["mlsae", "per-layer", "crosscoder"]
    assert {(t.expansion_factor, t.k) for t in trains} == {(4, 32)}  # n = R x d and k equal for all three
    assert len({t.shards[0] for t in trains}) == 1  # the same train cache
    assert [t.seed for t in trains] == [0, 1, 2]  # initial dictionaries that share no directions
    (compare,) = [s for s in stages if s.kind == "compare"]  # the families side by side, after their analyses
    assert compare.argv == ["compare", *(str(tmp_path / "out" / "analysis" / name) for name in FAMILY_RUNS),
                            "--out", str(tmp_path / "out" / "compare" / "smollm2" / "R4-k32")]  # fmt: skip
    assert set(compare.needs) == {s for s in stages if s.kind == "analyse"} and stages[-1] is compare
    assert {Path(t.out) for t in trains} == {tmp_path / "out" / "runs" / name for name in FAMILY_RUNS}


def test_arch_defaults_to_the_mlsae_and_takes_one_name_or_a_list(tmp_path):
    base = (f'out = "{tmp_path / "out"}"\n[data]\ndataset = "text"\ntrain_tokens = 64\ntest_tokens = 64\n'
            '[[models]]\nname = "m"\n[[grid]]\nmodels = ["m"]\nexpansion_factor = [1, 2]\nk = 4\n')  # fmt: skip
    names = {}
    for label, extra in (("none", ""), ("mlsae", 'arch = "mlsae"\n'), ("one", 'arch = "crosscoder"\n'),
                         ("list", 'arch = ["per-layer", "mlsae", "per-layer"]\n')):  # fmt: skip
        (tmp_path / f"{label}.toml").write_text(base + extra)
        names[label] = [run.name for run in sweep.load_config(tmp_path / f"{label}.toml").runs]
    assert names["none"] == names["mlsae"] == ["m/R1-k4", "m/R2-k4"]
    assert names["one"] == ["m/R1-k4-crosscoder", "m/R2-k4-crosscoder"]
    assert names["list"] == ["m/R1-k4-per-layer", "m/R1-k4", "m/R2-k4-per-layer", "m/R2-k4"]  # a run named twice: once


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ('[[grid]]\nmodels = ["m"]\nexpansion_factor = 1\nk = 4\narch = "transcoder"\n',
         ["[[grid]] #1 arch = 'transcoder' is not a dictionary family", "mlsae, per-layer, crosscoder"]),
        ('[[grid]]\nmodels = ["m"]\nexpansion_factor = 1\nk = 4\narch = ["mlsae", 3]\n', ["arch = 3 is not a dictionary family"]),
        ('[[grid]]\nmodels = ["m"]\nexpansion_factor = 1\nk = 4\narch = []\n', ["[[grid]] #1 arch must name a dictionary family"]),
        ('[train]\narch = "crosscoder"\n[[grid]]\nmodels = ["m"]\nexpansion_factor = 1\nk = 4\n', ["[train] arch is set by the sweep"]),
    ],
)
def test_a_bad_arch_is_one_line(extra, fragments, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'out = "{tmp_path / "out"}"\n[data]\ndataset = "text"\ntrain_tokens = 64\ntest_tokens = 64\n'
                   f'[[models]]\nname = "m"\n{extra}')  # fmt: skip
    assert sweep.main([str(bad), "--dry-run"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(bad), *fragments)
    assert not (tmp_path / "out").exists()


def test_seed_is_a_grid_axis_named_in_the_run_and_passed_to_training(tmp_path, capsys):
    base = (f'out = "{tmp_path / "out"}"\n[data]\ndataset = "text"\ntrain_tokens = 64\ntest_tokens = 64\n'
            '[[models]]\nname = "m"\n[[grid]]\nmodels = ["m"]\nexpansion_factor = 1\nk = 4\n')  # fmt: skip
    (tmp_path / "seeds.toml").write_text(base + 'arch = "crosscoder"\nseed = [3, 0]\n')
    config = sweep.load_config(tmp_path / "seeds.toml")
    assert [run.name for run in config.runs] == ["m/R1-k4-crosscoder-s3", "m/R1-k4-crosscoder-s0"]
    trains = [parse_like_the_command(s) for s in sweep.Planner(config).stages(config.runs) if s.kind == "train"]
    assert [t.seed for t in trains] == [3, 0]
    for extra, fragment in (('seed = -1\n', "seed must be a non-negative integer"), ('seed = "x"\n', "seed must be"),
                            ('seed = 1\n[train]\nseed = 2\n', "seed is set both in [train] and in a [[grid]] block")):  # fmt: skip
        (tmp_path / "bad.toml").write_text(base + extra)
        assert sweep.main([str(tmp_path / "bad.toml"), "--dry-run"]) == 2
        assert_one_line_error(capsys.readouterr().err, fragment)


def test_stop_after_train_plans_no_analysis_and_no_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert sweep.main([str(REPO / "sweeps" / "families.toml"), "--dry-run", "--stop-after", "train", "--set", f"out={out}"]) == 0
    plan = PLAN_LINE.findall(capsys.readouterr().out)
    assert plan == [("cache smollm2 train", "to do"), ("cache smollm2 test", "to do"),
                    *[(f"train {name}", "to do") for name in FAMILY_RUNS], ("report 0 runs", "skip")]  # fmt: skip
    assert not out.exists()


def test_a_family_sweep_trains_each_family_through_its_own_command_line_then_skips(tmp_path, capsys):
    """The planned train commands, run in this process on a small array cache put where the sweep's caches go."""
    import numpy as np

    from mlsae_cache import write_array_cache
    from mlsae_train import load_sae

    config_path = tmp_path / "f.toml"
    config_path.write_text(f'out = "{tmp_path / "out"}"\n[data]\ndataset = "text"\ntrain_tokens = 96\ntest_tokens = 32\n'
                           '[train]\nbatch_tokens = 32\nlr = 1e-3\nprogress = false\nverify = false\n'
                           '[[models]]\nname = "m"\n[[grid]]\nmodels = ["m"]\nexpansion_factor = 2\nk = 3\n'
                           'arch = ["mlsae", "per-layer", "crosscoder"]\n')  # fmt: skip
    generator = np.random.default_rng(0)
    for split, tokens in (("train", 96), ("test", 32)):  # finished caches of the configured sizes: skipped
        acts = generator.standard_normal((tokens, 2, 8)).astype(np.float32)
        write_array_cache(tmp_path / "out" / "caches" / "m" / split, acts, layers=[1, 3], shard_tokens=48)
    run = [str(config_path), "--in-process", "--stop-after", "train"]
    assert sweep.main(run) == 0
    printed = capsys.readouterr().out
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("  $ ")] == ["mlsae-train"] * 3
    for name, arch in zip(("R2-k3", "R2-k3-per-layer", "R2-k3-crosscoder"), ("mlsae", "per-layer", "crosscoder")):
        folder = tmp_path / "out" / "runs" / "m" / name
        assert json.loads((folder / "config.json").read_text())["config"]["arch"] == arch
        sae = load_sae(folder)
        assert (sae.arch, sae.n_latents, sae.k, sae.layers) == (arch, 16, 3, [1, 3])
    assert not (tmp_path / "out" / "analysis").exists() and not (tmp_path / "out" / "report").exists()
    assert sweep.main(run) == 0  # again: every stage is done
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 5 and "$ " not in printed


def test_stop_after_a_stage_no_run_has_is_one_line(tmp_path, capsys):
    code = sweep.main([str(REPO / "sweeps" / "families.toml"), "--stop-after", "lens", "--set", f"out={tmp_path / 'out'}"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "--stop-after lens leaves no stage to run")
    assert not (tmp_path / "out").exists()


def test_time_estimates_use_the_rates_gpu_check_measured(tmp_path):
    """benchmarks/gpu.json's training rate per width (vectors/s x FLOPs per vector) and forward rate replace the
    assumed 30% of an H100's peak; without the file the assumption stays."""
    figures = {"date": "2026-11-29T00:00:00+00:00", "device": {"type": "cuda", "name": "GPU X"}, "measurements": [
        {"name": "train_throughput", "status": "measured", "figures": {"R": 64, "k": 32, "steps": [
            {"d": 512, "kernel": "bfloat16", "vectors_per_s": 1e6}, {"d": 512, "kernel": "float32", "vectors_per_s": 1.0},
            {"d": 1024, "kernel": "bfloat16", "vectors_per_s": 5e5}]}},
        {"name": "cache_throughput", "status": "measured", "figures": {"forward_tokens_per_s": 4e6, "batch": [32, 2048]}}]}  # fmt: skip
    (tmp_path / "gpu.json").write_text(json.dumps(figures))
    rates = sweep.measured_rates(tmp_path / "gpu.json")
    per_vector = {d: 2 * d * 64 * d + 8 * 32 * d + 6 * (d // 2) * d for d in (512, 1024)}
    assert rates.sae_by_width == {512: 1e6 * per_vector[512], 1024: 5e5 * per_vector[1024]}
    assert rates.sae(768) == rates.sae_by_width[512] and rates.sae(2048) == rates.sae_by_width[1024] and rates.sae(256) == rates.sae_by_width[512]
    assert rates.forward == 4e6 * sweep.forward_flops(1, sweep.PYTHIA["pythia-70m"], 2048)
    shape = sweep.PYTHIA["pythia-70m"]  # 1e6 vectors/s at d = 512: 6 layers x 1e6 tokens take 6 s
    assert sweep.gpu_seconds(sweep.sae_train_flops(10**6, shape, 64, 32), rate=sweep.sae_rate(shape, rates)) == pytest.approx(6.0)
    assert "GPU X" in sweep.estimate_basis(rates)
    assert sweep.measured_rates(tmp_path / "missing.json") is None and "30%" in sweep.estimate_basis(None)
