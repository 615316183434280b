"""Benchmark the decoder-neighbour search (neighbours.parquet and MMCS, Table 2): float32 blocks vs the
exact bfloat16 screen.

    .venv/bin/python scripts/bench_neighbours.py [--latents 32768] [--d-model 512] [--k 5] [--rows 4096]

A random unit-norm decoder of --latents rows of width --d-model (the paper's largest is 131,072 x
1,024). Both searches run over the same first --rows latents (each against all --latents rows), in
turns, and must agree; prints rows/s of each, their ratio, and the time the whole search would take.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsae_analysis.mmcs import nearest_neighbours  # noqa: E402
from mlsae_train.screened_topk import bf16_matmul_is_fast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rows", type=int, default=4096, help="latents whose neighbours are timed")
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()

    W = torch.randn(args.latents, args.d_model, generator=torch.Generator().manual_seed(0))
    query = torch.arange(min(args.rows, args.latents))
    print(f"decoder {args.latents:,} x {args.d_model}, k={args.k}, {query.numel():,} query rows, "
          f"{torch.get_num_threads()} threads, bfloat16 matmul fast here: {bf16_matmul_is_fast('cpu')}")  # fmt: skip
    results = {}
    for screen in (False, True):
        nearest_neighbours(W, query[:64], args.k, args.chunk_size, screen=screen)  # warm up
        start = time.perf_counter()
        results[screen] = nearest_neighbours(W, query, args.k, args.chunk_size, screen=screen)
        seconds = time.perf_counter() - start
        name = "bfloat16 screen" if screen else "float32 blocks"
        results[name] = seconds
        whole = seconds * args.latents / query.numel()
        print(f"  {name}: {query.numel() / seconds:,.0f} rows/s; all {args.latents:,} latents: {whole:,.1f} s", flush=True)
    (dense_indices, dense_values), (screen_indices, screen_values) = results[False], results[True]
    agree = (dense_indices == screen_indices).all(dim=1).float().mean().item()
    print(f"same neighbours, same order: {agree:.2%} of rows; max cosine difference "
          f"{(dense_values - screen_values).abs().max().item():.1e}")  # fmt: skip
    print(f"screen / float32 speed: {results['float32 blocks'] / results['bfloat16 screen']:.2f}x")


if __name__ == "__main__":
    main()
