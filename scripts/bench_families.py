"""Benchmark the dictionary families (issue 13 item 5) on this machine, side by side in one run.

1. The per-layer suite against L separate single-layer runs on the same cache (target: the suite >= 1.5x
   faster, as it reads the cache once): one ``mlsae-train --arch per-layer`` against L ``mlsae-train
   --layers l``, measured twice,
     cli         as a user runs them: L + 1 invocations of the mlsae-train command, wall clock;
     in-process  the same settings through ``mlsae_train.train(config)`` calls in this process.
   Each invocation's time is split into its steps (the trainer's own per-step times, from metrics.jsonl:
   reading the batch, the step, the log line) and its fixed costs (the rest: process start and imports,
   opening and verifying the cache, b_pre's geometric median, the checkpoint and weights at the end).
   The page cache is emptied of the cache's files before every invocation (a cache larger than memory),
   and the suite's final weights are compared with the separate runs' (they take the same steps).
2. The crosscoder's training step against its floor: the encoder matmul [N, L*d] x [L*d, n] plus the
   top-k over [N, n], timed alone (and the MLSAE's floor, [N*L, d] x [d, n] plus top-k over [N*L, n]).
3. The three families' training steps (``train_step``, batches in memory, Adam, float32) at the same
   n = R x d and k, in vectors/s (one vector = one (token, layer) pair) and tokens/s.

Every measurement is repeated and the best kept (the figures of a shared machine are noisy); in 2 and 3
the contenders take turns, one step each per round. Defaults: a pythia-70m-shaped cache scaled down
(6 layers, d = 256, 16,384 tokens, float16) for 1, and pythia-70m's shape (6 x 512, R = 16, k = 32,
512 tokens a step) for 2 and 3.

    python scripts/bench_families.py [--repeats 2] [--json FILE] [--profile]
    python scripts/bench_families.py --small          # toy sizes in seconds (tests/test_bench_families.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_train import evict_from_page_cache, synthetic_activations  # noqa: E402

from mlsae_cache import write_array_cache  # noqa: E402
from mlsae_cache.atomic import atomic_write_json  # noqa: E402
from mlsae_train import load_sae  # noqa: E402
from mlsae_train.checkpoint import METRICS_FILE  # noqa: E402
from mlsae_train.config import TrainConfig  # noqa: E402
from mlsae_train.data import ActivationDataset  # noqa: E402
from mlsae_train.dead_latents import DeadLatentTracker  # noqa: E402
from mlsae_train.families import FAMILIES  # noqa: E402
from mlsae_train.step import make_optimizer, train_step  # noqa: E402
from mlsae_train.trainer import train  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    # 1: the suite against separate runs
    layers: int
    d: int
    tokens: int
    batch_tokens: int
    expansion_factor: int
    k: int
    # 2 and 3: one training step of each family
    step_layers: int
    step_d: int
    step_expansion_factor: int
    step_k: int
    step_tokens: int


FULL = Sizes(6, 256, 16384, 1024, 4, 16, 6, 512, 16, 32, 512)
SMALL = Sizes(2, 16, 256, 64, 2, 4, 3, 16, 2, 4, 32)


# ----------------------------------------------------------------------------------------------------
# 1. The per-layer suite against L separate --layers l runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Invocation:
    """One training run's wall time and the part of it spent in its steps."""

    label: str
    wall_s: float
    step_s: float
    """The sum of the trainer's per-step times (metrics.jsonl: batch_tokens / tokens_per_s)."""
    first_step_s: float
    """The first of them: it also waits for the first batch from disk and pays the process's first-use costs."""
    median_step_s: float
    """The median step: times the number of steps, the steps' time without the bursts of a shared machine."""
    steps: int
    read_mb: float
    """Megabytes the run read from storage (getrusage ru_inblock, 512-byte blocks): the cache, the
    Python modules and libraries a new process loads."""

    @property
    def fixed_s(self) -> float:
        return self.wall_s - self.step_s


def step_times(run: Path, batch_tokens: int) -> list[float]:
    """Each step's seconds as the trainer measured them (from one step's end to the next's)."""
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [batch_tokens / row["tokens_per_s"] for row in rows]


def train_argv(cache: Path, out: Path, sizes: Sizes, arch: str, layers: list[int] | None) -> list[str]:
    argv = ["--shards", str(cache), "--out", str(out), "--arch", arch, "--expansion-factor", str(sizes.expansion_factor),
            "-k", str(sizes.k), "--batch-tokens", str(sizes.batch_tokens), "--lr", "1e-3", "--no-progress"]  # fmt: skip
    return argv + (["--layers", *map(str, layers)] if layers is not None else [])


def train_command() -> list[str]:
    """mlsae-train as a user types it: the console script beside this Python, else ``python -m``."""
    script = Path(sys.executable).parent / "mlsae-train"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlsae_train.cli"]


def run_once(cache: Path, out: Path, sizes: Sizes, arch: str, layers: list[int] | None, how: str) -> Invocation:
    """Train one run from scratch in ``out``, ``how`` = "cli" (a new process) or "in-process" (train(config))."""
    argv = train_argv(cache, out, sizes, arch, layers)
    evict_from_page_cache(cache)
    who = resource.RUSAGE_CHILDREN if how == "cli" else resource.RUSAGE_SELF
    blocks_before = resource.getrusage(who).ru_inblock
    start = time.perf_counter()
    if how == "cli":
        done = subprocess.run([*train_command(), *argv], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mlsae-train {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    else:
        train(TrainConfig(shards=[str(cache)], out=str(out), arch=arch, expansion_factor=sizes.expansion_factor, k=sizes.k,
                          batch_tokens=sizes.batch_tokens, lr=1e-3, progress=False, layers=layers))  # fmt: skip
    wall = time.perf_counter() - start
    read_mb = (resource.getrusage(who).ru_inblock - blocks_before) * 512 / 1e6
    steps = step_times(out, sizes.batch_tokens)
    label = arch if layers is None else f"--layers {layers[0]}"
    return Invocation(label, wall, sum(steps), steps[0], statistics.median(steps), len(steps), read_mb)


def suite_against_separate_runs(cache: Path, work: Path, sizes: Sizes, repeats: int) -> dict:
    """The best of ``repeats`` of each of the four ways (suite / separate x cli / in-process)."""
    layers = list(range(sizes.layers))
    # untimed: the first train() in a process pays one-time costs (lazy imports, thread pools) no later one does
    run_once(cache, work / "warm-up", sizes, "per-layer", None, "in-process")
    shutil.rmtree(work / "warm-up")
    best: dict[str, list[Invocation]] = {}
    max_weight_difference = 0.0
    for repeat in range(repeats):
        for how in ("cli", "in-process"):
            suite_dir = work / f"{how}-suite"
            suite = [run_once(cache, suite_dir, sizes, "per-layer", None, how)]
            separate = []
            for layer in layers:
                separate.append(run_once(cache, work / f"{how}-layer{layer}", sizes, "mlsae", [layer], how))
            if repeat == 0:  # the same steps: SAE l of the suite ends where the --layers l run ends
                suite_sae = load_sae(suite_dir)
                for index, layer in enumerate(layers):
                    single = load_sae(work / f"{how}-layer{layer}")
                    for name in ("W_enc", "W_dec", "b_pre"):
                        difference = (getattr(suite_sae, name)[index] - getattr(single, name)).abs().max().item()
                        max_weight_difference = max(max_weight_difference, difference)
            for key, runs in ((f"{how}/suite", suite), (f"{how}/separate", separate)):
                if key not in best or sum(r.wall_s for r in runs) < sum(r.wall_s for r in best[key]):
                    best[key] = runs
            for folder in [suite_dir, *(work / f"{how}-layer{layer}" for layer in layers)]:
                shutil.rmtree(folder)
    verify_s = min(_timed(lambda: ActivationDataset([cache]).damaged_shards()) for _ in range(repeats))
    startup_s = min(_timed(lambda: subprocess.run([*train_command(), "--help"], capture_output=True, check=True))
                    for _ in range(repeats))  # fmt: skip
    figures: dict = {"max_weight_difference": max_weight_difference, "verify_s": verify_s, "command_startup_s": startup_s}
    for key, runs in best.items():
        figures[key] = {"wall_s": sum(r.wall_s for r in runs), "step_s": sum(r.step_s for r in runs),
                        "first_step_s": sum(r.first_step_s for r in runs), "fixed_s": sum(r.fixed_s for r in runs),
                        "read_mb": sum(r.read_mb for r in runs), "steady_step_s": sum(r.median_step_s * r.steps for r in runs),
                        "invocations": [asdict(r) for r in runs]}  # fmt: skip
    for how in ("cli", "in-process"):
        suite, separate = figures[f"{how}/suite"], figures[f"{how}/separate"]
        figures[f"{how}/speedup"] = separate["wall_s"] / suite["wall_s"]
        figures[f"{how}/step_speedup"] = separate["step_s"] / suite["step_s"]
        figures[f"{how}/later_step_speedup"] = (separate["step_s"] - separate["first_step_s"]) / (suite["step_s"] - suite["first_step_s"])
        figures[f"{how}/steady_step_speedup"] = separate["steady_step_s"] / suite["steady_step_s"]
    return figures


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_suite(figures: dict, sizes: Sizes, cache_bytes: int) -> None:
    L = sizes.layers
    print(f"\n1. per-layer suite vs {L} separate --layers runs: {L} layers x d={sizes.d}, {sizes.tokens:,} tokens "
          f"({cache_bytes / 1e6:.1f} MB float16), R={sizes.expansion_factor} k={sizes.k}, {sizes.batch_tokens} tokens a step, "
          "1 epoch; best of the repeats; page cache emptied before each run")  # fmt: skip
    print("   seconds              wall    steps (first, later)    fixed   read from disk (invocations)")
    for key in ("cli/suite", "cli/separate", "in-process/suite", "in-process/separate"):
        f = figures[key]
        print(f"   {key:20s} {f['wall_s']:6.2f}   {f['step_s']:6.2f} ({f['first_step_s']:5.2f}, {f['step_s'] - f['first_step_s']:6.2f})"
              f"   {f['fixed_s']:6.2f}   {f['read_mb']:7.1f} MB ({len(f['invocations'])})")  # fmt: skip
    for how in ("cli", "in-process"):
        print(f"   {how:10s} suite speedup {figures[f'{how}/speedup']:.2f}x (target >= 1.5); steps alone "
              f"{figures[f'{how}/step_speedup']:.2f}x, steps after the first {figures[f'{how}/later_step_speedup']:.2f}x, "
              f"steps at each run's median pace {figures[f'{how}/steady_step_speedup']:.2f}x")  # fmt: skip
    print(f"   one `mlsae-train --help` (process start and imports): {figures['command_startup_s']:.2f} s; "
          f"one checksum pass over the cache (verify): {figures['verify_s']:.3f} s")  # fmt: skip
    print(f"   suite vs separate runs, largest weight difference: {figures['max_weight_difference']:.2e} (same steps)")


# ----------------------------------------------------------------------------------------------------
# 2 and 3. One training step of each family, and the floors
# ----------------------------------------------------------------------------------------------------


def family_steps(sizes: Sizes, seed: int = 0) -> tuple[dict[str, Callable[[], None]], torch.Tensor]:
    """{contender: one call = one step}: the three families' train_step and the two floors, on one batch x [N, L, d]."""
    L, d, N, k = sizes.step_layers, sizes.step_d, sizes.step_tokens, sizes.step_k
    n = sizes.step_expansion_factor * d
    x = torch.from_numpy(synthetic_activations(N, L, d, seed))  # [N, L, d]
    contenders: dict[str, Callable[[], None]] = {}
    for arch, family in FAMILIES.items():
        model = family(d, n, k, list(range(L)), generator=torch.Generator().manual_seed(seed))
        model.init_b_pre_(x)
        optimizer = make_optimizer(model, 1e-4)
        tracker = DeadLatentTracker(model.dead_shape, 10_000_000)  # no latent dies in a few steps: AuxK stays idle

        def step(model=model, optimizer=optimizer, tracker=tracker) -> None:
            train_step(model, optimizer, tracker, x, N, 1 / 32)

        contenders[arch] = step
    generator = torch.Generator().manual_seed(seed)
    tokens_rows = x.reshape(N, L * d)  # [N, L*d]: the crosscoder encodes one row per token
    W_tokens = torch.randn(n, L * d, generator=generator)  # [n, L*d]
    vector_rows = x.reshape(N * L, d)  # [N*L, d]: the MLSAE and the per-layer suite, one row per (token, layer)
    W_vectors = torch.randn(n, d, generator=generator)  # [n, d]
    contenders["floor/crosscoder"] = lambda: (tokens_rows @ W_tokens.T).topk(k, dim=1, sorted=False)  # [N, n]
    contenders["floor/mlsae"] = lambda: (vector_rows @ W_vectors.T).topk(k, dim=1, sorted=False)  # [N*L, n]
    return contenders, x


def step_rates(sizes: Sizes, warmup: int, rounds: int) -> dict:
    """Seconds per step of each contender, round robin; vectors/s and tokens/s of the best and median step."""
    contenders, _ = family_steps(sizes)
    for step in contenders.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            times[name].append(_timed(step))
    N, L = sizes.step_tokens, sizes.step_layers
    figures: dict = {}
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        figures[name] = {"seconds": seconds, "best_s": best, "tokens_per_s": N / best, "vectors_per_s": N * L / best,
                         "median_tokens_per_s": N / median}  # fmt: skip
    figures["crosscoder/floor"] = figures["floor/crosscoder"]["best_s"] / figures["crosscoder"]["best_s"]
    figures["mlsae/floor"] = figures["floor/mlsae"]["best_s"] / figures["mlsae"]["best_s"]
    return figures


def print_steps(figures: dict, sizes: Sizes, rounds: int) -> None:
    L, d = sizes.step_layers, sizes.step_d
    n = sizes.step_expansion_factor * d
    print(f"\n2-3. one training step: L={L} d={d}, n={n:,} (R={sizes.step_expansion_factor}) and k={sizes.step_k} for every "
          f"family, {sizes.step_tokens} tokens = {sizes.step_tokens * L:,} vectors a step, float32, Adam; best of {rounds} rounds")  # fmt: skip
    print("   contender            vectors/s    tokens/s   (median step: tokens/s)")
    for name in (*FAMILIES, "floor/mlsae", "floor/crosscoder"):
        f = figures[name]
        print(f"   {name:18s} {f['vectors_per_s']:11,.0f} {f['tokens_per_s']:11,.0f}   ({f['median_tokens_per_s']:,.0f})")
    print(f"   crosscoder / its floor (matmul [N, L*d] x [L*d, n] + top-k over [N, n]): {figures['crosscoder/floor']:.2f}")
    print(f"   mlsae / its floor (matmul [N*L, d] x [d, n] + top-k over [N*L, n]): {figures['mlsae/floor']:.2f}")


def profile_steps(sizes: Sizes) -> None:
    from torch.profiler import ProfilerActivity, profile

    contenders, _ = family_steps(sizes)
    for arch in FAMILIES:
        contenders[arch]()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            contenders[arch]()
        print(f"\nprofile of one {arch} step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="toy sizes, one repeat: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of part 1 (the best is kept)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of parts 2 and 3 (one step of each contender a round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each contender before the rounds")
    parser.add_argument("--skip-suite", action="store_true", help="skip part 1 (the suite against separate runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--profile", action="store_true", help="print a torch profiler table of one step of each family")
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else FULL
    repeats, rounds = (1, 2) if args.small else (args.repeats, args.rounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load:.1f}")
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "small": args.small,
                    "sizes": asdict(sizes), "load_average_start": load, "cores": os.cpu_count()}  # fmt: skip
    if not args.skip_suite:
        with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
            acts = synthetic_activations(sizes.tokens, sizes.layers, sizes.d, seed=1)
            cache = write_array_cache(Path(tmp) / "cache", acts, dtype="float16", shard_tokens=max(1, sizes.tokens // 4))
            cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            report["suite"] = suite_against_separate_runs(cache, Path(tmp), sizes, repeats)
        print_suite(report["suite"], sizes, cache_bytes)
    report["steps"] = step_rates(sizes, args.warmup, rounds)
    print_steps(report["steps"], sizes, rounds)
    if args.profile:
        profile_steps(sizes)
    report["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {report['load_average_end']:.1f}")
    if args.json is not None:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
