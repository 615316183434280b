"""scripts/gpu_check.py at toy sizes on the CPU, through its command line: every check passes or is
skipped with its reason, the JSON holds the figures, a deliberately corrupted device result fails its
check, the budget guard skips measurements, and bad options are one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
CHECKS = {"sparse_decode", "screened_topk", "bf16_training_fvu", "cache_pythia-70m_shape", "cache_pythia-410m_shape", "resume", "ddp_nccl"}
MEASUREMENTS = {"cache_throughput", "data_path", "train_throughput", "analysis_encode", "splicing"}


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--small", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {entry["name"]: entry for entry in entries}


@pytest.mark.slow
def test_the_small_cpu_run_checks_and_measures_everything(tmp_path):
    out = tmp_path / "figures" / "gpu.json"
    result = gpu_check("--out", str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["failed"] == []
    assert report["date"] and report["small"] is True and report["bf16_peak_tflops"] is None
    assert report["device"]["type"] == "cpu" and report["device"]["torch"] == torch.__version__
    assert report["sizes"]["train"]["widths"] == [32, 64] and report["sizes"]["cache_bench"] == [4, 64]

    checks = by_name(report["checks"])
    assert set(checks) == CHECKS
    assert checks["ddp_nccl"]["status"] == "skipped" and "CUDA" in checks["ddp_nccl"]["reason"]
    for name in CHECKS - {"ddp_nccl"}:
        entry = checks[name]
        assert entry["status"] == "passed", entry
        assert entry["criteria"] and all(c["passed"] and c["error"] <= c["tolerance"] for c in entry["criteria"])
        assert entry["error"] is not None and entry["tolerance"] is not None
    assert checks["bf16_training_fvu"]["figures"]["fvu_cpu_float32"] < 0.5  # the SAE learned: the comparison means something
    assert checks["resume"]["figures"]["bit_exact"] is True  # on the CPU, resume is bit for bit

    measurements = by_name(report["measurements"])
    assert set(measurements) == MEASUREMENTS
    for name, entry in measurements.items():
        if name == "data_path":  # another script's figures: skipped with its reason when it is missing or fails
            assert entry["status"] == "measured" or (entry["status"] == "skipped" and entry["reason"]), entry
        else:
            assert entry["status"] == "measured", entry
    cache = measurements["cache_throughput"]["figures"]
    assert cache["forward_tokens_per_s"] > 0 and cache["cache_tokens_per_s_whole_run"] > 0
    steps = measurements["train_throughput"]["figures"]["steps"]
    assert {(row["d"], row["kernel"]) for row in steps} == {(d, k) for d in (32, 64) for k in ("float32", "bfloat16", "screen")}
    assert all(row["vectors_per_s"] > 0 and row["encoder_tflops_in_step"] > 0 and row["encoder_share_of_bf16_peak"] is None for row in steps)
    assert measurements["analysis_encode"]["figures"]["tokens_per_s"] > 0
    assert measurements["splicing"]["figures"]["sequences_per_s"] > 0
    for name in CHECKS | MEASUREMENTS:  # the printed table names every line
        assert name in result.stdout


@pytest.mark.parametrize("corrupted", ["sparse_decode", "screened_topk"])
def test_a_corrupted_device_result_fails_its_check_and_only_that(tmp_path, corrupted):
    out = tmp_path / "gpu.json"
    result = gpu_check("--out", str(out), "--only", "sparse_decode,screened_topk", "--inject-error", corrupted)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["failed"] == [corrupted]
    checks = by_name(report["checks"])
    assert checks[corrupted]["status"] == "failed" and checks[corrupted]["error"] > checks[corrupted]["tolerance"]
    assert ">" in checks[corrupted]["reason"]  # names the criterion, its error and its tolerance
    (other,) = {"sparse_decode", "screened_topk"} - {corrupted}
    assert checks[other]["status"] == "passed"
    assert report["measurements"] == []
    assert "FAILED" in result.stdout


def test_the_budget_guard_skips_measurements_with_the_reason(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu_check("--out", str(out), "--only", "sparse_decode,train_throughput,splicing", "--budget-s", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert by_name(report["checks"])["sparse_decode"]["status"] == "passed"  # checks always run
    for entry in report["measurements"]:
        assert entry["status"] == "skipped" and "budget" in entry["reason"], entry


def test_bad_options_are_one_line_errors(tmp_path):
    result = gpu_check("--out", str(tmp_path / "gpu.json"), "--only", "sparse_decode,nonsense")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "nonsense", "sparse_decode")
    folder = tmp_path / "folder"
    (folder / "kept.txt").parent.mkdir()
    (folder / "kept.txt").write_text("mine")
    result = gpu_check("--out", str(folder))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "is a directory")
    assert (folder / "kept.txt").read_text() == "mine" and len(list(folder.iterdir())) == 1
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "gpu.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--device cuda", "--device cpu")
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_the_ddp_check_compares_torchrun_with_one_process(tmp_path, monkeypatch):
    """The DDP check's own code (flags, torchrun, comparison), with gloo on the CPU standing in for NCCL."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.SMALL, True, tmp_path, gpu_check.Budget(300.0))
    criteria, figures = gpu_check.ddp_against_one_process(ctx, "cpu", 2)
    assert figures["processes"] == 2 and figures["backend"] == "gloo" and figures["steps"] == 8
    assert all(c.passed for c in criteria), criteria


def test_the_sparse_decode_check_compares_the_gradients_of_each_run(tmp_path, monkeypatch):
    """A device whose gradients alone are wrong fails the check: each run takes its own leaves (the CPU
    run once handed its .grad to the device run, so both compared equal whatever they held)."""
    import mlsae_train.sparse_decode as sparse_decode_module

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    real = sparse_decode_module.sparse_decode
    calls = []

    def second_run_doubles_the_values_gradient(values, indices, W_dec, project_grad=False):
        calls.append(1)
        if len(calls) == 2:  # the "device" run: the same output, twice the gradient for the values
            values = 2 * values - values.detach()
        return real(values, indices, W_dec, project_grad)

    monkeypatch.setattr(sparse_decode_module, "sparse_decode", second_run_doubles_the_values_gradient)
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.SMALL, True, tmp_path, gpu_check.Budget(300.0))
    criteria, _ = gpu_check.check_sparse_decode(ctx)
    passed = {c.what.split(":")[0]: c.passed for c in criteria}
    assert passed == {"output": True, "grad values": False, "grad W_dec (projected)": True}, criteria
