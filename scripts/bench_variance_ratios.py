"""Benchmark `variance_ratios` on ~100 million synthetic sparse latent rows read lazily from parquet.

Usage:
    .venv/bin/python scripts/bench_variance_ratios.py [--tokens 500000] [--layers 6] [--k 32]
        [--latents 32768] [--out /tmp/mlsae_bench_latents] [--keep]

The rows are written as parquet chunks (one chunk of tokens per file, rows ordered by token, as a
latent cache stores them), then `variance_ratios(pl.scan_parquet(...))` runs in a fresh subprocess so
that its peak resident memory (ru_maxrss) measures the analysis alone, not the generation.
The data lives under --out (default under /tmp, outside the repository) and is deleted afterwards
unless --keep is given.

Synthetic structure, chosen to look like an MLSAE's output rather than uniform noise: every latent
has a preferred layer; every token draws a pool of 3k candidate latents, and at each layer the k
active ones are the candidates that score highest on (noise - distance to their preferred layer), so
a latent is often active at several adjacent layers of the same token, as in the paper's fig 3.
Only the structure and the size matter here: the ratios it prints are not meant to match the paper's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

TOKENS_PER_CHUNK = 20_000


def synthetic_chunk(
    rng: np.random.Generator,
    first_token: int,
    n_tokens: int,
    n_layers: int,
    k: int,
    n_latents: int,
    preferred_layer: np.ndarray,  # [n_latents] float
) -> pl.DataFrame:
    """Sparse latents of `n_tokens` tokens: exactly k distinct latents per (token, layer)."""
    pool = 3 * k
    # Distinct candidates per token: slot s holds a latent from its own residue band, so no two
    # slots can collide. band = n_latents // pool latents per slot.
    band = n_latents // pool
    offset = rng.integers(0, n_latents, size=(n_tokens, 1))
    jitter = rng.integers(0, band, size=(n_tokens, pool))
    candidates = (offset + np.arange(pool) * band + jitter) % n_latents  # [n_tokens, pool]

    layers = np.arange(n_layers, dtype=np.float64)
    distance = np.abs(layers[None, :, None] - preferred_layer[candidates][:, None, :])  # [n_tokens, nL, pool]
    score = rng.gumbel(size=distance.shape) - 3.0 * distance
    chosen = np.argpartition(-score, k - 1, axis=2)[:, :, :k]  # [n_tokens, nL, k]
    latent = np.take_along_axis(candidates[:, None, :], chosen, axis=2)  # [n_tokens, nL, k]

    token = np.broadcast_to((first_token + np.arange(n_tokens))[:, None, None], latent.shape)
    layer = np.broadcast_to(np.arange(n_layers)[None, :, None], latent.shape)
    activation = rng.lognormal(mean=0.0, sigma=1.0, size=latent.shape).astype(np.float32)
    return pl.DataFrame(
        {
            "token": token.reshape(-1).astype(np.int64),
            "layer": layer.reshape(-1).astype(np.int16),
            "latent": latent.reshape(-1).astype(np.int32),
            "activation": activation.reshape(-1),
        }
    )


def generate(out: Path, n_tokens: int, n_layers: int, k: int, n_latents: int, seed: int = 0) -> int:
    """Write the chunks under `out`; return the number of rows written."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    preferred_layer = rng.uniform(-0.5, n_layers - 0.5, size=n_latents)
    rows = 0
    for chunk_index, first in enumerate(range(0, n_tokens, TOKENS_PER_CHUNK)):
        n = min(TOKENS_PER_CHUNK, n_tokens - first)
        frame = synthetic_chunk(rng, first, n, n_layers, k, n_latents, preferred_layer)
        frame.write_parquet(out / f"chunk_{chunk_index:05d}.parquet")
        rows += frame.height
    return rows


def measure(out: Path) -> dict:
    """Run in a fresh subprocess: time variance_ratios over the chunks and read this process's peak RSS."""
    from mlsae_analysis.layer_distributions import variance_ratios

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    start, start_cpu = time.perf_counter(), cpu_seconds()
    ratios = variance_ratios(pl.scan_parquet(out / "*.parquet"))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_gib": peak_gib, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--latents", type=int, default=32_768)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlsae_bench_latents"))
    parser.add_argument("--keep", action="store_true", help="keep the generated parquet chunks")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure_only:
        print(json.dumps(measure(args.out), default=float))
        return

    if not any(args.out.glob("*.parquet")):
        start = time.perf_counter()
        rows = generate(args.out, args.tokens, args.layers, args.k, args.latents)
        print(f"generated {rows:,} rows in {time.perf_counter() - start:.1f} s under {args.out}")
    else:
        print(f"reusing the chunks under {args.out}")
    rows = pl.scan_parquet(args.out / "*.parquet").select(pl.len()).collect().item()
    try:
        result = subprocess.run(
            [sys.executable, __file__, "--measure-only", "--out", str(args.out)],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    print(f"rows: {rows:,}")
    print(f"variance_ratios wall time: {report['seconds']:.1f} s (CPU time {report['cpu_seconds']:.1f} s)")
    print(f"peak resident memory of the measuring process: {report['peak_gib']:.2f} GiB")
    print("ratios:", json.dumps(report["ratios"], indent=1))


if __name__ == "__main__":
    main()
