"""Filtering backward of the ``"triton"`` backend: skip the pairs the forward proved negligible.

The forward's per-block max and sum of exponentials give each (token, vocabulary block) pair its
probability mass; `kept_blocks` drops, per token, the blocks of smallest mass while their total
stays within the token's budget, ``filter_mass`` times its probability off the label (`drop_budget`;
the label's block stays: its ``dL/da`` entry carries the log-prob's upstream gradient). The backward then never recomputes a dropped pair. Per vocabulary block the
kept tokens are gathered into "slots", padded to whole tiles of ``BM``; `_slot_grad_kernel` recomputes each
tile's logits from the gathered hidden rows, forms ``dL/da`` and adds ``dL/da @ W_block`` to the
fp32 ``[M, D]`` hidden-state gradient (atomic adds: a token has slots in several blocks), keeping
the tile in a compact ``[slots, BN]`` buffer; `_slot_weight_grad_kernel` sums ``dL/da^T @ hidden``
over a block's tiles and writes that block of the weight gradient once. Three GEMMs over the kept
pairs instead of over all of them; the hidden-state gradient's summation order is not fixed. As in
the dense backward, each token's label entry stays out of the GEMM operands (kept in fp32, its
block always recomputed) and is added to both gradients afterwards (`hidden_grad`,
`add_label_weight_rows`).

What is dropped: for each token at most ``filter_mass * (1 - p_label)`` of its probability (with a
vocabulary split over P ranks, at most a P-th of that on each). With ``c = g_logsumexp - g_logprob``
its ``dL/dz = c p + g_logprob onehot(label)`` has an L1 norm of ``|c| (1 - p_label) + |c p_label +
g_logprob|``, and the dropped part at most ``filter_mass |c| (1 - p_label)``: at most ``filter_mass``
of the token's own ``dL/dz`` (``filter_mass / 2`` when only log-probs carry a gradient), however
confident the model is. A budget of ``filter_mass`` alone would let a confident token (``1 - p_label``
below it) lose every block but its label's, the whole of its small gradient: on a trained model's
distributions that took the hidden-state gradient's error past the exact mode's bound. Only those two
upstream gradients are supported (entropy's and mean logit's are not small where ``p`` is). When the slots would hold more
than `DENSE_ABOVE` of all pairs (flat distributions) the dense backward runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..problem import LogitTransform, VocabShard
from .slots import Slots
from .triton_kernels import apply_transform, grad_a, logits_tile, mma, onehot_term
from .triton_shared import (EXTRA_BUFFER_BYTES, Upstream, add_label_weight_rows, dot_prec, hidden_grad, transform_args,
                            transform_flags)

#: Above this fraction of (token, block) pairs in slots (kept ones and tile padding) the dense
#: backward runs instead: the slot kernels' time grows linearly with the kept pairs, and from
#: their timing against the dense backward's the two would meet near half (benchmarks/NOTES-triton.md).
DENSE_ABOVE = 0.5


@dataclass(frozen=True)
class SlotConfig:
    """Tiles of the two slot kernels (the vocabulary block width comes from the forward)."""

    BM: int = 128  # slots (gathered tokens) per tile
    BK: int = 64  # reduction step of the logits recompute
    BD_H: int = 64  # hidden columns per step of the hidden-state gradient
    BD_W: int = 128  # hidden columns per weight-gradient program
    num_warps: int = 8
    num_stages: int = 3
    num_stages_w: int = 2  # the weight-gradient kernel's (its G and H tiles are larger)


SLOT_CONFIGS = {
    torch.bfloat16: SlotConfig(),
    torch.float16: SlotConfig(),
    torch.float32: SlotConfig(32, 32, 32, 32, 4, 2, 2),
}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _keep_kernel(PMax, PSum, Lse, Lbl, Budget, Keep, M, NB, label_offset, vocab_local,
                 BR: tl.constexpr, NBP: tl.constexpr, BN: tl.constexpr):
    """``Keep[b, r]`` for ``BR`` tokens (all ``NB`` blocks, padded to ``NBP``, in registers)."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_ok = rows < M
    blocks = tl.arange(0, NBP)
    ok = row_ok[:, None] & (blocks < NB)[None, :]
    offs = blocks.to(tl.int64)[None, :] * M + rows[:, None]
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    budget = tl.load(Budget + rows, mask=row_ok, other=0.0)
    bmax = tl.load(PMax + offs, mask=ok, other=float("-inf"))
    mass = tl.load(PSum + offs, mask=ok, other=0.0) * tl.exp(bmax - lse[:, None])
    mass = tl.where(ok, mass, float("inf"))  # padding: never under a threshold
    # The largest threshold t with sum(mass < t) <= budget, by bisection on the bits of the
    # (non-negative) float t: exactly the first block the ascending greedy keeps; a sort per token
    # in registers took 0.8 ms at the Qwen3 shape.
    lo = tl.zeros((BR,), dtype=tl.int32)  # t = 0: nothing below it, always allowed
    # t = inf: the whole mass, over the budget (on a vocabulary shard holding less, the search ends
    # at the largest float: every block but the label's dropped, as the rule says; a budget of 0
    # keeps every block of nonzero mass)
    hi = tl.full((BR,), 0x7F800000, dtype=tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        below = tl.sum(tl.where(mass < mid.to(tl.float32, bitcast=True)[:, None], mass, 0.0), 1)
        fits = below <= budget
        lo = tl.where(fits, mid, lo)
        hi = tl.where(fits, hi, mid)
    keep = mass >= lo.to(tl.float32, bitcast=True)[:, None]  # ties with the first kept block stay
    local = tl.load(Lbl + rows, mask=row_ok, other=0) - label_offset
    mine = (local >= 0) & (local < vocab_local)
    keep = keep | (mine[:, None] & (blocks[None, :] == (local // BN)[:, None]))
    tl.store(Keep + offs, keep.to(tl.int8), mask=ok)


@triton.jit
def _slot_grad_kernel(H, W, Bias, Lbl, Lse, Ez, Coef, GEnt, GMean, GLogp, SlotRows, TileBlock, G, Acc, GBias,
                      Entry, V, D, stride_h, stride_w, stride_acc, label_offset, tile0, g_base,
                      scale, softcap, inv_temp, dz_factor, t_over_c,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SCALED: tl.constexpr, HAS_ENT: tl.constexpr,
                      HAS_MEAN: tl.constexpr, HAS_LOGP: tl.constexpr, NEED_H: tl.constexpr,
                      NEED_G: tl.constexpr, NEED_GB: tl.constexpr, TAKE_LABEL: tl.constexpr,
                      EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """``dL/da`` of tile ``tile0 + program`` (``BM`` gathered tokens x one block); its
    ``dL/da @ W_block`` into ``Acc`` and, with ``NEED_G``, the tile into this chunk's ``G`` (whose
    first row is slot ``g_base``); with ``TAKE_LABEL``, each token's label entry into ``Entry`` (fp32)
    instead, zero in both (the label's block is always kept, so it is written once)."""
    tile = tile0 + tl.program_id(0)
    blk = tl.load(TileBlock + tile).to(tl.int64)
    slots = tile.to(tl.int64) * BM + tl.arange(0, BM)
    rows = tl.load(SlotRows + slots)
    row_ok = rows >= 0
    rows_c = tl.where(row_ok, rows, 0).to(tl.int64)
    cols = tl.arange(0, BN)
    rn = blk * BN + cols
    col_ok = rn < V
    rn_c = tl.where(col_ok, rn, 0)
    a = logits_tile(H, W, rows_c, rn_c, D, stride_h, stride_w, BM, BN, BK, EVEN_K, DOT_PREC)
    if HAS_BIAS:
        a += tl.load(Bias + rn_c).to(tl.float32)[None, :]
    z = apply_transform(a, scale, softcap, inv_temp, SOFTCAP, SCALED)
    local = tl.load(Lbl + rows_c) - label_offset - blk * BN
    g = grad_a(z, rows_c, onehot_term(GLogp, rows_c, local, cols, HAS_LOGP), Lse, Ez, Coef, GEnt, GMean,
                dz_factor, t_over_c, SOFTCAP, HAS_ENT, HAS_MEAN, HAS_LOGP)
    mask = row_ok[:, None] & col_ok[None, :]
    g = tl.where(mask, g, 0.0)
    if NEED_GB:
        tl.atomic_add(GBias + rn_c, tl.sum(g, 0), mask=col_ok, sem="relaxed")
    if TAKE_LABEL:
        is_label = (cols[None, :] == local[:, None]) & mask
        tl.store(Entry + rows_c, tl.sum(tl.where(is_label, g, 0.0), 1),
                 mask=row_ok & (local >= 0) & (local < BN) & (blk * BN + local < V))
        g = tl.where(is_label, 0.0, g)
    g_op = g.to(G.dtype.element_ty)
    if NEED_G:  # padding slots and columns past V hold zeros
        tl.store(G + (slots - g_base)[:, None] * BN + cols[None, :], g_op)
    if NEED_H:
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            d_ok = rd < D
            w = tl.load(W + (rn_c * stride_w)[:, None] + rd[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            part = mma(g_op, w, tl.zeros((BM, BD), dtype=tl.float32), DOT_PREC)
            # relaxed: nothing reads Acc before the kernel ends (acq_rel made the kernel 2.5x slower)
            tl.atomic_add(Acc + (rows_c * stride_acc)[:, None] + rd[None, :], part,
                          mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _slot_weight_grad_kernel(H, G, SlotRows, TileStart, GW, V, D, stride_h, stride_gw, block0, g_base,
                             DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """``GW[block] = sum over the block's tiles of G_tile^T @ H[tile's tokens]`` for ``BD`` columns
    (zeros for a block without kept tokens), written once."""
    blk = block0 + tl.program_id(0)
    rd = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    d_ok = rd < D
    cols = tl.arange(0, BN)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for t in range(tl.load(TileStart + blk), tl.load(TileStart + blk + 1)):
        slots = t * BM + tl.arange(0, BM).to(tl.int64)  # TileStart is int64
        rows = tl.load(SlotRows + slots)
        ok = rows >= 0
        rows_c = tl.where(ok, rows, 0).to(tl.int64)
        g = tl.load(G + (slots - g_base)[:, None] * BN + cols[None, :])
        h = tl.load(H + (rows_c * stride_h)[:, None] + rd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(tl.trans(g), h, acc, DOT_PREC)
    rn = blk.to(tl.int64) * BN + cols
    tl.store(GW + (rn * stride_gw)[:, None] + rd[None, :], acc.to(GW.dtype.element_ty),
             mask=(rn < V)[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def drop_budget(filter_mass: float, label_logit: torch.Tensor, lse: torch.Tensor, ranks: int = 1) -> torch.Tensor:
    """fp32 ``[M]``: the probability each token's backward may skip on this rank,
    ``filter_mass * (1 - p_label) / ranks``, from the forward's fp32 ``[M]`` label logits and logsumexp
    (both over the whole vocabulary). ``1 - p_label`` comes from ``expm1``, exact where the label
    takes nearly all the mass (there the budget goes to 0 and every block is kept)."""
    off_label = torch.expm1(torch.clamp(label_logit - lse, max=0.0)).neg_()
    return off_label.mul_(filter_mass / ranks)


def kept_blocks(block_max: torch.Tensor, block_sum: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                offset: int, vocab_local: int, block: int, budget: torch.Tensor) -> torch.Tensor:
    """``keep`` bool ``[NB, M]``: the (vocabulary block, token) pairs the backward recomputes.

    ``block_max``, ``block_sum``: fp32 ``[NB, M]``, each block's max logit and sum of
    ``exp(z - max)`` (blocks of ``block`` columns); ``lse``: fp32 ``[M]`` over the whole vocabulary;
    ``labels`` ``[M]`` global ids, this rank's ``vocab_local`` rows starting at ``offset``;
    ``budget``: fp32 ``[M]`` (`drop_budget`). Per token, the blocks sorted by mass
    ``block_sum * exp(block_max - lse)`` are dropped from the smallest while their running total
    stays at most its budget; the label's block is always kept.
    """
    nb, m = block_max.shape
    keep = torch.empty((nb, m), dtype=torch.int8, device=block_max.device)
    nbp = triton.next_power_of_2(max(nb, 2))
    rows = max(1, min(8, 8192 // nbp))  # ~32 masses a thread, all in registers
    _keep_kernel[(triton.cdiv(m, rows),)](
        block_max, block_sum, lse, labels, budget.float().contiguous(), keep, m, nb, offset, vocab_local,
        BR=rows, NBP=nbp, BN=block, num_warps=8,
    )
    return keep.view(torch.bool)


def filtered_backward(hidden, weight, bias, labels, lse, keep, up: dict, transform: LogitTransform,
                      shard: Optional[VocabShard], block: int, memory_budget: Optional[int], need):
    """Gradients for ``(hidden, weight, bias)`` over the kept pairs, or None when the slots would
    hold more than `DENSE_ABOVE` of all pairs (the caller then runs the dense backward).

    ``keep`` bool ``[NB, M]`` from `kept_blocks` with blocks of ``block`` columns; ``up``: upstream
    gradients by output name (fp32 ``[M]``).
    """
    unsupported = sorted(n for n in up if n in ("entropy", "mean_logit"))
    if unsupported:
        raise ValueError(
            f"the triton backend's filtering backward (filter_mass) takes gradients of logprobs and logsumexp "
            f"only, but {unsupported} received one (their dL/dz is not small where the probability is); "
            "run without filter_mass or detach those outputs")
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    m, d = hidden.shape
    v = weight.shape[0]
    nb = keep.shape[0]
    cfg = SLOT_CONFIGS[hidden.dtype]
    slots = Slots.of(keep, cfg.BM, max_slots=int(DENSE_ABOVE * nb * -(-m // cfg.BM) * cfg.BM))
    if slots is None:
        return None
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    offset = shard.start if shard is not None else 0
    u = Upstream.of(up, m, None, None, dev)
    acc = torch.zeros(m, d, **f32) if need_h else None
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias32 = torch.zeros(v, **f32) if need_b else None
    # Each token's label entry, fp32, 0 where the label is in another shard.
    entry = torch.zeros(m, **f32) if (u.has_logprob and (need_h or need_w)) else None
    elem = hidden.element_size()
    # The default budget is the dense backward's buffer, less what this path holds besides: the
    # mask and the slot layout (at 24k tokens 22 MB, which put the peak 12 MB over the target).
    held = keep.numel() + 4 * (slots.rows.numel() + slots.tile_block.numel())
    budget = memory_budget or (m * d * elem + EXTRA_BUFFER_BYTES - held)
    max_tiles = max(1, budget // (cfg.BM * block * elem))
    chunks = list(slots.chunks(max_tiles)) if need_w else [(0, nb)]
    widest = max(slots.starts[b1] - slots.starts[b0] for b0, b1 in chunks)
    g_buf = torch.empty(max(widest, 1) * cfg.BM * block, dtype=hidden.dtype, device=dev) if need_w else None
    precision = dot_prec(hidden.dtype)
    for b0, b1 in chunks:
        t0, t1 = slots.starts[b0], slots.starts[b1]
        if t1 > t0:
            _slot_grad_kernel[(t1 - t0,)](
                hidden, weight, bias if bias is not None else hidden, labels, lse, *u.kernel_args(), u.g_logprob,
                slots.rows, slots.tile_block, g_buf if need_w else hidden, acc if need_h else lse,
                grad_bias32 if need_b else lse, entry if entry is not None else lse,
                v, d, hidden.stride(0), weight.stride(0), d, offset, t0, t0 * cfg.BM, *transform_args(transform),
                HAS_BIAS=bias is not None, **transform_flags(transform), **u.kernel_flags(),
                HAS_LOGP=u.has_logprob, NEED_H=need_h, NEED_G=need_w, NEED_GB=need_b, TAKE_LABEL=entry is not None,
                EVEN_K=(d % cfg.BK == 0), DOT_PREC=precision, BM=cfg.BM, BN=block, BK=cfg.BK, BD=cfg.BD_H,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if need_w:
            _slot_weight_grad_kernel[(b1 - b0, triton.cdiv(d, cfg.BD_W))](
                hidden, g_buf, slots.rows, slots.tile_start, grad_weight, v, d, hidden.stride(0),
                grad_weight.stride(0), b0, t0 * cfg.BM, DOT_PREC=precision, BM=cfg.BM, BN=block, BD=cfg.BD_W,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages_w,
            )
    del g_buf
    if need_w and entry is not None:
        add_label_weight_rows(grad_weight, entry, hidden, labels, offset)
    grad_hidden = None
    if need_h:
        grad_hidden = hidden_grad(acc, entry, weight, labels, shard, hidden.dtype)
    grad_bias = grad_bias32.to(bias.dtype) if need_b else None
    return grad_hidden, grad_weight, grad_bias
