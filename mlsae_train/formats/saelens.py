"""SAELens's folder format (SAELens 6): one SAE per folder, the files ``SAE.save_model`` writes and
``SAE.load_from_disk`` reads.

    cfg.json                  the config's ``to_dict()``: d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, architecture, (TopK) k and
                              rescale_acts_by_decoder_norm, and ``metadata`` (model_name, hook_name, ...)
    sae_weights.safetensors   W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]

Export: our MLSAE is one TopK SAE shared by every layer, the per-layer suite one per layer; either becomes one
SAELens TopK SAE per layer, in a folder named by its TransformerLens hook. ``b_pre`` is SAELens's ``b_dec``
(subtracted from the input and added back, ``apply_b_dec_to_input``), ``b_enc`` is zero, and our per-vector
standardisation is SAELens's ``normalize_activations="layer_norm"``: on the way in the same
``(x - mean) / (std + eps)`` (torch.std, the sample std; eps 1e-5); on the way out SAELens maps back with
``u_hat * std + mean`` where we use ``std + eps``, a relative change of ``eps / std`` in the centred
reconstruction: on SmolLM2's residual stream (std 1.2 to 66 per vector) SAELens's x_hat differs from ours by at
most 8.5e-6 relative, median 1.4e-6 (1,024 test tokens at all 30 layers), and its latents are the same.

Import: SAELens TopK SAEs (``architecture == "topk"``) on a residual-stream hook, with ``layer_norm`` or no
input normalisation; anything else is refused in one line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlsae_cache.atomic import atomic_write_json
from mlsae_cache.errors import MlsaeError, first_line
from mlsae_cache.integrity import DIGEST_KEY, IntegrityError, load_safetensors, matches, object_digest, save_safetensors

from .base import ForeignTopK, InputNorm, SAEFormat, layer_of_hook, read_json_object, transformer_lens_hook

if TYPE_CHECKING:
    from ..dictionary import Dictionary

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_DIGEST_KEY = "mlsae_cfg_digest"
"""The digest of the cfg.json beside it, in the metadata of an exported sae_weights.safetensors (itself covered by the
weights' own digest): a flipped bit can leave cfg.json valid JSON that reads as another SAE (a renamed
``normalize_activations`` key reads as no normalisation), so the import verifies it whenever mlsae-export wrote it."""
SAELENS_EPS = 1e-5
"""The eps of SAELens's layer_norm normalisation (fixed in SAELens)."""
CFG_LAYOUT_VERSION = "6.0.0"
"""The SAELens version whose cfg.json layout we write, recorded as ``metadata.sae_lens_version`` when SAELens is
not installed (SAELens converts a cfg.json without one, or of a version below 6, as a pre-6 layout)."""

NORMALISATIONS: dict[str, InputNorm] = {"none": "none", "layer_norm": "standardize"}
"""SAELens's ``normalize_activations`` values we reproduce exactly -> ForeignTopK.input_norm."""

NORMALISATION_NOTES: dict[InputNorm, str] = {
    "none": "SAELens normalize_activations='none': it encodes the raw residual vectors, where mlsae standardises "
    "each vector first ((x - mean) / (std + eps)), so its latents respond to each vector's scale and offset",
    "standardize": "SAELens normalize_activations='layer_norm': the same per-vector standardisation as mlsae on the "
    "way in ((x - mean) / (std + eps), sample std, eps 1e-5), but it maps reconstructions back with "
    "u_hat * std + mean where mlsae uses std + eps (a relative change of eps / std in the centred reconstruction)",
}
"""How a SAELens SAE's input normalisation differs from ours: the sentence recorded with an imported SAE."""

EXPORT_NORMALISATION_NOTE = (
    "exported with normalize_activations='layer_norm', which standardises each vector as mlsae does on the way in; "
    "SAELens maps reconstructions back with u_hat * std + mean where mlsae uses std + eps "
    "(a relative change of eps / std in the centred reconstruction)"
)

ARCH_LABEL = {"mlsae": "MLSAE (one SAE shared by every layer)", "per-layer": "per-layer suite (one SAE per layer)"}


class SAELensFormat(SAEFormat):
    """SAELens TopK SAE folders (see the module docstring)."""

    name = "saelens"

    # ---- import ----

    def recognises(self, folder: Path) -> bool:
        folder = Path(folder)
        return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()

    def read(self, folder: Path) -> ForeignTopK:
        folder = Path(folder)
        tensors, weights_metadata = _read_weights(folder / WEIGHTS_FILE)  # first: it holds the digest of an exported cfg
        cfg = _read_cfg(folder, weights_metadata.get(CFG_DIGEST_KEY))
        metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        where = f"the SAELens SAE {folder}"

        architecture, k = _architecture_and_k(cfg)
        if architecture != "topk":
            raise MlsaeError(
                f"{where} has architecture {architecture!r}; mlsae imports TopK SAEs only (architecture 'topk'), "
                "since its analysis stores k latents per vector"
            )
        normalisation = cfg.get("normalize_activations")
        if normalisation is None or normalisation is False:  # cfg.json files before SAELens 6 used booleans
            normalisation = "none"
        elif normalisation is True:
            normalisation = "expected_average_only_in"
        if normalisation not in NORMALISATIONS:
            raise MlsaeError(
                f"{where} normalises its inputs with normalize_activations={normalisation!r}, which mlsae cannot "
                f"reproduce; import SAEs with normalize_activations {' or '.join(map(repr, NORMALISATIONS))}"
            )
        if cfg.get("reshape_activations", "none") != "none":
            raise MlsaeError(
                f"{where} reshapes its inputs (reshape_activations={cfg['reshape_activations']!r}): it reads attention "
                "heads, not the residual stream; import an SAE on a residual-stream hook"
            )
        hook = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        if not isinstance(hook, str):
            raise MlsaeError(
                f"{where} names no hook (metadata.hook_name in {CFG_FILE}); set it to the residual-stream hook it "
                "reads, e.g. blocks.3.hook_resid_post"
            )
        layer = layer_of_hook(hook)
        if layer is None:
            raise MlsaeError(
                f"{where} reads hook {hook!r}, which is not the residual stream after a block; mlsae imports SAEs on "
                "residual-stream hooks (blocks.L.hook_resid_post, blocks.L.hook_resid_pre, or a block's module path)"
            )
        d_in, d_sae = _positive_int(cfg, "d_in", where), _positive_int(cfg, "d_sae", where)
        if not 0 < k <= d_sae:
            raise MlsaeError(f"{where} has k={k} for {d_sae} latents (d_sae); its {CFG_FILE} is inconsistent, re-save it")

        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        _check_tensors(tensors, expected, folder / WEIGHTS_FILE)
        W_enc = tensors["W_enc"].float().T.contiguous()  # [n, d]
        b_enc = tensors["b_enc"].float()  # [n]
        W_dec = tensors["W_dec"].float()  # [n, d]
        b_dec = tensors["b_dec"].float()  # [d]
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens selects on pre * ||W_dec[j]|| and decodes h / ||W_dec[j]||: folding the norms into the encoder
            # and out of the decoder gives the same latents, values and reconstructions with the plain forward
            norms = torch.linalg.vector_norm(W_dec, dim=1).clamp(min=1e-8)  # [n]
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]

        input_norm = NORMALISATIONS[normalisation]
        return ForeignTopK(
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, k=k, layer=layer, input_norm=input_norm,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), rescale_acts_by_decoder_norm=False,
            eps=SAELENS_EPS,
            source={"format": self.name, "path": str(folder), "model": metadata.get("model_name") or cfg.get("model_name"),
                    "hook": hook, "normalisation": NORMALISATION_NOTES[input_norm]},
        )  # fmt: skip

    # ---- export ----

    def export(self, sae: Dictionary, run_info: dict, out: Path, model_name: str | None = None) -> list[Path]:
        layer_weights = _layer_weights(sae)  # check everything before the first file is written
        _check_raw_space(run_info)
        data = run_info.get("data") or [{}]
        model = data[0].get("model")
        hf_blocks = _hf_block_path(model)  # from the config of the model the run read (a local copy is fine)
        context_size = _context_size(run_info)
        common = {
            "model_name": model_name or model,
            "model_class_name": "HookedTransformer",
            "context_size": context_size,
            "sae_lens_version": _saelens_version(),
            "sae_lens_training_version": None,  # not trained by SAELens
            "mlsae": _provenance(sae, run_info),
        }
        if context_size is not None:
            common["prepend_bos"] = False  # our caches cut sequences from one token stream, without BOS
        folders = []
        for layer, W_enc, W_dec, b_pre in layer_weights:
            hook = transformer_lens_hook(layer)
            folder = Path(out) / hook
            weights = {
                "W_enc": W_enc.T,  # [d, n]: SAELens encodes with x @ W_enc
                "b_enc": torch.zeros(sae.n_latents),  # [n]
                "W_dec": W_dec,  # [n, d]
                "b_dec": b_pre,  # [d]
            }
            metadata = {**common, "hook_name": hook, "hf_hook_name": f"{hf_blocks}.{layer}" if hf_blocks else None,
                        "layer": layer}  # fmt: skip
            cfg = {
                "d_in": sae.d_model, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
                "apply_b_dec_to_input": True, "normalize_activations": "layer_norm", "reshape_activations": "none",
                "metadata": metadata, "k": sae.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk",
            }  # fmt: skip
            cfg_digest = object_digest(json.loads(json.dumps(cfg)))  # of the object as it is read back
            save_safetensors(folder / WEIGHTS_FILE, {n: t.detach().float().contiguous() for n, t in weights.items()},
                             {CFG_DIGEST_KEY: cfg_digest})  # fmt: skip
            atomic_write_json(folder / CFG_FILE, cfg)
            folders.append(folder)
        return folders


SAELENS = SAELensFormat()


# ---- export helpers ----


def _layer_weights(sae: Dictionary) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(layer, W_enc [n, d], W_dec [n, d], b_pre [d])`` of each layer's SAE, or one line saying why there is none."""
    arch = getattr(sae, "arch", None)
    if arch == "crosscoder":
        raise MlsaeError(
            "a crosscoder has no SAELens equivalent: its latents read all layers at once; export an MLSAE or per-layer run"
        )
    if arch not in ARCH_LABEL:
        raise MlsaeError(f"SAELens holds MLSAE and per-layer runs, not a {arch!r} dictionary; export an MLSAE or per-layer run")
    d, n, k, layers = sae.d_model, sae.n_latents, sae.k, list(sae.layers)
    if not layers:
        raise MlsaeError(
            "the dictionary records no layers, so its SAELens hooks cannot be named; export a run directory of mlsae-train"
        )
    if len(set(layers)) != len(layers):
        raise MlsaeError(f"the dictionary names layers {layers} with repeats; export a run directory of mlsae-train")
    shape = (n, d) if arch == "mlsae" else (len(layers), n, d)
    bias = (d,) if arch == "mlsae" else (len(layers), d)
    shapes = {"W_enc": tuple(sae.W_enc.shape), "W_dec": tuple(sae.W_dec.shape), "b_pre": tuple(sae.b_pre.shape)}
    if shapes != {"W_enc": shape, "W_dec": shape, "b_pre": bias} or not 0 < k <= n:
        raise MlsaeError(
            f"the {arch} dictionary is inconsistent (d={d}, n={n}, k={k}, {len(layers)} layers, but weights {shapes}); "
            "export an intact run directory"
        )
    if not math.isclose(sae.eps, SAELENS_EPS, rel_tol=1e-6):
        raise MlsaeError(
            f"the dictionary standardises with eps={sae.eps}, but SAELens's layer_norm uses eps={SAELENS_EPS}; "
            "SAELens cannot reproduce its inputs, export a run trained with the default eps"
        )
    if not all(bool(torch.isfinite(p).all()) for p in (sae.W_enc, sae.W_dec, sae.b_pre)):
        raise MlsaeError(f"the {arch} dictionary has non-finite weights (NaN or inf); export a run that did not diverge")
    if arch == "mlsae":
        return [(layer, sae.W_enc, sae.W_dec, sae.b_pre) for layer in layers]
    return [(layer, sae.W_enc[i], sae.W_dec[i], sae.b_pre[i]) for i, layer in enumerate(layers)]


def _check_raw_space(run_info: dict) -> None:
    """Refuse a run trained on tuned-lens-space activations: SAELens hooks read the raw residual stream."""
    lenses = [entry.get("lens") for entry in run_info.get("data") or [] if isinstance(entry, dict)]
    if any(lens for lens in lenses):
        raise MlsaeError(
            "the run was trained in tuned-lens space (its cache was written with --lens), but SAELens hooks read raw "
            "residual-stream vectors, so its SAEs would see other inputs than they were trained on; "
            "export a run trained on a cache without --lens"
        )


def _hf_block_path(model: str | None) -> str | None:
    """The Hugging Face module path of the model's decoder blocks (``gpt_neox.layers``, ``model.layers``), from its
    config alone: the model is built on the meta device, without weights. None, with a warning, when the config
    cannot be read (a hub id offline, a synthetic cache)."""
    from mlsae_cache.hub import hub_reachable
    from mlsae_cache.lm import decoder_blocks, is_local, resolve_model_name

    try:
        if not model:
            raise MlsaeError("the run records no model")
        from transformers import AutoConfig, AutoModelForCausalLM

        name = resolve_model_name(model)
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True)
        except OSError:
            if is_local(name) or not hub_reachable():
                raise
            config = AutoConfig.from_pretrained(name)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
        blocks = decoder_blocks(lm)
        return next(path for path, module in lm.named_modules() if module is blocks)
    except (OSError, ValueError, KeyError, ImportError, MlsaeError, StopIteration) as exc:
        print(
            f"warning: cannot read the config of model {model!r} ({first_line(exc, 160)}), so the exported cfg.json files have "
            "hf_hook_name null (their TransformerLens hook_name is set); export where the model's config is available",
            file=sys.stderr,
        )
        return None


def _context_size(run_info: dict) -> int | None:
    """The sequence length of the run's caches, when their config.json is readable here and they all agree."""
    shards = (run_info.get("config") or {}).get("shards") or []
    lengths = set()
    for cache in shards:
        try:
            lengths.add(int(json.loads((Path(cache) / "config.json").read_text())["seq_len"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return lengths.pop() if len(lengths) == 1 else None


def _saelens_version() -> str:
    """The installed SAELens's version (what its own save_model records), else the cfg.json layout we write."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return CFG_LAYOUT_VERSION


def _provenance(sae: Dictionary, run_info: dict) -> dict:
    """Our ``mlsae`` entry of the metadata: where the SAE comes from and how it was trained."""
    training = run_info.get("training") or {}
    config = run_info.get("config") or {}
    return {
        "arch": sae.arch,
        "family": ARCH_LABEL[sae.arch],
        "run_layers": list(sae.layers),
        "d_model": sae.d_model,
        "n_latents": sae.n_latents,
        "expansion_factor": sae.n_latents / sae.d_model,
        "k": sae.k,
        "eps": sae.eps,
        "seed": config.get("seed"),
        "tokens_trained": training.get("tokens"),
        "steps_trained": training.get("steps"),
        "total_steps": training.get("total_steps", run_info.get("total_steps")),
        "normalisation": EXPORT_NORMALISATION_NOTE,
    }


# ---- import helpers ----


def _read_cfg(folder: Path, digest: str | None = None) -> dict:
    """cfg.json's object, checked against ``digest`` (CFG_DIGEST_KEY of the weights) when mlsae-export wrote one."""
    path = folder / CFG_FILE
    fix = "point at a folder written by SAELens's save_model (cfg.json and sae_weights.safetensors)"
    cfg = read_json_object(path, "SAELens config", fix)
    if digest is not None and not matches(digest, lambda algorithm: object_digest(cfg, algorithm)):
        raise IntegrityError(
            f"{path} is damaged or edited: it does not match the checksum mlsae-export recorded in {WEIGHTS_FILE}; "
            "export the run again (mlsae-export saelens), or restore the folder from a copy"
        )
    return cfg


def _architecture_and_k(cfg: dict) -> tuple[str, int]:
    """The SAE's architecture and k as SAELens reads them; cfg.json files of SAELens before 6 name a TopK SAE by its
    activation function (``activation_fn`` "topk" with ``activation_fn_kwargs.k``) instead."""
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    legacy_topk = (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk" and kwargs.get("k") is not None
    architecture = cfg.get("architecture") or ("topk" if legacy_topk else "standard")
    k = cfg.get("k", kwargs.get("k"))
    if architecture == "topk" and (isinstance(k, bool) or not isinstance(k, int)):
        raise MlsaeError(f"the SAELens cfg.json of a TopK SAE names no integer k (got {k!r}); re-save the SAE with SAELens")
    return str(architecture), int(k) if architecture == "topk" else 0


def _positive_int(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MlsaeError(f"{where} has {key}={value!r} in {CFG_FILE}, not a positive integer; re-save the SAE with SAELens")
    return value


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of sae_weights.safetensors (verified against its digest when mlsae wrote it)."""
    fix = "re-download the SAE or save it again with SAELens's save_model"
    if not path.is_file():
        raise MlsaeError(f"{path} does not exist; {fix}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if DIGEST_KEY in metadata:
                return load_safetensors(path, fix)  # written by mlsae-export: checked against its digest
            return {name: f.get_tensor(name) for name in f.keys()}, metadata  # noqa: SIM118 (a safetensors handle)
    except MlsaeError:
        raise
    except Exception as exc:  # safetensors raises its own error types, OSError, or ValueError for a torn header
        raise MlsaeError(f"{path} is truncated or not a safetensors file ({first_line(exc, 160)}); {fix}") from None


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Exactly the TopK SAE's tensors, of the shapes its cfg.json gives, all finite."""
    fix = "re-download the SAE or save it again with SAELens's save_model"
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise MlsaeError(f"{path} lacks tensor(s) {', '.join(missing)} of a SAELens TopK SAE; {fix}")
    extra = [name for name in tensors if name not in expected and not _unit_scaling_factor(name, tensors[name])]
    if extra:
        raise MlsaeError(f"{path} holds tensor(s) {', '.join(sorted(extra))} that a SAELens TopK SAE does not use; "
                         "mlsae imports plain TopK SAEs only")  # fmt: skip
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise MlsaeError(f"{path}: {name} has shape {list(tensors[name].shape)}, not {list(shape)} as its cfg.json's "
                             f"d_in and d_sae give; {fix}")  # fmt: skip
        if not tensors[name].is_floating_point() or not bool(torch.isfinite(tensors[name]).all()):
            raise MlsaeError(f"{path}: {name} holds non-finite or non-float values; {fix}")


def _unit_scaling_factor(name: str, tensor: torch.Tensor) -> bool:
    """An all-ones ``scaling_factor``, which older SAELens versions saved and SAELens drops on loading."""
    return name == "scaling_factor" and bool((tensor == 1).all())


