"""Train a tuned lens (Belrose et al. 2023) on a local or hub model, and measure how well a lens fits.

The lens is the tuned-lens package's ``TunedLens``: one affine translator per ``hidden_states``
index 0..nL-1 (0 = embeddings, i = output of block i-1), each initialised to the identity (zero
residual weight and bias). Its objective, per translator i and token t:

    KL(p_final[t] || softmax(unembed(h_i[t] + W_i h_i[t] + b_i)))

where ``unembed`` is the model's own final norm and unembedding and ``p_final`` the model's output
distribution; the mean over tokens is summed over translators. The model is frozen. Special-token
positions (BOS/EOS/PAD), whose activations the cache never stores, are left out of the loss.

With ``sum p = 1`` the KL is ``sum p log p - p . z + logsumexp(z)`` for the lens logits ``z``: the
target's entropy is computed once per batch and the lens side needs no log-softmax. Each translator's
loss is backpropagated on its own, so memory holds one [n, V] graph at a time.

Resumable: every ``checkpoint_every`` steps the translators and the Adam state are saved; the batch
drawn at a step depends only on (seed, step), so a resumed run sees the batches of an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tuned_lens.nn.lenses import TunedLens, TunedLensConfig
from tuned_lens.nn.unembed import Unembed

from .atomic import atomic_write, atomic_write_json
from .distributed import resolve_device
from .errors import MlsaeError, first_line
from .integrity import RECORD_FILE, IntegrityError, record_files, with_digest, without_checked_digest
from .lens import LENS_CONFIG, LENS_PARAMS, canonical_model_name, load_lens_for_model
from .lens_config import LensDataOptions, LensEvalConfig, LensTrainConfig
from .lm import context_length_of, d_model_of, final_norm_of, load_model, load_tokenizer, n_layers_of, resolve_model_name, unembedding_of
from .text import iter_dataset_sequences, special_token_ids

TRAINING_FILE = "training.json"
CHECKPOINT_FILE = "checkpoint.pt"

# transform(h [n, d], idx) -> [n, d]: hidden state idx mapped to the space the unembedding reads
Transform = Callable[[torch.Tensor, int], torch.Tensor]


class ModelUnembed(Unembed):
    """The tuned-lens ``Unembed`` (final norm, then unembedding) on the model's own modules.

    Found generically (``lm.final_norm_of``) rather than through the package's list of model
    classes, and shared with the frozen model rather than copied.
    """

    def __init__(self, model: nn.Module):
        nn.Module.__init__(self)
        self.final_norm = final_norm_of(model)
        self.unembedding = unembedding_of(model)
        self.requires_grad_(False)


@dataclass
class LensTargets:
    """One batch's hidden states and final distributions at the kept (non-special) positions."""

    hidden: list[torch.Tensor]
    """Per translator index 0..nL-1: [n, d] float32."""
    probs: torch.Tensor
    """[n, V] the model's next-token distribution."""
    neg_entropy: torch.Tensor
    """[n] sum_v p log p."""


@torch.no_grad()
def lens_targets(model: nn.Module, ids: torch.Tensor, special: torch.Tensor, n_layers: int) -> LensTargets:
    """ids: [B, S] -> the targets at the positions that are not special tokens."""
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    keep = ~torch.isin(ids, special)  # [B, S]
    log_p = out.logits[keep].float().log_softmax(dim=-1)  # [n, V]
    probs = log_p.exp()
    hidden = [out.hidden_states[idx][keep].float() for idx in range(n_layers)]  # nL x [n, d]
    return LensTargets(hidden, probs, (probs * log_p).sum(dim=-1))


def kl_to_final(unembed: nn.Module, translated: torch.Tensor, targets: LensTargets) -> torch.Tensor:
    """translated: [n, d] -> KL(p_final || p_lens) per token [n], in nats."""
    z = unembed(translated).float()  # [n, V]
    return targets.neg_entropy - (targets.probs * z).sum(dim=-1) + torch.logsumexp(z, dim=-1)


def identity_transform(h: torch.Tensor, _idx: int) -> torch.Tensor:
    """The logit lens: every hidden state read as it is."""
    return h


@torch.no_grad()
def mean_kl_per_layer(model: nn.Module, unembed: nn.Module, batches: Iterable[torch.Tensor], special: torch.Tensor,
                      n_layers: int, transforms: dict[str, Transform], progress: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """For each named transform, the mean over all kept tokens of the KL to the final logits: [nL] per name."""
    sums = {name: np.zeros(n_layers) for name in transforms}
    n_tokens = 0
    for ids in tqdm(batches, desc="held-out KL", unit="batch", disable=not progress):
        targets = lens_targets(model, ids, special, n_layers)
        n_tokens += targets.probs.shape[0]
        for name, transform in transforms.items():
            for idx in range(n_layers):
                sums[name][idx] += float(kl_to_final(unembed, transform(targets.hidden[idx], idx), targets).double().sum())
    if n_tokens == 0:
        raise MlsaeError("the held-out text holds only special tokens; use more or other text")
    return {name: total / n_tokens for name, total in sums.items()}


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    special: torch.Tensor  # [n_special] token ids left out of the loss
    n_layers: int
    device: torch.device


def load_frozen_model(options: LensDataOptions) -> tuple[LoadedModel, object]:
    """(the frozen model with what the loss needs, its tokenizer)."""
    device = resolve_device(options.device)
    name = resolve_model_name(options.model)
    tokenizer = load_tokenizer(options.tokenizer or name, options.revision)
    model = load_model(name, options.revision, device).requires_grad_(False)
    context = context_length_of(model)
    if context is not None and options.seq_len > context:
        raise MlsaeError(f"--seq-len {options.seq_len} is beyond the model's context of {context} tokens; use --seq-len {context} or less")
    special = torch.as_tensor(special_token_ids(tokenizer), dtype=torch.long, device=device)
    return LoadedModel(name, model, special, n_layers_of(model), torch.device(device)), tokenizer


def read_sequences(options: LensDataOptions, tokenizer, n_sequences: int) -> np.ndarray:
    """The first ``n_sequences`` sequences of the dataset: [n_sequences, seq_len] int64."""
    stream = iter_dataset_sequences(options.dataset, tokenizer, options.seq_len, split=options.split, text_column=options.text_column)
    sequences = [seq for _, seq in zip(range(n_sequences), stream)]
    if len(sequences) < n_sequences:
        raise MlsaeError(
            f"dataset {options.dataset} yields only {len(sequences)} sequences of {options.seq_len} tokens but {n_sequences} are needed; "
            "add text or lower --tokens / --eval-tokens"
        )
    return np.stack(sequences)


def iter_batches(sequences: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, len(sequences), batch_size):
        yield torch.as_tensor(sequences[start : start + batch_size], device=device)  # [B, S]


def training_batch(sequences: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The sequences of ``step``: a fixed function of (seed, step), epoch after epoch in a fresh random order."""
    n = len(sequences)
    picks = []
    for sample in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(sample, n)
        picks.append(np.random.default_rng([seed, epoch]).permutation(n)[offset])
    return sequences[picks]  # [B, S]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to (almost) zero at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return (steps - step) / (steps - warmup)


# ----------------------------------------------------------------------------------------------
# Training


def training_identity(config: LensTrainConfig, model_name: str) -> dict:
    """Everything that changes the trained lens: a finished or unfinished lens of other options is not reused."""
    identity = asdict(config)
    for key in ("out", "device", "progress", "overwrite", "checkpoint_every"):
        identity.pop(key)
    identity["model"] = canonical_model_name(model_name)
    return identity


def _prepare_out(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The finished training record when ``out`` already holds this lens; else make ``out`` ready to (re)start."""
    done = _read_training_record(out / TRAINING_FILE) if (out / TRAINING_FILE).exists() else None
    if done is not None and done.get("identity") == identity:
        return done
    checkpoint = out / CHECKPOINT_FILE
    ours = checkpoint.exists() and _read_checkpoint(checkpoint).get("identity") == identity
    foreign = done is not None or (out / LENS_CONFIG).exists() or (checkpoint.exists() and not ours)
    if foreign and not ours:
        if not overwrite:
            raise MlsaeError(f"{out} holds another lens (or one being trained with other options); choose another --out or pass --overwrite to replace it")
        for name in (TRAINING_FILE, LENS_CONFIG, LENS_PARAMS, CHECKPOINT_FILE, RECORD_FILE):
            (out / name).unlink(missing_ok=True)
    return None


def _read_training_record(path: Path) -> dict:
    """The finished lens's ``training.json``, checked against the digest written inside it."""
    fix = "delete it and run the same command again to retrain the lens (or restore it)"
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{path} is not valid JSON: it is truncated or damaged; {fix}") from None
    return without_checked_digest(record, path, fix)


def _save_checkpoint(out: Path, identity: dict, step: int, seconds: float, lens: TunedLens, optimizer: torch.optim.Optimizer) -> None:
    state = {"identity": identity, "step": step, "seconds": seconds,
             "translators": lens.layer_translators.state_dict(), "optimizer": optimizer.state_dict()}  # fmt: skip
    state = with_digest(state)  # inside the file: written with it in one rename
    atomic_write(out / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def _read_checkpoint(checkpoint: Path) -> dict:
    """The state :func:`_save_checkpoint` wrote, checked against its digest; a torn or damaged file is one line."""
    fix = "delete it to restart this lens training from step 0 (or restore it)"
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn zip, a pickle error: torch raises many kinds
        reason = first_line(exc)
        raise IntegrityError(f"{checkpoint} cannot be read ({reason}): it is truncated or damaged; {fix}") from None
    if not isinstance(state, dict):
        raise IntegrityError(f"{checkpoint} is not a lens training checkpoint; {fix}")
    return without_checked_digest(state, checkpoint, fix)


def _resume(out: Path, lens: TunedLens, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """(first step to run, seconds already spent) from the checkpoint of this training, if any."""
    checkpoint = out / CHECKPOINT_FILE
    if not checkpoint.exists():
        return 0, 0.0
    state = _read_checkpoint(checkpoint)
    lens.layer_translators.load_state_dict(state["translators"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["seconds"])


def train_lens(config: LensTrainConfig) -> dict:
    """Train (or finish) the lens of ``config`` into ``config.out``; returns the training record."""
    loaded, tokenizer = load_frozen_model(config)
    out = Path(config.out)
    identity = training_identity(config, loaded.name)
    done = _prepare_out(out, identity, config.overwrite)
    if done is not None:
        if config.progress:
            print(f"lens: {out} already holds this lens ({done['steps']} steps); nothing to do")
        return done

    n_train = -(-config.tokens // config.seq_len)
    n_eval = -(-config.eval_tokens // config.seq_len)
    sequences = read_sequences(config, tokenizer, n_train + n_eval)
    train_sequences, eval_sequences = sequences[:n_train], sequences[n_train:]  # held-out text follows the training text

    model, n_layers = loaded.model, loaded.n_layers
    lens_config = TunedLensConfig(base_model_name_or_path=identity["model"], d_model=d_model_of(model),
                                  num_hidden_layers=n_layers, bias=True, base_model_revision=config.revision)  # fmt: skip
    lens = TunedLens(ModelUnembed(model), lens_config).to(loaded.device)  # translators start as the identity
    translators = lens.layer_translators
    optimizer = torch.optim.Adam(translators.parameters(), lr=config.lr)
    warmup = config.steps // 10 if config.warmup_steps is None else config.warmup_steps
    out.mkdir(parents=True, exist_ok=True)
    first_step, seconds = _resume(out, lens, optimizer)

    started = time.perf_counter() - seconds
    bar = tqdm(total=config.steps, initial=first_step, unit="step", desc="lens", disable=not config.progress)
    for step in range(first_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, warmup)
        ids = torch.as_tensor(training_batch(train_sequences, step, config.batch_size, config.seed), device=loaded.device)
        targets = lens_targets(model, ids, loaded.special, n_layers)
        if targets.probs.shape[0] == 0:
            raise MlsaeError("a training batch holds only special tokens; use more or other text")
        total = 0.0
        for idx in range(n_layers):
            loss = kl_to_final(lens.unembed, lens.transform_hidden(targets.hidden[idx], idx), targets).mean()
            loss.backward()  # translators are independent: one [n, V] graph at a time
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(kl_per_layer=f"{total / n_layers:.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(out, identity, step + 1, time.perf_counter() - started, lens, optimizer)
    bar.close()
    train_seconds = time.perf_counter() - started
    _save_checkpoint(out, identity, config.steps, train_seconds, lens, optimizer)

    kl = mean_kl_per_layer(model, lens.unembed, iter_batches(eval_sequences, config.batch_size, loaded.device), loaded.special,
                           n_layers, {"identity": identity_transform, "lens": lens.transform_hidden}, config.progress)  # fmt: skip
    state = {key: value.detach().cpu() for key, value in translators.state_dict().items()}
    atomic_write(out / LENS_PARAMS, lambda tmp: torch.save(state, tmp))
    atomic_write_json(out / LENS_CONFIG, lens.config.to_dict())  # unembed_hash was filled in by TunedLens
    record_files(out, [LENS_PARAMS, LENS_CONFIG])  # checksums.json: every load of the lens checks both files
    record = {
        "identity": identity,
        "steps": config.steps,
        "train_tokens": int(train_sequences.size),
        "eval_tokens": int(eval_sequences.size),
        "tokens_seen": config.steps * config.batch_size * config.seq_len,
        "train_seconds": train_seconds,
        "kl_identity": kl["identity"].tolist(),
        "kl_lens": kl["lens"].tolist(),
    }
    # written last: marks the lens finished; its digest inside, as the checkpoint's
    atomic_write_json(out / TRAINING_FILE, with_digest(record))
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    if config.progress:
        print_kl_table(kl, f"held-out KL to the final logits (nats/token, {record['eval_tokens']:,} tokens)")
        print(f"lens: {out} ({config.steps} steps, {record['tokens_seen']:,} tokens seen, {train_seconds:.0f}s)")
    return record


# ----------------------------------------------------------------------------------------------
# Evaluation of an existing lens


def evaluate_lens(config: LensEvalConfig) -> dict[str, np.ndarray]:
    """Load ``config.lens`` for the model (all checks included) and measure its KL per layer against the identity."""
    loaded, tokenizer = load_frozen_model(config)
    lens = load_lens_for_model(config.lens, loaded.model, loaded.name)
    sequences = read_sequences(config, tokenizer, -(-config.tokens // config.seq_len))
    kl = mean_kl_per_layer(loaded.model, ModelUnembed(loaded.model), iter_batches(sequences, config.batch_size, loaded.device),
                           loaded.special, loaded.n_layers, {"identity": identity_transform, "lens": lens.apply_translator},
                           config.progress)  # fmt: skip
    if config.progress:
        print_kl_table(kl, f"KL to the final logits (nats/token, {sequences.size:,} tokens)")
    return kl


def print_kl_table(kl: dict[str, np.ndarray], title: str) -> None:
    print(title)
    print(f"{'idx':>4} {'input':>10} {'identity':>10} {'lens':>10}")
    for idx, (before, after) in enumerate(zip(kl["identity"], kl["lens"])):
        where = "embeddings" if idx == 0 else f"block {idx - 1}"
        print(f"{idx:>4} {where:>10} {before:>10.4f} {after:>10.4f}")
    print(f"{'mean':>15} {kl['identity'].mean():>10.4f} {kl['lens'].mean():>10.4f}")
