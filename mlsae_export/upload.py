"""``mlsae-export hub RUN --repo ORG/NAME``: upload a finished run, with a model card, to the Hugging Face Hub.

The repo receives, in ONE commit (so it never holds half a run): config.json, sae.safetensors, metrics.jsonl
(when the run has it), README.md (model_card.py), with --saelens the run as SAELens SAEs under saelens/ (which
SAELens's own ``SAE.from_pretrained("ORG/NAME", "saelens/blocks.L.hook_resid_post")`` loads), and a checksums.json
covering every other file, which
``load_sae("ORG/NAME")`` checks after downloading (mlsae_train/hub.py). The files are copied into a temporary
folder first and checked there (the run's own checksums, the weights' digest), so what is uploaded is what was
verified. Not uploaded: checkpoint.safetensors (the Adam state; the card says so).

Everything that can be refused is refused, in one line, before anything is sent: a missing, damaged or
unfinished run (unless --allow-unfinished), an analysis of another run, no token, and the hub out of reach
(checked first, at once).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlsae_analysis.inputs import check_finished, read_run_info, training_record
from mlsae_analysis.layout import read_summary
from mlsae_cache.atomic import atomic_write_text
from mlsae_cache.errors import MlsaeError, first_line
from mlsae_cache.integrity import RECORD_FILE, has_record, record_files, verify_files, warn_once
from mlsae_train.checkpoint import CONFIG_FILE, METRICS_FILE, SAE_FILE, load_sae_and_progress, weights_digest
from mlsae_train.formats import FORMATS
from mlsae_train.hub import hub_endpoint, hub_unreachable_reason, parse_hub_name, transport_errors
from mlsae_train.imported import is_imported

from .config import HubExportConfig
from .model_card import model_card

CARD_FILE = "README.md"
SAELENS_DIR = "saelens"
"""Where --saelens puts the run's SAELens SAEs in the repo, one folder per layer (formats/saelens.py)."""
UPLOADED = (CONFIG_FILE, SAE_FILE, METRICS_FILE)
"""The run's files that go to the hub (metrics.jsonl when present), beside the card and the checksum record."""
RUN_FIX = "restore the run's files from a copy, or train it again"


def upload_run(config: HubExportConfig) -> str:
    """Upload the run ``config.run`` to ``config.repo``; returns the repo's URL."""
    name = parse_hub_name(config.repo)
    if name is None or name.revision or name.subfolder:
        raise MlsaeError(f"--repo {config.repo!r} is not a Hugging Face Hub repo name; give ORG/NAME (your user name or an organisation)")
    repo_id = name.repo_id
    if (reason := hub_unreachable_reason()) is not None:
        raise MlsaeError(f"cannot reach the Hugging Face Hub to upload to {repo_id}: {reason}; run where the hub is reachable")
    run = Path(config.run)
    if not (run / SAE_FILE).is_file() or not (run / CONFIG_FILE).is_file():
        missing = SAE_FILE if not (run / SAE_FILE).is_file() else CONFIG_FILE
        if not run.exists():
            raise MlsaeError(f"the run {run} does not exist; give a run directory written by mlsae-train")
        raise MlsaeError(f"{run} is not a finished run directory written by mlsae-train (no {missing}); give one")
    token = _token()
    with tempfile.TemporaryDirectory(prefix="mlsae-hub-") as tmp:
        staged = _stage(run, Path(tmp), repo_id, config)
        return _commit(staged, repo_id, config.private, token, run)


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise MlsaeError(
            "no Hugging Face token to upload with: log in with `hf auth login`, or set HF_TOKEN to a token with write access"
        )
    return token


def _stage(run: Path, staged: Path, repo_id: str, config: HubExportConfig) -> Path:
    """Copy the run's files to ``staged``, check them there, and add the card and a checksum record of them all."""
    for name in (*UPLOADED, RECORD_FILE):
        if (run / name).is_file():
            shutil.copyfile(run / name, staged / name)
    try:
        sae, progress = _checked_copy(staged, run)
    except MlsaeError as exc:  # name the run's file, not its copy's
        raise type(exc)(str(exc).replace(str(staged), str(run))) from None
    if is_imported(sae):
        raise MlsaeError(f"{run} holds another tool's SAEs, not an mlsae-train run; upload a run trained with mlsae-train")
    training = training_record(progress)
    check_finished(run, training, config.allow_unfinished, "upload")  # the card says how far they got
    run_info = read_run_info(staged)
    summary = None
    if config.analysis is not None:
        summary = read_summary(config.analysis)
        check_analysis_of_run(summary, run_info, progress, config.analysis, run)
    saelens_folders = []
    if config.saelens:  # a crosscoder or a tuned-lens run is refused here, before anything is sent
        exported = FORMATS["saelens"].export(sae, {**run_info, "training": training}, staged / SAELENS_DIR, config.model_name)
        saelens_folders = [folder.relative_to(staged).as_posix() for folder in exported]
    atomic_write_text(staged / CARD_FILE, model_card(repo_id, run_info, progress, summary, saelens_folders))
    record_files(staged)  # every file below it, the SAELens copies included
    return staged


def _checked_copy(staged: Path, run: Path):
    """The copied run checked against the run's checksum record (config.json) and the weights' own checksum:
    ``(sae, progress)``."""
    if not has_record(staged):
        warn_once(str(run), f"{run} has no {RECORD_FILE} (written before mlsae recorded checksums): its config.json is uploaded unverified")
    verify_files(staged, None, RUN_FIX, warn_unrecorded=False)
    (staged / RECORD_FILE).unlink(missing_ok=True)  # written afresh over exactly what is uploaded
    return load_sae_and_progress(staged)


def check_analysis_of_run(summary: dict, run_info: dict, progress: dict | None, analysis: str | Path, run: Path) -> None:
    """Refuse an analysis whose SAE is not this run's: its family, shape, layers, training data and training
    progress must all be the run's."""
    sae = run_info.get("sae") or {}
    expected = {
        "arch": sae.get("arch", "mlsae"), "d_model": sae.get("d_model"), "n_latents": sae.get("n_latents"),
        "k": sae.get("k"), "layers": list(sae.get("layers") or []),
    }  # fmt: skip
    found = {key: summary.get(key) for key in expected}
    found["layers"] = list(found["layers"] or [])
    identity = ("model", "n_tokens", "layers", "d_model", "lens")
    if summary.get("train_data") is not None and run_info.get("data") is not None:
        expected["training cache"] = [{key: entry.get(key) for key in identity} for entry in run_info["data"]]
        found["training cache"] = [{key: entry.get(key) for key in identity} for entry in summary["train_data"]]
    if summary.get("weights_digest") is not None:  # analyses written before it recorded one: the checks above only
        expected["weights"] = weights_digest(run)
        found["weights"] = summary["weights_digest"]
    if summary.get("training") and progress and "step" in progress:
        expected["training steps"] = int(progress["step"])
        found["training steps"] = int(summary["training"].get("steps", -1))
    for key, value in expected.items():
        if found[key] != value:
            raise MlsaeError(
                f"the analysis {analysis} is not of the run {run} (its {key} is {_short(found[key])}, the run's "
                f"{_short(value)}); give --analysis an mlsae-analyse folder of this run"
            )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _commit(staged: Path, repo_id: str, private: bool, token: str, run: Path) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError

    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    files = sorted(path.relative_to(staged).as_posix() for path in staged.rglob("*") if path.is_file())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if private and api.repo_info(repo_id).private is False:
            raise MlsaeError(
                f"{repo_id} already exists on the Hugging Face Hub and is public, and --private asks for a private repo; "
                "make it private in its settings, or drop --private"
            )
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name)) for name in files],
            commit_message=f"Upload the mlsae run {run.name} ({', '.join(files)})",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403, 404):
            raise MlsaeError(
                f"the Hugging Face Hub ({endpoint}) refused to write to {repo_id} ({status}): use a token with write access "
                "to that user or organisation (`hf auth login`, or HF_TOKEN); nothing was uploaded"
            ) from None
        raise MlsaeError(
            f"the Hugging Face Hub ({endpoint}) answered {status} while uploading to {repo_id}; nothing was committed: "
            "run the same command again later"
        ) from None
    except transport_errors() as exc:  # the connection dropped, or timed out
        raise _lost(endpoint, repo_id, exc) from None
    return str(url)


def _lost(endpoint: str, repo_id: str, exc: BaseException) -> MlsaeError:
    reason = first_line(exc)
    return MlsaeError(
        f"lost the connection to the Hugging Face Hub ({endpoint}) while uploading to {repo_id} ({reason}); the upload "
        "is one commit, so the repo holds all of its files or none: run the same command again"
    )

