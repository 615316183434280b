"""The encoder's exact top-k at bfloat16 matmul speed (``topk_encode(..., screen=True)``).

The float32 kernel (:mod:`.topk_encoder`) spends nearly all its time in ``x @ W_enc.T`` ([N, n] x d
multiply-adds) and the top-k over its n columns. Only k of the n pre-activations of a row matter, so:

1. ``approx = bf16(x) @ bf16(W_enc).T``, where bfloat16 runs ~4x faster (AMX CPUs, GPU tensor cores).
2. A bound E (per row) on ``|approx_j - exact_j|`` that holds for every latent j (derivation below).
3. A threshold below which no latent of the exact top-k can fall: from any k latents with
   ``approx >= t`` the exact k-th largest is at least ``t - E``, so each exact top-k latent has
   ``approx >= t - 2E`` (with the output rounding accounted for, see ``_threshold``). t is the k-th
   largest of the maxima of a few strided column groups: one cheap pass instead of a top-k over n.
4. Every latent with ``approx`` at or above the threshold (about 2-4 k of them) gets its float32 dot
   product, and the k largest of those are the answer.

The result is the float32 top-k: the same latents as :func:`.topk_encoder.topk_encode` except where
two latents tie within float32 rounding, with values equal to float32 dot products. Rows where the
screen cannot decide (the threshold is not positive: fewer than about k positive pre-activations, or
a non-finite input) are computed by the float32 kernel.

The bound. Write x~, W~_j for the bfloat16 roundings, dx = x - x~, dW_j = W_j - W~_j (exact in
float32). Then ``x . W_j - x~ . W~_j = x . dW_j + dx . W~_j``, at most ``|x| |dW_j| + |dx| |W~_j|`` by
Cauchy-Schwarz. The products of two bfloat16 numbers are exact in float32 and their sum in float32, in
any order, errs by at most ``gamma_d |x~| |W~_j|`` with ``gamma_d = d u32 / (1 - d u32)``. The sum is
then rounded to bfloat16, off by at most ``u_out`` times its magnitude (2^-7: round to nearest gives
2^-8, truncation 2^-7). E takes the largest |dW_j| and |W~_j| over j, so one number a row serves every
latent, and a relative 2^-10 plus 2^-100 more for subnormals that AMX flushes to zero.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .sparse_ops import ragged_row_dots
from .workspace import workspace

FLOAT32_UNIT = 2.0**-24
OUTPUT_ROUNDING = 2.0**-7  # bfloat16 output: 2^-8 if rounded to nearest, 2^-7 if truncated
BOUND_MARGIN = 2.0**-10
SUBNORMAL_MARGIN = 2.0**-100
MAX_GROUPS = 8  # the column groups whose maxima give the threshold (strided: group g holds columns g, g + n/S, ...)
PAD_WIDTH = 4  # candidates per row kept in the first top-k table, in units of k (rows with more get a second)
CHUNK_ELEMENTS = 1 << 26  # bfloat16 pre-activations per chunk of rows (128 MiB, reused)


ScreenChoice = Literal["auto", "on", "off"]  # the --screen option of mlsae-train and mlsae-analyse


def use_screen(choice: str, device: torch.device | str, auto_on_gpu: bool = True) -> bool:
    """Whether --screen ``choice`` screens on ``device``: on, off, or auto (where bfloat16 matmuls are
    fast; on GPUs only if ``auto_on_gpu``: the trainer keeps its bfloat16 encoder matmul there, as the
    screen's training speed on a GPU is not measured)."""
    if choice != "auto":
        return choice == "on"
    return bf16_matmul_is_fast(device) and (auto_on_gpu or torch.device(device).type == "cpu")


def bf16_matmul_is_fast(device: torch.device | str) -> bool:
    """Whether a bfloat16 matmul beats float32 here: a GPU with bfloat16 support, or a CPU with AMX or
    AVX-512 BF16 (elsewhere the CPU emulates bfloat16 and the screen would be slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


class EncoderScreen:
    """What the screen needs of W_enc, made once per set of weights: its bfloat16 copy and two norms."""

    def __init__(self, W_enc: torch.Tensor) -> None:
        weight = W_enc.detach()  # [n, d]
        self.W_enc = weight
        self.W_enc_bf16 = weight.to(torch.bfloat16)  # [n, d]
        rounded = self.W_enc_bf16.float()
        self.max_rounding_norm = float(torch.linalg.vector_norm(weight.float() - rounded, dim=1).max())  # max_j |dW_j|
        self.max_rounded_norm = float(torch.linalg.vector_norm(rounded, dim=1).max())  # max_j |W~_j|

    def error_bound(self, x: torch.Tensor, x_bf16: torch.Tensor) -> torch.Tensor:
        """E per row of x [r, d] (float32) and its rounding x_bf16: bounds |approx_j - x . W_j| but for the
        output rounding (handled in ``_threshold``). -> [r]; inf or nan where x is not finite."""
        d = x.shape[1]
        gamma = d * FLOAT32_UNIT / (1 - d * FLOAT32_UNIT)
        rounded = x_bf16.float()
        norm = torch.linalg.vector_norm(x, dim=1)
        rounding_norm = torch.linalg.vector_norm(x - rounded, dim=1)
        rounded_norm = torch.linalg.vector_norm(rounded, dim=1)
        bound = norm * self.max_rounding_norm + (rounding_norm + gamma * rounded_norm) * self.max_rounded_norm
        return bound * (1 + BOUND_MARGIN) + SUBNORMAL_MARGIN


def _group_count(n_latents: int, k: int) -> int:
    """S strided groups with n / S >= 2k columns each (1: the threshold comes from a plain top-k)."""
    groups = MAX_GROUPS
    while groups > 1 and (n_latents % groups or n_latents // groups < 2 * k):
        groups //= 2
    return groups


def _threshold(kth: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """The lowest approx an exact top-k latent can have, given k latents with approx >= kth > 0. -> [r]

    Those k have exact >= approx (1 - u') - E >= kth (1 - u') - E =: low, so the exact k-th largest is >=
    low; a latent with exact >= low has approx (1 + u') >= low - E when approx >= 0. u' = u / (1 - u)
    turns the output rounding's bound (relative to the unrounded sum) into one relative to approx.
    """
    relative = OUTPUT_ROUNDING / (1 - OUTPUT_ROUNDING)
    return (kth * (1 - relative) - 2 * bound) / (1 + relative)


def _bf16_at_most(threshold: torch.Tensor) -> torch.Tensor:
    """The bits (int16) of the largest bfloat16 <= each positive float32 threshold. -> [r]"""
    rounded = threshold.to(torch.bfloat16)
    bits = rounded.view(torch.int16)
    return bits - (rounded.float() > threshold).to(torch.int16)  # positive bfloat16s order as their bits


@torch.no_grad()
def screened_topk(x: torch.Tensor, screen: EncoderScreen, k: int, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of ``x @ W_enc.T`` per row: ``(values [N, k], indices [N, k])``, unsorted.

    x: [N, d] float32, already centred (``z - b_pre``). Values are pre-activations (apply ReLU after).
    """
    n_rows = x.shape[0]
    n_latents = screen.W_enc.shape[0]
    values = x.new_empty(n_rows, k)
    indices = torch.empty(n_rows, k, dtype=torch.long, device=x.device)
    groups = _group_count(n_latents, k)
    chunk_rows = max(1, min(chunk_rows or CHUNK_ELEMENTS // n_latents, n_rows))
    approx_buffer = workspace(chunk_rows, n_latents, torch.bfloat16, x.device)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        chunk = x[start:stop]  # [r, d]
        values[start:stop], indices[start:stop] = _screen_chunk(
            chunk, screen, k, groups, approx_buffer[: stop - start]
        )
    return values, indices


def _screen_chunk(
    x: torch.Tensor, screen: EncoderScreen, k: int, groups: int, approx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n_latents = approx.shape
    x_bf16 = x.to(torch.bfloat16)
    torch.mm(x_bf16, screen.W_enc_bf16.t(), out=approx)  # [r, n]
    # Compared as int16 bits: among non-negative bfloat16s the bit order is the float order and every
    # negative one has a negative int16, so a group's int16 max is its float max whenever that is >= 0.
    bits = approx.view(torch.int16)  # [r, n]
    group_max = bits.view(rows, groups, n_latents // groups).amax(1) if groups > 1 else bits  # [r, n / S]
    kth = _kth_largest(group_max, k).view(torch.bfloat16).float()  # [r]
    threshold = _threshold(kth, screen.error_bound(x, x_bf16))  # [r]
    decided = (kth > 0) & (threshold > 0)  # False for nan
    threshold_bits = torch.where(decided, _bf16_at_most(threshold.clamp_min(0)), torch.iinfo(torch.int16).max)  # [r]
    # Candidates: first the groups whose max passes ([r, n / S], cheap), then their S members each.
    group_rows, group_cols = (group_max >= threshold_bits[:, None]).nonzero(as_tuple=True)  # [G] each, row-major
    stride = n_latents // groups
    # flat positions row * n + column in int32 (a chunk has < 2^31 entries): half the traffic of int64
    group_starts = (group_rows * n_latents + group_cols).to(torch.int32)  # [G]
    members = group_starts[:, None] + torch.arange(0, n_latents, stride, dtype=torch.int32, device=x.device)  # [G, S]
    passes = bits.view(-1).index_select(0, members.view(-1)).view(-1, groups) >= threshold_bits[group_rows, None]
    passes &= decided[group_rows, None]  # a row of +inf (bits 0x7f80) would pass 0x7fff; never a finite row
    flat = members.view(-1)[passes.view(-1).nonzero().squeeze(1)].long()  # [E] row * n + column, row-major
    candidate_rows = torch.div(flat, n_latents, rounding_mode="floor")  # [E]
    candidate_cols = flat - candidate_rows * n_latents  # [E]
    counts = torch.bincount(candidate_rows, minlength=rows)  # [r], >= k on decided rows
    row_starts = torch.zeros(rows + 1, dtype=torch.long, device=x.device)
    torch.cumsum(counts, 0, out=row_starts[1:])
    exact = ragged_row_dots(row_starts, candidate_cols, screen.W_enc, x)  # [E] float32 dot products

    # The k largest of each row's candidates, in a [r, PAD_WIDTH k] table (a row's first candidates);
    # the few rows with more candidates get a second, wider table of their own.
    slot = torch.arange(candidate_cols.numel(), device=x.device) - row_starts[candidate_rows]  # [E] place in its row
    most = int(counts.max()) if rows else k
    width = max(k, min(most, PAD_WIDTH * k))
    values, indices = _padded_topk(exact, candidate_cols, candidate_rows, slot, rows, width, k)  # [r, k] each
    if most > width:
        wide = (counts > width).nonzero().flatten()  # [w] ascending
        in_wide = (counts > width)[candidate_rows]  # [E]
        sub_rows = torch.searchsorted(wide, candidate_rows[in_wide])  # [E_w] position among the wide rows
        values[wide], indices[wide] = _padded_topk(
            exact[in_wide], candidate_cols[in_wide], sub_rows, slot[in_wide], wide.numel(), most, k
        )

    undecided = (~decided).nonzero().flatten()
    if undecided.numel():  # the float32 kernel for these rows
        exact_rows = x[undecided] @ screen.W_enc.t()  # [u, n]
        fallback = exact_rows.topk(k, dim=1, sorted=False)
        values[undecided], indices[undecided] = fallback.values, fallback.indices
    return values, indices


def _kth_largest(table: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of each row of table [r, m]. -> [r]

    On CPU numpy's introselect (one thread, ~4x faster than torch.topk on rows this short)."""
    if table.device.type == "cpu":
        m = table.shape[1]
        return torch.from_numpy(np.partition(table.numpy(), m - k, axis=1)[:, m - k])
    return table.topk(k, dim=1, sorted=False).values.amin(1)


def _padded_topk(
    values: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor, n_rows: int, width: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row of ragged entries (values, cols, rows, slot: [E]; slot = place within its row),
    through a [n_rows, width] table padded with -inf; entries with slot >= width are left out."""
    keep = slot < width
    where = rows[keep] * width + slot[keep]  # flat positions in the table
    padded = torch.full((n_rows, width), float("-inf"), dtype=values.dtype, device=values.device)
    padded_cols = torch.zeros(n_rows, width, dtype=torch.long, device=values.device)
    padded.view(-1).index_copy_(0, where, values[keep])
    padded_cols.view(-1).index_copy_(0, where, cols[keep])
    top = padded.topk(k, dim=1, sorted=False)
    return top.values, padded_cols.gather(1, top.indices)  # [n_rows, k] each
