"""Runs on the Hugging Face Hub: ``load_sae("ORG/NAME")`` and ``mlsae-analyse --run ORG/NAME`` fetch them here.

A hub name is ``ORG/NAME[@REVISION][/SUBFOLDER]`` (``@REVISION``: a branch, tag or commit; ``SUBFOLDER``: one run
or SAE folder of a repo that holds several, e.g. one per layer), and is only taken for one when no local path of
that name exists (nor a local folder named ORG: then it is a mistyped path). Only the files a run or another
tool's SAE folder needs are fetched (``*.json``, ``*.safetensors``, ``metrics.jsonl``, ``README.md``), into the
user's hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, as huggingface_hub keeps it); then every file is
checked: against the ``checksums.json`` of the download that lists it (an uploaded run carries one; its weights
also carry their own checksum, which ``load_sae`` checks), else against the hash the hub names it by (another
tool's SAE files). Offline (``HF_HUB_OFFLINE``, or the endpoint does not answer) a copy
already in the cache is used, else the fetch fails at once in one line.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at its import: they are
read here at each call instead and passed to it, so that they take effect whenever they are set. It is
imported only on the hub path: resolving a local path costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlsae_cache.errors import MlsaeError, first_line
from mlsae_cache.hub import hub_reachable, offline_settings
from mlsae_cache.integrity import RECORD_FILE, IntegrityError, recorded_files, verify_files

from .formats import check_hub_name

DEFAULT_ENDPOINT = "https://huggingface.co"
RUN_FILE_PATTERNS = ("*.json", "*.safetensors", "metrics.jsonl", "README.md")
"""What is fetched of a repo (below SUBFOLDER when given): a run's or a foreign SAE folder's files, not the rest."""

_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"  # the hub's repo and namespace names: no "--" or ".." (checked below)
_SPEC = re.compile(rf"(?P<org>{_NAME})/(?P<name>{_NAME})(?:@(?P<revision>[\w.-]+))?(?:/(?P<subfolder>[^@\\]+?))?/?", re.ASCII)


@dataclass(frozen=True)
class HubName:
    """``ORG/NAME[@REVISION][/SUBFOLDER]``."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f"/{self.subfolder}" if self.subfolder else "")


def parse_hub_name(spec: str) -> HubName | None:
    """The hub name ``spec`` spells, or None when it is not of the form ``ORG/NAME[@REVISION][/SUBFOLDER]``."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        return None
    org, name, subfolder = match["org"], match["name"], match["subfolder"]
    if any("--" in part or ".." in part for part in (org, name)) or name.endswith(".git"):
        return None
    if subfolder is not None and any(part in ("", ".", "..") for part in subfolder.split("/")):
        return None
    return HubName(f"{org}/{name}", match["revision"], subfolder)


def hub_endpoint() -> str:
    """The hub's address as set now (``HF_ENDPOINT``)."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The user's hub cache as set now, where huggingface_hub would put it (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be used now (offline by setting, or the endpoint does not answer), or None."""
    if named := offline_settings():
        return f"{' and '.join(named)} is set"
    if not hub_reachable():
        return f"{hub_endpoint()} does not answer"
    return None


def resolve_run(spec: str | Path) -> Path:
    """A local path as it is (no network); an ``ORG/NAME[@REVISION][/SUBFOLDER]`` that is no local path: the
    run (or foreign SAE folder) fetched from the hub into the hub cache and verified, as a local folder.

    Anything else that does not exist is returned unchanged, for the caller's own "does not exist" line.
    """
    path = Path(spec)
    if path.exists():
        return path
    name = parse_hub_name(str(spec))
    if name is None or Path(name.repo_id.split("/")[0]).is_dir():  # a local folder ORG: a mistyped local path
        return path
    check_hub_name(name.repo_id)  # a repo known by its name to be unreadable: said before any download
    return fetch_run(name)


def fetch_run(name: HubName) -> Path:
    """The repo's run files at ``name`` (downloaded, or from the hub cache offline), checked; its SUBFOLDER when given."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    prefix = f"{name.subfolder}/" if name.subfolder else ""
    cache = hub_cache_dir()
    unreachable = hub_unreachable_reason()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its warnings (e.g. "No files matched") would add lines to ours
    try:
        snapshot = Path(
            snapshot_download(
                name.repo_id, revision=name.revision, cache_dir=cache, endpoint=hub_endpoint(),
                allow_patterns=[prefix + pattern for pattern in RUN_FILE_PATTERNS], local_files_only=unreachable is not None,
            )
        )  # fmt: skip
    except LocalEntryNotFoundError as exc:  # offline, or the hub failed, and no (complete) copy in the cache
        cause = exc.__cause__
        if unreachable is None and isinstance(cause, HfHubHTTPError):  # the hub answered: what it said
            raise _hub_answer(name, cause) from None
        reason = unreachable or f"the connection failed ({first_line(cause or exc)})"
        raise MlsaeError(
            f"cannot reach the Hugging Face Hub to fetch {name}: {reason}, and the hub cache {cache} holds no complete copy "
            "of it; run where the hub is reachable, or download the repo and pass its folder"
        ) from None
    except HfHubHTTPError as exc:
        raise _hub_answer(name, exc) from None
    except transport_errors() as exc:  # the connection dropped during a download
        raise MlsaeError(
            f"lost the connection to the Hugging Face Hub while fetching {name} ({first_line(exc)}); run the same command "
            "again (what was downloaded is kept in the hub cache)"
        ) from None
    except OSError as exc:  # writing the cache: disk full, read-only
        raise MlsaeError(f"cannot write {name} into the hub cache {cache} ({first_line(exc)}); free space or set HF_HUB_CACHE") from None
    finally:
        hub_log.setLevel(level)
    folder = snapshot / name.subfolder if name.subfolder else snapshot
    if not folder.is_dir():
        what = f"no folder {name.subfolder}" if name.subfolder else "no files"
        raise MlsaeError(
            f"the Hugging Face Hub repo {name.repo_id} holds {what} with a run or an SAE in it (config.json, "
            "*.safetensors); check the name"
        )
    verify_download(folder, name, snapshot.parent.parent)
    return folder


def transport_errors() -> tuple[type[BaseException], ...]:
    """The errors of a refused, dropped or timed-out connection in the HTTP client huggingface_hub uses (httpx2 from
    its 2.0, httpx in 1.x, requests before) and Python's own ConnectionError."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _hub_answer(name: HubName, exc: Exception) -> MlsaeError:
    """The one line for an error answer of the hub about ``name``."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        return MlsaeError(
            f"{name.repo_id} is a gated repo on the Hugging Face Hub: accept its conditions on its page, then log in "
            "(`hf auth login`, or set HF_TOKEN) and run again"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return MlsaeError(
            f"{name} is not a local path, and the Hugging Face Hub ({hub_endpoint()}) has no repo {name.repo_id} that you "
            "can read; check the name, or log in (`hf auth login`, or set HF_TOKEN) if it is private"
        )
    if isinstance(exc, RevisionNotFoundError):
        return MlsaeError(
            f"the Hugging Face Hub repo {name.repo_id} has no revision {name.revision!r}; give one of its branches, tags "
            f"or commits after @, or drop @{name.revision} for its main branch"
        )
    response = getattr(exc, "response", None)
    status = response.status_code if response is not None else "an error"
    return MlsaeError(f"the Hugging Face Hub answered {status} when fetching {name} ({first_line(exc)}); try again later")


def verify_download(folder: Path, name: HubName, repo_cache: Path) -> None:
    """Check every file of ``folder``: against the ``checksums.json`` that lists it (an uploaded run carries one),
    else against the hash the hub named it by (another tool's SAE files)."""
    fix = (
        f"delete {repo_cache} (the hub cache's copy of {name.repo_id}) and run again to download it afresh; "
        "if it fails again the repo itself is damaged: ask its owner to upload it again"
    )
    covered: set[Path] = set()
    for record in sorted(folder.rglob(RECORD_FILE)):
        verify_files(record.parent, None, fix)
        covered.update(record.parent / listed for listed in recorded_files(record.parent) or [])
        covered.add(record)
    for path in sorted(folder.rglob("*")):
        if path not in covered and path.is_file():
            _check_hub_hash(path, fix)


def _check_hub_hash(path: Path, fix: str) -> None:
    """``path`` against the hash in the name of the cache blob it links to: the hub's ETag of the file, its sha256
    (LFS and Xet files) or its git blob id (small files). A file that is no such link (a folder laid out by hand) passes."""
    blob = path.resolve().name
    if path.resolve() == path.absolute() or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob):
        return
    hasher = hashlib.sha256() if len(blob) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            hasher.update(chunk)
    if hasher.hexdigest() != blob:
        raise IntegrityError(f"{path} is damaged: its content does not match the hash the hub gave it; {fix}")


