"""``mlsae-lens``: train a tuned lens for a model (``train``) or measure how well one fits it (``eval``).

The lens is written in the tuned-lens package's format (``config.json`` + ``params.pt``), so that
``mlsae-cache --lens DIR`` and the tuned-lens package itself both read it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Sequence

from .clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from .errors import MlsaeError
from .lens_config import LensEvalConfig, LensTrainConfig


def _run_train(config: LensTrainConfig) -> None:
    from .integrity import RECORD_FILE
    from .lens import LENS_CONFIG, LENS_PARAMS
    from .lens_train import CHECKPOINT_FILE, TRAINING_FILE, train_lens  # heavy imports only once the arguments are valid

    _check_lens_out(Path(config.out), (LENS_CONFIG, LENS_PARAMS, TRAINING_FILE, CHECKPOINT_FILE, RECORD_FILE), LENS_CONFIG)
    train_lens(config)


def _check_lens_out(out: Path, lens_files: tuple[str, ...], lens_config: str) -> None:
    """--out is a folder that holds nothing but a lens's own files (the only files --overwrite replaces)."""
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file; give a directory for the lens (config.json and params.pt go there)")
    if not out.is_dir():
        return
    for child in sorted(out.iterdir()):
        temporary = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", child.name)  # an atomic write killed half-way
        name = temporary.group(1) if temporary else child.name
        if not (child.is_file() and name in lens_files) or (child.name == lens_config and not _is_lens_config(child)):
            raise MlsaeError(f"--out {out} holds {child.name}, which is not a lens file; choose a new or empty --out for the lens")


def _is_lens_config(path: Path) -> bool:
    """A tuned lens's config.json (config.json is a common name: a model folder has one too)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "base_model_name_or_path" in content


def _run_eval(config: LensEvalConfig) -> None:
    from .lens_train import evaluate_lens

    evaluate_lens(config)


# subcommand -> (options, description, what runs it)
SUBCOMMANDS = {
    "train": (LensTrainConfig, "Train a tuned lens (KL to the model's final logits) and save it in the tuned-lens format; "
              "reports the held-out KL of the identity and of the trained lens per layer.", _run_train),
    "eval": (LensEvalConfig, "Check that a tuned lens fits a model and measure, per layer, the KL to the final logits "
             "through the identity and through the lens.", _run_eval),
}  # fmt: skip


def _subcommand(name: str, argv: Sequence[str]) -> int:
    config_class, description, run = SUBCOMMANDS[name]
    parser = OneLineErrorParser(prog=f"mlsae-lens {name}", description=description)
    add_dataclass_arguments(parser, config_class)
    config = config_from_args(config_class, parser.parse_args(argv))
    config.check()
    run(config)
    return 0


def _entry(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print("usage: mlsae-lens {train,eval} ...\n  train  train a tuned lens for a model\n  eval   check a lens against a model and measure its KL")
            return 0
        raise MlsaeError(f"mlsae-lens needs a subcommand: {' or '.join(SUBCOMMANDS)} (e.g. mlsae-lens train --model M --dataset D --out LENS)")
    return _subcommand(argv[0], argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_entry, argv)


if __name__ == "__main__":
    sys.exit(main())
