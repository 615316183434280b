"""Delta CE / KL splicing: replaying the clean prefix vs running the whole model for every splice.

    .venv/bin/python scripts/bench_splice.py [--tokens 256] [--layers all]

On the offline SmolLM2-135M asset, one sequence, every layer spliced with a fixed reconstruction
(0.9 x the hidden state, so the spliced outputs differ from the clean ones). Prints both wall times,
their ratio, and the largest difference between the two paths' delta CE (they must agree).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsae_analysis.downstream import downstream_metrics  # noqa: E402
from mlsae_cache.assets import ensure_smollm2  # noqa: E402
from mlsae_cache.lm import load_model, n_layers_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="sequence length")
    args = parser.parse_args()
    model = load_model(str(ensure_smollm2()))
    ids = torch.randint(0, 40_000, (1, args.tokens), generator=torch.Generator().manual_seed(0))  # [1, S]
    kept = torch.ones_like(ids, dtype=torch.bool)
    layers = list(range(n_layers_of(model)))
    times, tables = {}, {}
    for reuse in (True, False):
        start = time.perf_counter()
        tables[reuse] = downstream_metrics(model, ids, kept, layers, lambda h, _l: h * 0.9, 1, True, reuse_prefix=reuse)
        times[reuse] = time.perf_counter() - start
    gap = (tables[True]["delta_ce"] - tables[False]["delta_ce"]).abs().max()
    print(f"{len(layers)} layers x {args.tokens} tokens: replayed prefix {times[True]:.1f} s, whole model {times[False]:.1f} s, "
          f"speed-up {times[False] / times[True]:.2f}x; max |delta CE difference| {gap:.2e}")


if __name__ == "__main__":
    main()
