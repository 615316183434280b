"""The whole pipeline on the embedded offline default: real SmolLM2-135M over real Shakespeare.

    .venv/bin/python scripts/demo.py [--out outputs/demo] [--train-tokens 20000] [--test-tokens 4096]

Stage 1 caches the residual stream of every layer for a training and a held-out test split; stage 2
trains an MLSAE on the training cache; stage 3 analyses it on the test cache. Each stage is the
project's own command, so the demo is also a smoke test of them; each resumes where it stopped.
Ends by printing a short summary (FVU, delta CE, ratios 11 and 12) and where everything is.

SmolLM2 puts an attention sink on the first position of every sequence: its residual norm there reaches
~23,000 against a median of 135-240 at layers 11-27, so those 0.2% of tokens carry 97-99% of those
layers' variance and decide FVU (README, "The demo's token filter"). The caches therefore leave out
position 0 of every sequence (``--skip-positions 1``, counted in each manifest); pass
``--skip-positions 0`` (with another --out) to see the numbers with them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlsae_analysis import layout  # noqa: E402
from mlsae_cache.assets import ensure_shakespeare, ensure_smollm2  # noqa: E402
from mlsae_train.checkpoint import run_is_finished  # noqa: E402


def split_texts(shakespeare: Path, out: Path) -> tuple[Path, Path]:
    """Train on most works, test on a few held-out ones (whole files, so no text is in both).

    Only the modern-spelling files (``*_gut.txt``): the First Folio files (``*_gut_f.txt``) are the same
    plays again, which would leak held-out text into training.
    """
    files = sorted(shakespeare.glob("*_gut.txt"))
    test_names = {f.name for f in files[::10]}
    train_dir, test_dir = out / "text" / "train", out / "text" / "test"
    for folder, keep in ((train_dir, lambda n: n not in test_names), (test_dir, lambda n: n in test_names)):
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            if keep(f.name) and not (folder / f.name).exists():
                shutil.copy(f, folder / f.name)
    return train_dir, test_dir


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--train-tokens", type=int, default=20_000)
    parser.add_argument("--test-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--splice-sequences", type=int, default=4, help="test sequences spliced per layer for delta CE / KL (of the 8 in the default test split)")
    parser.add_argument("--skip-positions", type=int, default=1, help="positions left out at the start of every sequence "
                        "(SmolLM2's attention sink at position 0; 0 keeps them)")  # fmt: skip
    parser.add_argument("--max-norm-ratio", type=float, default=None, help="also leave out tokens above this multiple of a layer's median norm")
    args = parser.parse_args()
    out = Path(args.out)
    model, shakespeare = ensure_smollm2(), ensure_shakespeare()
    train_text, test_text = split_texts(shakespeare, out)

    common = ["--model", str(model), "--seq-len", str(args.seq_len), "--batch-size", "4", "--dtype", "float16",
              "--skip-positions", str(args.skip_positions)]  # fmt: skip
    if args.max_norm_ratio is not None:
        common += ["--max-norm-ratio", str(args.max_norm_ratio)]
    run_dir, analysis = out / "run", out / "analysis"
    try:
        run("mlsae_cache.cli", *common, "--dataset", str(train_text), "--out", str(out / "cache-train"), "--tokens", str(args.train_tokens))
        run("mlsae_cache.cli", *common, "--dataset", str(test_text), "--out", str(out / "cache-test"), "--tokens", str(args.test_tokens))
        if not run_is_finished(run_dir):  # a finished run is kept; an interrupted one resumes
            resume = ["--resume"] if (run_dir / "checkpoint.safetensors").exists() else []
            run("mlsae_train.cli", "--shards", str(out / "cache-train"), "--out", str(run_dir), "--expansion-factor", "8", "-k", "32",
                "--batch-tokens", "256", "--lr", "1e-3", "--epochs", str(args.epochs), "--save-every-tokens", "5000", *resume)  # fmt: skip
        if not (analysis / layout.SUMMARY).exists():
            run("mlsae_analysis.cli", "--run", str(run_dir), "--shards", str(out / "cache-test"), "--out", str(analysis),
                "--downstream-sequences", str(args.splice_sequences))  # fmt: skip
        if not (analysis / layout.PAGE).exists():  # an analysis written before the HTML report existed
            run("mlsae_analysis.html_report", str(analysis))
    except subprocess.CalledProcessError as exc:
        print(f"demo: a stage failed (exit {exc.returncode}); fix what it said and run the demo again to resume", file=sys.stderr)
        return 1
    print_summary(out, analysis)
    return 0


def print_summary(out: Path, analysis: Path) -> None:
    import polars as pl

    metrics = layout.read_table(analysis, layout.METRICS).with_columns(pl.col("layer").cast(pl.Utf8))
    mean = metrics.filter(pl.col("layer") == "mean").row(0, named=True)
    worst = metrics.filter(pl.col("layer") != "mean").sort("var_share_top_0.1pct", descending=True).row(0, named=True)
    ratios = layout.read_table(analysis, layout.VARIANCE_RATIOS).row(0, named=True)
    test_manifest = json.loads((out / "cache-test" / "manifest.json").read_text())
    left_out = test_manifest.get("tokens_left_out") or {}
    print()
    print("demo finished: SmolLM2-135M (30 layers) on Shakespeare -> MLSAE (R=8, k=32) -> analysis")
    skip = (test_manifest.get("token_filter") or {}).get("skip_positions", 0)
    where = "none skipped" if not skip else "position 0" if skip == 1 else f"positions 0-{skip - 1}"
    print(f"  test tokens: {test_manifest['n_tokens']:,} stored; left out {left_out.get('by_position', 0):,} at the start of "
          f"their sequence ({where}) and {left_out.get('by_norm', 0):,} above a norm threshold")  # fmt: skip
    print(f"  FVU {mean['fvu']:.3f}   delta CE {mean['delta_ce']:.3f} nats   KL {mean['kl_per_token']:.3f} nats/token")
    print(f"  top 0.1% of tokens by norm carry up to {worst['var_share_top_0.1pct']:.1%} of a layer's variance (layer {worst['layer']}); "
          f"FVU without them {mean['fvu_without_top_0.1pct']:.3f}")  # fmt: skip
    print(f"  ratio 11 (E_J[Var(L|J)] / Var(L)) {ratios['ratio_11']:.1%}   ratio 12 (E_J,T[Var(L|J,T)] / E_J[Var(L|J)]) {ratios['ratio_12']:.1%}")
    print(f"  caches : {out / 'cache-train'}  {out / 'cache-test'}")
    print(f"  MLSAE  : {out / 'run'}")
    print(f"  tables and figures: {analysis}  ({layout.METRICS}, {layout.VARIANCE_RATIOS}, {layout.HEATMAP_FIGURE}.png, ...)")
    print(f"  report : {analysis / layout.PAGE}  (tables, figures and a latent browser; open it in a browser)")


if __name__ == "__main__":
    sys.exit(main())
