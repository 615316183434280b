"""scripts/bench_families.py --small: a smoke run, so that the families' benchmark cannot rot (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_families_script", REPO / "scripts" / "bench_families.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_families_script"] = bench
_spec.loader.exec_module(bench)


def test_small_run_measures_every_contender_on_like_for_like_runs(tmp_path, capsys):
    out = tmp_path / "families.json"
    assert bench.main(["--small", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    sizes = bench.SMALL
    suite = figures["suite"]
    # one per-layer invocation against one --layers run per layer, each CLI and in process, every one of them
    # trained for the whole epoch (the step times come from each run's own metrics.jsonl)
    for how in ("cli", "in-process"):
        assert [r["label"] for r in suite[f"{how}/suite"]["invocations"]] == ["per-layer"]
        assert [r["label"] for r in suite[f"{how}/separate"]["invocations"]] == [f"--layers {l}" for l in range(sizes.layers)]
        for run in suite[f"{how}/suite"]["invocations"] + suite[f"{how}/separate"]["invocations"]:
            assert run["steps"] == sizes.tokens // sizes.batch_tokens
            assert 0 < run["step_s"] < run["wall_s"]
        assert suite[f"{how}/speedup"] > 0 and f"{how:10s} suite speedup" in printed
    assert suite["max_weight_difference"] < 1e-5  # the suite and the separate runs take the same steps
    steps = figures["steps"]
    for name in ("mlsae", "per-layer", "crosscoder", "floor/mlsae", "floor/crosscoder"):
        assert len(steps[name]["seconds"]) == 2 and steps[name]["vectors_per_s"] > 0
    assert steps["crosscoder/floor"] > 0 and "crosscoder / its floor" in printed
