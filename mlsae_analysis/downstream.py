"""Delta CE and KL of SPEC section 4: splice reconstructions into the language model.

For each analysed block l, block l's output hidden state is replaced at the KEPT positions (the
tokens stored in the cache; special positions stay as the model computed them) by its
reconstruction, and the rest of the model runs on. Over the spliced sequences:
  delta_ce[l]        = CE(spliced) - CE(clean), next-token cross-entropy, mean over the S-1
                       predicted positions of every sequence (nats)
  kl_per_token[l]    = mean over all S positions of KL(p_clean || p_spliced) (nats)
  kl_per_sequence[l] = kl_per_token[l] * S, the per-sequence sum the paper's table reports
With a tuned lens the reconstruction is made in lens space and mapped back by the exact inverse
before it is spliced (``make_reconstructor``).

The reconstructions of a batch are made once, from the CLEAN hidden states of every analysed block at the
kept positions ([n, L, d]: what the dictionary was trained to read; a crosscoder reads all L at once), and
block l's is spliced at block l. ``splice_all=True`` also splices every analysed block in ONE forward pass.
Since each block's reconstruction depends only on the clean states, replacing block l+1's output
overwrites whatever block l's splice did at the kept positions: when every position is kept, splicing all
layers at once IS splicing the last analysed layer alone (tests/test_analysis_families.py checks it); they
differ only through the special positions, which are recomputed from the spliced earlier layers.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Protocol, Union

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mlsae_cache.lens import Lens
from mlsae_cache.lm import map_block_hidden, record_block_outputs, replace_block_output, replay_block_outputs


class LayerStackReconstructor(Protocol):
    """What a splice replaces the residual with: the reconstruction of every analysed block at once."""

    def reconstruct_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, L, d]: the clean outputs of the analysed blocks at n kept positions -> [n, L, d]."""
        ...


VectorReconstructor = Callable[[torch.Tensor, int], torch.Tensor]
"""reconstruct(hidden [n, d], layer_index) -> [n, d]: a per-vector reconstruction, one layer at a time."""

Reconstructor = Union[LayerStackReconstructor, VectorReconstructor]


@dataclass
class DictionaryReconstructor:
    """A dictionary of any family (x [n, L, d] -> [n, L, d]) in residual space, through the lens and its
    exact inverse when there is one."""

    sae: nn.Module
    layers: list[int]
    lens: Lens | None

    def reconstruct_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()  # [n, L, d]
        if self.lens is not None:
            x = self.lens.forward_stack(x, self.layers)
        x_hat = self.sae(x)  # [n, L, d]
        if self.lens is not None:
            x_hat = torch.stack([self.lens.inverse(x_hat[:, i], block) for i, block in enumerate(self.layers)], dim=1)
        return x_hat.to(hidden.dtype)


@dataclass
class PerVectorReconstructor:
    """A per-vector function (:data:`VectorReconstructor`) applied to each layer of the stack."""

    reconstruct: VectorReconstructor

    def reconstruct_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.reconstruct(hidden[:, i], i) for i in range(hidden.shape[1])], dim=1)


def as_layer_stack(reconstruct: Reconstructor) -> LayerStackReconstructor:
    """A reconstructor of the layer stack: itself, or a per-vector function applied layer by layer."""
    if hasattr(reconstruct, "reconstruct_layers"):
        return reconstruct  # type: ignore[return-value]
    return PerVectorReconstructor(reconstruct)  # type: ignore[arg-type]


def make_reconstructor(sae: nn.Module, layers: list[int], lens: Lens | None) -> DictionaryReconstructor:
    """The dictionary's reconstruction in residual space, through the lens and its inverse when there is one."""
    return DictionaryReconstructor(sae, list(layers), lens)


def _hidden(output) -> torch.Tensor:
    """A block's raw output's hidden state (the tensor, or a tuple's first item)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def kept_positions(token_table: pl.DataFrame, sequences: np.ndarray, seq_len: int) -> torch.Tensor:
    """[n_sequences, S] bool: True where the cache stores the token (not a special position)."""
    mask = np.zeros((len(sequences), seq_len), dtype=bool)
    row_of = {int(seq): row for row, seq in enumerate(sequences)}
    rows = token_table.filter(pl.col("sequence").is_in(list(row_of)))
    seq_rows = np.array([row_of[int(s)] for s in rows["sequence"].to_list()], dtype=np.int64)
    mask[seq_rows, rows["position"].to_numpy()] = True
    return torch.from_numpy(mask)


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()  # [B, S, V]


def _ce_per_sequence(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the S-1 predicted positions of the next-token CE: [B]."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, S-1]
    return losses.double().sum(dim=1)


def _kl_per_sequence(clean_logits: torch.Tensor, spliced_logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(p_clean || p_spliced): [B]."""
    log_p = F.log_softmax(clean_logits, dim=-1)  # [B, S, V]
    log_q = F.log_softmax(spliced_logits, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [B, S]
    return kl.double().sum(dim=1)


@torch.no_grad()
def downstream_metrics(
    model: nn.Module,
    input_ids: torch.Tensor,
    kept: torch.Tensor,
    layers: list[int],
    reconstruct: Reconstructor,
    batch_size: int = 4,
    progress: bool = True,
    reuse_prefix: bool = True,
    splice_all: bool = False,
) -> pl.DataFrame:
    """Delta CE and KL per analysed block.

    input_ids: [N, S] full model inputs; kept: [N, S] bool positions to splice; layers: model blocks;
    reconstruct: a :class:`LayerStackReconstructor` or a per-vector function (hidden [n, d], layer_index).
    reuse_prefix=False runs the whole model for every splice (the plain reference the fast path is
    tested against). Returns one row per layer: layer, layer_index, ce_clean, ce_spliced, delta_ce,
    kl_per_token, kl_per_sequence; with ``splice_all`` one more row, whose layer and layer_index are null,
    for every analysed block spliced in the same forward pass (module docstring).
    """
    stack = as_layer_stack(reconstruct)
    n_sequences, seq_len = input_ids.shape
    device = next(model.parameters()).device
    n_splices = len(layers) + int(splice_all)
    clean_ce = 0.0
    spliced_ce = np.zeros(n_splices)
    kl_sum = np.zeros(n_splices)
    # one unit = one sequence spliced at one layer (each needs a forward pass of the blocks after it)
    bar = tqdm(total=n_sequences * n_splices, unit="seq·layer", desc=f"splice {n_sequences} seq x {n_splices} layers",
               disable=not progress)  # fmt: skip
    n_batches = -(-n_sequences // batch_size)
    for start in range(0, n_sequences, batch_size):
        ids = input_ids[start : start + batch_size].to(device)  # [B, S]
        mask = kept[start : start + batch_size].to(device)  # [B, S]
        with record_block_outputs(model, max(layers)) as clean_outputs:
            clean_logits = _logits(model, ids)  # [B, S, V]
        clean_ce += float(_ce_per_sequence(clean_logits, ids).sum())
        clean = torch.stack([_hidden(clean_outputs[block])[mask] for block in layers], dim=1)  # [n kept, L, d]
        recon = stack.reconstruct_layers(clean)  # [n kept, L, d]

        def splice(hidden: torch.Tensor, index: int) -> torch.Tensor:
            out = hidden.clone()  # [B, S, d]
            out[mask] = recon[:, index].to(hidden.dtype)
            return out

        for index, block in enumerate(layers):
            if reuse_prefix:  # blocks 0..block replay the clean pass; only the blocks after the splice run
                replayed = {j: clean_outputs[j] for j in range(block)}
                replayed[block] = map_block_hidden(clean_outputs[block], lambda h, index=index: splice(h, index))
                with replay_block_outputs(model, replayed):
                    spliced_logits = _logits(model, ids)
            else:
                with replace_block_output(model, block, lambda h, index=index: splice(h, index)):
                    spliced_logits = _logits(model, ids)
            spliced_ce[index] += float(_ce_per_sequence(spliced_logits, ids).sum())
            kl_sum[index] += float(_kl_per_sequence(clean_logits, spliced_logits).sum())
            bar.update(ids.shape[0])
            bar.set_postfix_str(f"batch {start // batch_size + 1}/{n_batches}, layer {index + 1}/{len(layers)}", refresh=False)
        if splice_all:  # every analysed block replaced in one pass: the blocks between them run on the spliced states
            with ExitStack() as hooks:
                if reuse_prefix:
                    hooks.enter_context(replay_block_outputs(model, {j: clean_outputs[j] for j in range(min(layers))}))
                for index, block in enumerate(layers):
                    hooks.enter_context(replace_block_output(model, block, lambda h, index=index: splice(h, index)))
                spliced_logits = _logits(model, ids)
            spliced_ce[-1] += float(_ce_per_sequence(spliced_logits, ids).sum())
            kl_sum[-1] += float(_kl_per_sequence(clean_logits, spliced_logits).sum())
            bar.update(ids.shape[0])
    bar.close()
    n_predictions = n_sequences * (seq_len - 1)
    ce_clean = clean_ce / n_predictions
    ce_spliced = spliced_ce / n_predictions
    kl_per_token = kl_sum / (n_sequences * seq_len)
    return pl.DataFrame(
        {
            "layer": [*layers, *([None] if splice_all else [])],
            "layer_index": [*range(len(layers)), *([None] if splice_all else [])],
            "ce_clean": [ce_clean] * n_splices,
            "ce_spliced": ce_spliced,
            "delta_ce": ce_spliced - ce_clean,
            "kl_per_token": kl_per_token,
            "kl_per_sequence": kl_per_token * seq_len,
        },
        schema_overrides={"layer": pl.Int64, "layer_index": pl.Int64},
    )
