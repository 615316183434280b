"""``mlsae-export``: hand a trained run to the field's tools.

    mlsae-export saelens RUN --out DIR         one SAELens SAE per layer (SAE.load_from_disk reads each)
    mlsae-export hub RUN --repo ORG/NAME       upload the run with a model card; load_sae("ORG/NAME") fetches it
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mlsae_analysis.files import write_fresh_directory
from mlsae_analysis.inputs import check_finished, read_run_info, training_record
from mlsae_cache.clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from mlsae_cache.errors import MlsaeError
from mlsae_cache.path_kinds import require_run_path
from mlsae_train.checkpoint import load_sae_and_progress
from mlsae_train.formats import FORMATS
from mlsae_train.hub import resolve_run
from mlsae_train.imported import is_imported

from .config import HubExportConfig, SaelensExportConfig

NOTHING_KEPT = "nothing was kept (--out appears only once the export has finished); run the same command again"
NOTHING_SENT = "the upload is one commit, so the repo holds all of the run or none of this upload; run the same command again"
COMMANDS = ("saelens", "hub")


def build_parser(command: str) -> OneLineErrorParser:
    config = {"saelens": SaelensExportConfig, "hub": HubExportConfig}[command]
    parser = OneLineErrorParser(prog=f"mlsae-export {command}", description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, config, positional=("run",))
    return parser


def saelens_main(argv: Sequence[str]) -> int:
    config: SaelensExportConfig = config_from_args(SaelensExportConfig, build_parser("saelens").parse_args(argv))
    require_run_path(config.run, "RUN", cache_goes_to=None)
    run = resolve_run(config.run)
    sae, progress = load_sae_and_progress(run)
    if is_imported(sae):
        raise MlsaeError(f"{config.run} holds another tool's SAEs, not an mlsae-train run; export a run trained with mlsae-train")
    training = training_record(progress)
    check_finished(run, training, config.allow_unfinished, "export")
    run_info = {**read_run_info(run), "training": training}  # the export's metadata records the tokens trained
    folders: list[Path] = []
    out = Path(config.out)
    write_fresh_directory(out, lambda partial: folders.extend(FORMATS["saelens"].export(sae, run_info, partial, config.model_name)))
    for folder in folders:
        print(out / folder.name)
    print(f"wrote {len(folders)} SAELens SAE(s) to {out}; load one with sae_lens.SAE.load_from_disk(FOLDER)", file=sys.stderr)
    return 0


def hub_main(argv: Sequence[str]) -> int:
    config: HubExportConfig = config_from_args(HubExportConfig, build_parser("hub").parse_args(argv))
    require_run_path(config.run, "RUN", cache_goes_to=None)  # before the hub is probed: a cache is named as such, offline too
    from .upload import upload_run

    url = upload_run(config)
    print(url)
    return 0


def dispatch(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "saelens":
        return saelens_main(rest)
    if command == "hub":
        return hub_main(rest)
    raise MlsaeError(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)} (mlsae-export --help)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(dispatch, argv, resumes=NOTHING_SENT if argv[:1] == ["hub"] else NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())
