"""The language model wrapper: load any Hugging Face causal LM and read its residual stream per block.

``x[t, l]`` is the output of decoder block ``l`` (SPEC 1). Inner blocks' outputs equal
``output_hidden_states[l + 1]``; the last block's output is taken from the block itself, BEFORE the
final norm (``hidden_states[-1]`` in transformers is after it). The blocks are found generically as
the ``nn.ModuleList`` of ``num_hidden_layers`` modules, which covers GPT-NeoX (Pythia), Llama
(SmolLM2) and GPT-2 alike.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import MlsaeError, first_line
from .hub import hub_reachable

PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_PYTHIA = re.compile(r"^pythia-(" + "|".join(re.escape(s) for s in PYTHIA_SIZES) + r")(-deduped)?$")


def resolve_model_name(name: str) -> str:
    """``pythia-70m`` (and ``-deduped``) -> ``EleutherAI/pythia-70m``; anything else is returned as given."""
    return f"EleutherAI/{name}" if _PYTHIA.match(name) else name


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _check_loadable(name: str) -> None:
    """Raise a one-line error for a name that is neither a local directory nor reachable on the hub."""
    if is_local(name):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MlsaeError(f"model directory {name} does not exist; pass an existing local directory or a hub id such as pythia-70m")
    if not hub_reachable():
        raise MlsaeError(
            f"cannot reach the Hugging Face hub to download model {name}; "
            "download it where there is internet and pass its local directory with --model DIR"
        )


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    name = resolve_model_name(name)
    _check_loadable(name)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise MlsaeError(f"cannot load a tokenizer for {name} ({first_line(exc, 200)}); check the model name or directory") from None


def load_model(name: str, revision: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM in eval mode, by Pythia short name, hub id or local directory."""
    from transformers import AutoModelForCausalLM

    name = resolve_model_name(name)
    _check_loadable(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise MlsaeError(f"cannot load model {name} ({first_line(exc, 200)}); check the model name or directory") from None
    return model.to(device).eval()


def n_layers_of(model: nn.Module) -> int:
    config = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise MlsaeError(f"cannot tell how many layers {type(model).__name__} has; its config names no num_hidden_layers")


def d_model_of(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise MlsaeError(f"cannot tell the residual width of {type(model).__name__}; its config names no hidden_size")


def context_length_of(model: nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the ModuleList holding exactly ``num_hidden_layers`` modules."""
    n_layers = n_layers_of(model)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not candidates:
        raise MlsaeError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}; this architecture is not supported")
    # the blocks hold the most parameters of all candidate lists (e.g. not a list of rotary caches)
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


# Attribute names of the final norm on a base model (Llama/Mistral, GPT-NeoX, GPT-2/GPT-J/Bloom, Falcon/Phi, Mamba)
_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")


def final_norm_of(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the unembedding (on the base model or its decoder)."""
    body = getattr(model, "base_model", model)
    for holder in (body, getattr(body, "decoder", None)):
        for name in _FINAL_NORM_NAMES:
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, nn.Module):
                return module
    raise MlsaeError(f"cannot find the final norm of {type(model).__name__}; this architecture is not supported for a tuned lens")


def unembedding_of(model: nn.Module) -> nn.Linear:
    """The linear map from the final normed hidden state to the logits (``lm_head`` / ``embed_out``)."""
    get = getattr(model, "get_output_embeddings", None)
    unembedding = get() if callable(get) else None
    if not isinstance(unembedding, nn.Linear):
        raise MlsaeError(f"{type(model).__name__} has no linear unembedding (lm_head); load a causal language model")
    return unembedding


class _StopForward(Exception):
    """Raised from a hook once every requested block has run: the rest of the model is skipped."""


@dataclass
class ResidualReader:
    """Reads the outputs of selected decoder blocks in one forward pass that stops after the last one.

    ``read(input_ids)`` returns ``[batch, seq, n_selected_layers, d_model]`` float32-or-model-dtype;
    ``read_each(input_ids, consume)`` hands each block's output over as the forward makes it.
    """

    model: nn.Module
    layers: list[int]

    def __post_init__(self) -> None:
        self.blocks = decoder_blocks(self.model)
        n_layers = len(self.blocks)
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise MlsaeError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}; fix --layers")
        # the base model skips the unembedding, which is most of the cost for small models
        self.body = getattr(self.model, "base_model", self.model)
        self._reused: dict[tuple, torch.Tensor] = {}  # read(reuse_output=True)'s output, by shape, dtype and device

    @torch.inference_mode()
    def read(self, input_ids: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """The selected blocks' outputs for ``input_ids`` [batch, seq]: [batch, seq, L, d], each block's output
        copied into its slot as the forward produces it.

        ``reuse_output``: into the memory of the previous such call of the same shape, so the result is
        valid only until the next one (the cache's shard loop: fresh memory costs a page fault per 4 KiB at
        first touch, which took longer than the copy)."""
        stacked: list[torch.Tensor] = []  # the output [batch, seq, L, d], made at the first selected block

        def into_slot(slot: int, hidden: torch.Tensor) -> None:
            if not stacked:
                stacked.append(self._output_for(hidden, reuse_output))
            stacked[0][:, :, slot].copy_(hidden)

        self.read_each(input_ids, into_slot)
        return stacked[0]

    @torch.inference_mode()
    def read_each(self, input_ids: torch.Tensor, consume: Callable[[int, torch.Tensor], None]) -> None:
        """One forward over ``input_ids`` [batch, seq] that stops after the last selected block, calling
        ``consume(slot, hidden)`` with each selected block's output [batch, seq, d] as it is made (``slot``:
        the block's place in ``layers``), before the next block runs."""
        slots: dict[int, list[int]] = {}
        for slot, layer in enumerate(self.layers):
            slots.setdefault(layer, []).append(slot)
        last = max(self.layers)

        def make_hook(layer: int) -> Callable:
            def hook(_module: nn.Module, _inputs, output) -> None:
                hidden = output[0] if isinstance(output, (tuple, list)) else output  # [batch, seq, d]
                for slot in slots.get(layer, ()):
                    consume(slot, hidden)
                if layer == last:
                    raise _StopForward

            return hook

        handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in range(last + 1)]
        try:
            self.body(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def release(self) -> None:
        """Free the memory kept for ``read(reuse_output=True)``."""
        self._reused.clear()

    def _output_for(self, hidden: torch.Tensor, reuse: bool) -> torch.Tensor:
        """An uninitialised [batch, seq, L, d] tensor like ``hidden`` [batch, seq, d]: kept for the next call if ``reuse``."""
        shape = (*hidden.shape[:-1], len(self.layers), hidden.shape[-1])
        if not reuse:
            return hidden.new_empty(shape)
        key = (shape, hidden.dtype, hidden.device)
        if key not in self._reused:
            self._reused.clear()  # one shape at a time (a shard's last batch may be smaller)
            self._reused[key] = hidden.new_empty(shape)
        return self._reused[key]


@contextmanager
def record_block_outputs(model: nn.Module, last_layer: int) -> Iterator[dict[int, object]]:
    """Within the context, each forward stores blocks 0..last_layer's raw outputs (tensor or tuple) by layer."""
    blocks = decoder_blocks(model)
    recorded: dict[int, object] = {}

    def make_hook(layer: int) -> Callable:
        def hook(_module: nn.Module, _inputs, output) -> None:
            recorded[layer] = output

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in range(last_layer + 1)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replay_block_outputs(model: nn.Module, outputs: dict[int, object]) -> Iterator[None]:
    """Within the context, block j returns ``outputs[j]`` without computing anything.

    For splicing at block l after a clean pass: replaying blocks 0..l-1 (and l, with its output
    replaced) skips the part of the forward the splice cannot change, so only blocks l+1.. run.
    """
    blocks = decoder_blocks(model)
    for layer, output in outputs.items():
        blocks[layer].forward = lambda *_args, _output=output, **_kwargs: _output  # instance attribute shadows the method
    try:
        yield
    finally:
        for layer in outputs:
            del blocks[layer].forward


def map_block_hidden(output, replace: Callable[[torch.Tensor], torch.Tensor]):
    """A block's raw output with its hidden state (the tensor, or a tuple's first item) replaced."""
    if isinstance(output, (tuple, list)):
        return (replace(output[0]), *output[1:])
    return replace(output)


@contextmanager
def replace_block_output(model: nn.Module, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, block ``layer``'s output hidden state is ``replace(hidden)`` (for splicing)."""
    block = decoder_blocks(model)[layer]
    handle = block.register_forward_hook(lambda _module, _inputs, output: map_block_hidden(output, replace))
    try:
        yield
    finally:
        handle.remove()
