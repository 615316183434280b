"""Benchmark the analysis: encoding speed against the trainer's forward, and memory against token count.

    .venv/bin/python scripts/bench_analysis.py [--tokens 100000] [--d-model 512] [--expansion-factor 16]
        [--k 32] [--layers 6] [--batch-tokens 4096] [--rounds 6] [--round-tokens 16384] [--memory-tokens 100000]
        [--run RUN --shards TEST_CACHE] [--skip-encoding] [--skip-memory] [--out DIR]

1. Encoding. A synthetic float16 cache (--tokens tokens, --layers layers of width --d-model) and an
   SAE of R * d latents. Timed in turns, --rounds times, each over the first --round-tokens tokens
   (short rounds, so that a busy neighbour slows both contenders of a round alike):
     trainer forward  ``MultiLayerSAE.reconstruct`` (the forward of ``mlsae_train.step``) on batches
                      of --batch-tokens tokens already in memory, no backward (no_grad);
     analysis encode  ``mlsae_analysis.encode.encode_cache`` as ``mlsae-analyse`` runs it: read the
                      cache, encode, accumulate the reconstruction metrics and residual statistics,
                      write the sparse latents as parquet.
   Each with the float32 kernel, and, where ``--screen auto`` picks it (bfloat16 matmuls are fast
   here), with the exact bfloat16 screen. Prints tokens/s of each (median over rounds) and the median
   over rounds of the ratio encode / forward within a round: the defaults (mlsae-analyse --screen
   auto against mlsae-train's default float32 kernel; target >= 1) and like for like. The order within
   a round rotates. With --run and
   --shards the same timing runs on a trained SAE and its held-out cache instead.
2. Memory. Synthetic sparse latents (as encode_cache writes them) of --memory-tokens and 4x as many
   tokens; in a fresh process each, the peak resident memory (VmHWM, above the process's footprint
   after imports) of what ``mlsae-analyse`` computes from latents/: the per-latent layer statistics
   (heatmap table, ratios), layer_distributions.parquet and examples.parquet.

The data lives under --out (default /tmp/mlsae_bench_analysis) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_variance_ratios import generate as generate_latents  # noqa: E402

from mlsae_analysis.encode import encode_cache  # noqa: E402
from mlsae_analysis.inputs import open_run_and_cache  # noqa: E402
from mlsae_analysis.metrics import ReconstructionMetrics  # noqa: E402
from mlsae_analysis.residual import ResidualStatistics  # noqa: E402
from mlsae_cache import write_array_cache  # noqa: E402
from mlsae_train import MultiLayerSAE, save_sae  # noqa: E402
from mlsae_train.screened_topk import bf16_matmul_is_fast  # noqa: E402

MEMORY_TASKS = ("layer statistics", "layer_distributions.parquet", "examples.parquet")


def build_cache_and_sae(root: Path, args: argparse.Namespace) -> None:
    """A float16 cache of Gaussian activations with a per-layer offset, and a random SAE over it."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((args.tokens, args.layers, args.d_model), dtype=np.float32)  # [N, nL, d]
    acts += 2 * rng.standard_normal((1, args.layers, args.d_model), dtype=np.float32)
    write_array_cache(root / "cache", acts, dtype="float16", seq_len=1024, shard_tokens=16384)
    sae = MultiLayerSAE(args.d_model, args.d_model * args.expansion_factor, args.k, layers=list(range(args.layers)),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    save_sae(sae, root / "sae.safetensors")


def time_encoding(root: Path, args: argparse.Namespace) -> dict:
    if args.run:  # a real trained SAE and its held-out cache
        data = open_run_and_cache(args.run, args.shards)
    else:
        data = open_run_and_cache(root / "sae.safetensors", root / "cache")
    n, batch = min(args.round_tokens, data.cache.n_tokens), args.batch_tokens
    acts = torch.from_numpy(data.cache.read_range(0, n))  # [n, nL, d] in memory for the trainer's forward
    n_layers, d, n_latents = acts.shape[1], acts.shape[2], data.sae.n_latents

    @torch.no_grad()
    def trainer_forward(screen: bool) -> None:
        for start in range(0, n, batch):
            data.sae.reconstruct(acts[start : start + batch], project_decoder_grad=True, screen=screen)

    def analysis_encode(screen: bool) -> None:
        out = root / "analysis"
        shutil.rmtree(out, ignore_errors=True)
        residual = ResidualStatistics(list(range(n_layers)), data.cache.layer_means())
        consumers = [ReconstructionMetrics(n_layers, d, n_latents), residual]
        encode_cache(data, out, n, consumers, batch, "cpu", progress=False, screen=screen)

    auto = bf16_matmul_is_fast("cpu")  # what --screen auto picks here, in mlsae-train and mlsae-analyse alike
    contenders = {
        "trainer forward, float32 kernel": lambda: trainer_forward(False),
        "analysis encode, float32 kernel": lambda: analysis_encode(False),
    }
    if auto:
        contenders["trainer forward, screen"] = lambda: trainer_forward(True)
        contenders["analysis encode, screen"] = lambda: analysis_encode(True)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]  # rotate who goes first
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"  round {round_index + 1}: {name} {n / seconds[name][-1]:,.0f} tokens/s", flush=True)

    def ratio(encode: str, forward: str) -> float:
        return statistics.median(f / e for f, e in zip(seconds[forward], seconds[encode]))

    # the defaults (mlsae-analyse --screen auto, mlsae-train --screen off) first: the target
    pairs = [("analysis encode, float32 kernel", "trainer forward, float32 kernel", "like for like, --screen off")]
    if auto:
        pairs = [("analysis encode, screen", "trainer forward, float32 kernel", "the defaults; target >= 1"),
                 ("analysis encode, screen", "trainer forward, screen", "like for like, mlsae-train --screen on")] + pairs  # fmt: skip
    else:
        pairs[0] = (*pairs[0][:2], "the defaults here; target >= 1")
    ratios = {f"{encode} / {forward} ({note})": ratio(encode, forward) for encode, forward, note in pairs}
    return {"tokens": n, "seconds": seconds, "ratios": ratios}


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(task: str, latents_dir: Path, n_layers: int) -> dict:
    """Run in a fresh process: one task over the latents; its time and peak RSS above the start.

    The peak is VmHWM, reset just before the task (ru_maxrss would not do: a child process inherits
    its parent's high-water mark through fork and exec, here the parent's activations).
    """
    from mlsae_analysis.examples import top_examples
    from mlsae_analysis.layer_distributions import (
        latent_layer_table,
        layer_statistics,
        variance_ratios,
        write_layer_distributions,
    )

    latents = pl.scan_parquet(str(latents_dir / "chunk_*.parquet"))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start_mib = _status_mib("VmRSS")
    start = time.perf_counter()
    if task == "layer statistics":
        stats = layer_statistics(latents, n_layers)
        latent_layer_table(stats)
        variance_ratios(stats)
    elif task == "layer_distributions.parquet":
        write_layer_distributions(latents, latents_dir / "layer_distributions.parquet")
    else:
        top_examples(latents, pl.scan_parquet(latents_dir / "tokens.parquet"), 10, 4)
    seconds = time.perf_counter() - start
    peak_mib = _status_mib("VmHWM")
    return {"seconds": seconds, "peak_mib": peak_mib, "above_start_mib": peak_mib - start_mib}


def memory_table(root: Path, args: argparse.Namespace) -> dict:
    results = {}
    for scale in (1, 4):
        n_tokens = args.memory_tokens * scale
        latents_dir = root / f"latents-{scale}x"
        rows = generate_latents(latents_dir, n_tokens, args.layers, args.k, args.d_model * args.expansion_factor)
        tokens = np.arange(n_tokens, dtype=np.int64)
        pl.DataFrame({"token": tokens, "sequence": tokens // 1024, "position": (tokens % 1024).astype(np.int32),
                      "token_id": np.zeros(n_tokens, np.int32)}).write_parquet(latents_dir / "tokens.parquet")  # fmt: skip
        for task in MEMORY_TASKS:
            command = [sys.executable, __file__, "--measure", task, "--out", str(latents_dir), "--layers", str(args.layers)]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            results[(task, scale)] = {**json.loads(result.stdout.strip().splitlines()[-1]), "rows": rows, "tokens": n_tokens}
            above = results[(task, scale)]["above_start_mib"]
            print(f"  {task} over {n_tokens:,} tokens ({rows:,} rows): {above:,.0f} MiB", flush=True)
        shutil.rmtree(latents_dir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--expansion-factor", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-tokens", type=int, default=16384)
    parser.add_argument("--memory-tokens", type=int, default=100_000)
    parser.add_argument("--run", help="time the encoding on this trained run (with --shards) instead of a synthetic SAE")
    parser.add_argument("--shards", help="the held-out cache for --run")
    parser.add_argument("--skip-encoding", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlsae_bench_analysis"))
    parser.add_argument("--measure", choices=MEMORY_TASKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_memory(args.measure, args.out, args.layers)))
        return

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    n_latents = args.d_model * args.expansion_factor
    shape = f"d={args.d_model}, R={args.expansion_factor} ({n_latents:,} latents), k={args.k}, {args.layers} layers"
    try:
        if not args.skip_encoding:
            threads = torch.get_num_threads()
            print(f"encoding: cache of {args.tokens:,} tokens, {shape}; {args.rounds} rounds of {args.round_tokens:,} tokens "
                  f"in batches of {args.batch_tokens}, {threads} threads")
            if args.run:
                if not args.shards:
                    parser.error("--run needs --shards (its held-out cache)")
                print(f"  on the trained SAE {args.run} and the cache {args.shards} (the shape options are ignored)")
            else:
                build_cache_and_sae(args.out, args)
            timing = time_encoding(args.out, args)
            print()
            print("| | tokens/s (median) |")
            print("| --- | ---: |")
            for name, secs in timing["seconds"].items():
                print(f"| {name} | {timing['tokens'] / statistics.median(secs):,.0f} |")
            for name, ratio in timing["ratios"].items():
                print(f"| **{name}** | **{ratio:.2f}** |")
        if not args.skip_memory:
            print(f"\nmemory: latents of {args.memory_tokens:,} and {4 * args.memory_tokens:,} tokens, {shape}")
            results = memory_table(args.out, args)
            print()
            one, four = args.memory_tokens, 4 * args.memory_tokens
            print(f"| peak RSS above start (MiB) | {one:,} tokens | {four:,} tokens | seconds (1x, 4x) |")
            print("| --- | ---: | ---: | ---: |")
            for task in MEMORY_TASKS:
                one, four = results[(task, 1)], results[(task, 4)]
                print(f"| {task} | {one['above_start_mib']:,.0f} | {four['above_start_mib']:,.0f} | "
                      f"{one['seconds']:.1f}, {four['seconds']:.1f} |")  # fmt: skip
    finally:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
