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
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mlsae_cache.lens import Lens
from mlsae_cache.lm import map_block_hidden, record_block_outputs, replace_block_output, replay_block_outputs
from mlsae_train import MultiLayerSAE

# reconstruct(hidden [n, d], layer_index) -> [n, d]: what replaces the residual at kept positions
Reconstructor = Callable[[torch.Tensor, int], torch.Tensor]


def make_reconstructor(sae: MultiLayerSAE, layers: list[int], lens: Lens | None) -> Reconstructor:
    """The SAE's reconstruction in residual space, through the lens and its inverse when there is one."""

    def reconstruct(hidden: torch.Tensor, layer_index: int) -> torch.Tensor:
        block = layers[layer_index]
        x = hidden.float()
        if lens is not None:
            x = lens.forward(x, block)
        x_hat = sae(x)
        if lens is not None:
            x_hat = lens.inverse(x_hat, block)
        return x_hat.to(hidden.dtype)

    return reconstruct


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
) -> pl.DataFrame:
    """Delta CE and KL per analysed block.

    input_ids: [N, S] full model inputs; kept: [N, S] bool positions to splice; layers: model blocks.
    reuse_prefix=False runs the whole model for every splice (the plain reference the fast path is
    tested against). Returns one row per layer: layer, layer_index, ce_clean, ce_spliced, delta_ce,
    kl_per_token, kl_per_sequence.
    """
    n_sequences, seq_len = input_ids.shape
    device = next(model.parameters()).device
    clean_ce = 0.0
    spliced_ce = np.zeros(len(layers))
    kl_sum = np.zeros(len(layers))
    # one unit = one sequence spliced at one layer (each needs a forward pass of the blocks after it)
    bar = tqdm(total=n_sequences * len(layers), unit="seq·layer", desc=f"splice {n_sequences} seq x {len(layers)} layers",
               disable=not progress)  # fmt: skip
    n_batches = -(-n_sequences // batch_size)
    for start in range(0, n_sequences, batch_size):
        ids = input_ids[start : start + batch_size].to(device)  # [B, S]
        mask = kept[start : start + batch_size].to(device)  # [B, S]
        with record_block_outputs(model, max(layers)) as clean_outputs:
            clean_logits = _logits(model, ids)  # [B, S, V]
        clean_ce += float(_ce_per_sequence(clean_logits, ids).sum())
        for index, block in enumerate(layers):

            def splice(hidden: torch.Tensor, index: int = index) -> torch.Tensor:
                out = hidden.clone()  # [B, S, d]
                out[mask] = reconstruct(hidden[mask], index)
                return out

            if reuse_prefix:  # blocks 0..block replay the clean pass; only the blocks after the splice run
                replayed = {j: clean_outputs[j] for j in range(block)}
                replayed[block] = map_block_hidden(clean_outputs[block], splice)
                with replay_block_outputs(model, replayed):
                    spliced_logits = _logits(model, ids)
            else:
                with replace_block_output(model, block, splice):
                    spliced_logits = _logits(model, ids)
            spliced_ce[index] += float(_ce_per_sequence(spliced_logits, ids).sum())
            kl_sum[index] += float(_kl_per_sequence(clean_logits, spliced_logits).sum())
            bar.update(ids.shape[0])
            bar.set_postfix_str(f"batch {start // batch_size + 1}/{n_batches}, layer {index + 1}/{len(layers)}", refresh=False)
    bar.close()
    n_predictions = n_sequences * (seq_len - 1)
    ce_clean = clean_ce / n_predictions
    ce_spliced = spliced_ce / n_predictions
    kl_per_token = kl_sum / (n_sequences * seq_len)
    return pl.DataFrame(
        {
            "layer": layers,
            "layer_index": list(range(len(layers))),
            "ce_clean": [ce_clean] * len(layers),
            "ce_spliced": ce_spliced,
            "delta_ce": ce_spliced - ce_clean,
            "kl_per_token": kl_per_token,
            "kl_per_sequence": kl_per_token * seq_len,
        }
    )
