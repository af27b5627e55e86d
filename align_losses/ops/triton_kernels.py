"""The Triton kernels of the ``"triton"`` backend (`align_losses.ops.triton_head` launches them).

- `fwd_kernel`: the logits GEMM over ``[tokens, vocab]`` tiles whose epilogue reduces each tile row
  to partial statistics (max, sum exp, ...) and picks the label's logit; `combine_kernel` merges
  the ``[vocab blocks, M]`` partials per token.
- `bwd_kernel`: the same GEMM for one vocabulary chunk, its epilogue writing ``dL/da`` without the
  one-hot term; `label_entry_kernel` keeps each token's label entry in fp32 and zeroes it in
  ``dL/da``, so that it reaches the gradients unrounded, added after the GEMMs: `label_rows_kernel`
  to the fp32 hidden-state gradient, `label_weight_rows_kernel` to the weight gradient's rows.

Shared tile pieces (`_z_tile`, `grad_a`, ...) are also used by `align_losses.ops.triton_filter`.
All index arithmetic on rows is 64-bit.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl




def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``, read as Triton reads it)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


#: Whether the kernels run in Triton's CPU interpreter (no inline PTX there).
_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def _exp(x):
    """``e^x`` in fp32 with results below 2^-126 flushed to 0: the SFU's ``ex2`` alone, where
    ``tl.exp`` adds three instructions per element for subnormal results (a probability under
    2^-126 is 0 to every output and gradient here)."""
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _tile_coords(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M token blocks walk the vocabulary blocks together (L2 reuse)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    group = tile // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((tile % in_group) % size_m)
    pid_n = (tile % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation."""
    if DOT_PREC == "interp":  # the CPU interpreter mis-multiplies 16-bit operands
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def logits_tile(H, W, rm_c, rn_c, D, stride_h, stride_w,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """``H[rm_c] @ W[rn_c]^T`` as an fp32 ``[BM, BN]`` tile (row indices already clamped, int64)."""
    rk = tl.arange(0, BK)
    h_ptrs = H + (rm_c * stride_h)[:, None] + rk[None, :]
    w_ptrs = W + (rn_c * stride_w)[None, :] + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BK)):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (k * BK + rk) < D
            a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = mma(a, b, acc, DOT_PREC)
        h_ptrs += BK
        w_ptrs += BK
    return acc


@triton.jit
def _logits_tile_tma(HD, WD, off_m, off_n, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """Same tile through tensor-memory-accelerator descriptors (out-of-range rows/columns read 0)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BK)):
        a = HD.load([off_m, k * BK])
        b = WD.load([off_n, k * BK])
        acc = mma(a, b.T, acc, DOT_PREC)
    return acc


@triton.jit
def apply_transform(a, scale, softcap, inv_temp, SOFTCAP: tl.constexpr, SCALED: tl.constexpr):
    """``z = softcap * tanh(a * scale / softcap) / T`` (no tanh without soft-cap; ``z = a`` when
    neither a scale nor a temperature is set: two multiplies per element fewer in the epilogues)."""
    if SOFTCAP:
        x = a * scale / softcap
        t = 1.0 - 2.0 / (_exp(2.0 * x) + 1.0)
        return t * softcap * inv_temp
    elif SCALED:
        return a * scale * inv_temp
    else:
        return a


@triton.jit
def _z_tile(tile, H, W, HD, WD, Bias, M, N, D, stride_h, stride_w, scale, softcap, inv_temp,
            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SCALED: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
            USE_TMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Transformed logits ``z`` (fp32 ``[BM, BN]``) of one tile, with its coordinates and row/column masks."""
    pid_m, pid_n = _tile_coords(tile, M, N, BM, BN, GROUP_M)
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rm_c = rm % M
    rn_c = rn % N
    if USE_TMA:
        acc = _logits_tile_tma(HD, WD, pid_m * BM, pid_n * BN, D, BM, BN, BK, DOT_PREC)
    else:
        acc = logits_tile(H, W, rm_c, rn_c, D, stride_h, stride_w, BM, BN, BK, EVEN_K, DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + rn_c).to(tl.float32)[None, :]
    z = apply_transform(acc, scale, softcap, inv_temp, SOFTCAP, SCALED)
    return pid_m, pid_n, rm, rm < M, rm_c, rn, rn < N, z


@triton.jit
def fwd_kernel(H, W, HD, WD, Bias, Lbl, PMax, PSum, PSez, PSz, PSe2, PArg, LabelLogit,
               M, V, D, stride_h, stride_w, label_offset, num_programs,
               scale, softcap, inv_temp,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SCALED: tl.constexpr,
               NEED_EZ: tl.constexpr, NEED_SZ: tl.constexpr, NEED_SE2: tl.constexpr, NEED_ARG: tl.constexpr,
               EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, FLATTEN: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    cols = tl.arange(0, BN)
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(V, BN)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n, rm, row_ok, rm_c, rn, col_ok, z = _z_tile(
            tile, H, W, HD, WD, Bias, M, V, D, stride_h, stride_w, scale, softcap, inv_temp,
            HAS_BIAS, SOFTCAP, SCALED, EVEN_K, DOT_PREC, USE_TMA, BM, BN, BK, GROUP_M)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        mx = tl.max(z, 1)
        # A block of -inf logits only (a bias that masks part of the vocabulary) sums to 0, not NaN.
        z_rel = z - tl.where(mx > float("-inf"), mx, 0.0)[:, None]
        e = _exp(z_rel)
        pofs = pid_n.to(tl.int64) * M + rm
        tl.store(PMax + pofs, mx, mask=row_ok)
        tl.store(PSum + pofs, tl.sum(e, 1), mask=row_ok)
        if NEED_EZ:  # relative to the block max, as `_Stats.sum_exp_z`; -inf logits add 0, not 0 x -inf
            tl.store(PSez + pofs, tl.sum(tl.where(e > 0, e * z_rel, 0.0), 1), mask=row_ok)
        if NEED_SZ:
            tl.store(PSz + pofs, tl.sum(tl.where(col_ok[None, :], z, 0.0), 1), mask=row_ok)
        if NEED_SE2:
            tl.store(PSe2 + pofs, tl.sum(e * e, 1), mask=row_ok)
        if NEED_ARG:
            idx = tl.argmax(z, 1, tie_break_left=True)
            tl.store(PArg + pofs, idx.to(tl.int32) + pid_n * BN, mask=row_ok)
        # The label's logit from this tile, not from a separate dot product: lse is built from
        # these values, so log p = z_label - lse <= 0 holds exactly (with TF32 or bf16 operands
        # a more exact z_label would exceed them by up to the GEMM's rounding).
        lbl = tl.load(Lbl + rm_c) - label_offset
        local = lbl - pid_n.to(tl.int64) * BN
        hit = (local >= 0) & (local < BN) & (lbl < V) & row_ok
        # One 32-bit compare per element (a 64-bit one is two); -1 matches no column.
        local32 = tl.where(hit, local, -1).to(tl.int32)
        picked = tl.sum(tl.where(cols[None, :] == local32[:, None], z, 0.0), 1)
        tl.store(LabelLogit + rm, picked, mask=hit)


@triton.jit
def combine_kernel(PMax, PSum, PSez, PSz, PSe2, PArg, Max, Sum, Sez, Sz, Se2, Arg, M, NB,
                   NEED_EZ: tl.constexpr, NEED_SZ: tl.constexpr, NEED_SE2: tl.constexpr, NEED_ARG: tl.constexpr,
                   BR: tl.constexpr, BB: tl.constexpr):
    """Merge the ``[NB, M]`` per-block partial statistics into per-token ones (blocks in order)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BR + tl.arange(0, BR)
    ok = rows < M
    bb = tl.arange(0, BB)
    m = tl.full((BR,), float("-inf"), tl.float32)
    s = tl.zeros((BR,), tl.float32)
    sez = tl.zeros((BR,), tl.float32)
    sz = tl.zeros((BR,), tl.float32)
    se2 = tl.zeros((BR,), tl.float32)
    arg = tl.zeros((BR,), tl.int32)
    for b0 in range(0, NB, BB):
        blk = b0 + bb
        msk = (blk < NB)[:, None] & ok[None, :]
        o = blk.to(tl.int64)[:, None] * M + rows[None, :]
        pm = tl.load(PMax + o, mask=msk, other=float("-inf"))
        cm = tl.max(pm, 0)
        new_m = tl.maximum(m, cm)
        c = tl.where(pm > float("-inf"), tl.exp(pm - new_m[None, :]), 0.0)  # 0, not NaN, while all is -inf
        a = tl.where(m > float("-inf"), tl.exp(m - new_m), 0.0)
        ps = tl.load(PSum + o, mask=msk, other=0.0)
        if NEED_EZ:  # each sum re-based from its own max to new_m (0 where nothing was summed)
            pez = tl.load(PSez + o, mask=msk, other=0.0)
            blocks = tl.where(c > 0, (pez + (pm - new_m[None, :]) * ps) * c, 0.0)
            sez = tl.where(a > 0, (sez + (m - new_m) * s) * a, 0.0) + tl.sum(blocks, 0)
        s = s * a + tl.sum(ps * c, 0)
        if NEED_SZ:
            sz += tl.sum(tl.load(PSz + o, mask=msk, other=0.0), 0)
        if NEED_SE2:
            se2 = se2 * a * a + tl.sum(tl.load(PSe2 + o, mask=msk, other=0.0) * c * c, 0)
        if NEED_ARG:
            cand = tl.where(pm == cm[None, :], blk[:, None], NB + BB)
            first = tl.min(cand, 0)
            pa = tl.load(PArg + o, mask=msk, other=0)
            chunk_arg = tl.sum(tl.where(blk[:, None] == first[None, :], pa, 0), 0)
            arg = tl.where(cm > m, chunk_arg, arg)
        m = new_m
    tl.store(Max + rows, m, mask=ok)
    tl.store(Sum + rows, s, mask=ok)
    if NEED_EZ:
        tl.store(Sez + rows, sez, mask=ok)
    if NEED_SZ:
        tl.store(Sz + rows, sz, mask=ok)
    if NEED_SE2:
        tl.store(Se2 + rows, se2, mask=ok)
    if NEED_ARG:
        tl.store(Arg + rows, arg, mask=ok)


@triton.jit
def onehot_term(GLogp, rows, local, cols, HAS_LOGP: tl.constexpr):
    """The log-prob gradient's one-hot part of a tile's ``dL/dz``: ``g_logprob`` at each token's
    label column (``local``, relative to the tile's first column), 0 elsewhere."""
    if HAS_LOGP:
        return tl.where(cols[None, :] == local[:, None], tl.load(GLogp + rows)[:, None], 0.0)
    else:
        return 0.0


@triton.jit
def _softcap_slope(g, z, t_over_c, SOFTCAP: tl.constexpr):
    """``g * dz/da / dz_factor``: ``g * (1 - tanh^2)`` under a soft-cap, else ``g``."""
    if SOFTCAP:
        t = z * t_over_c
        return g * (1.0 - t * t)
    else:
        return g


@triton.jit
def grad_a(z, rows, onehot, Lse, Ez, Coef, GEnt, GMean, dz_factor, t_over_c,
           SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ONEHOT: tl.constexpr):
    """``dL/da`` (fp32) of a tile from its logits ``z``: ``rows`` are the tile's token indices,
    ``onehot`` the one-hot part of ``dL/dz`` (`onehot_term`; not added without ``HAS_ONEHOT``).
    ``dz_factor`` scales the per-token terms, not the tile: one multiply per row, not per element."""
    p = _exp(z - tl.load(Lse + rows)[:, None])
    coef = tl.load(Coef + rows) * dz_factor
    if HAS_ENT:
        ez = tl.load(Ez + rows)
        gent = tl.load(GEnt + rows) * dz_factor
        g = tl.where(p > 0, p * (coef[:, None] - gent[:, None] * (z - ez[:, None])), 0.0)  # z = -inf: 0
    else:
        g = p * coef[:, None]
    if HAS_MEAN:
        g += (tl.load(GMean + rows) * dz_factor)[:, None]
    if HAS_ONEHOT:
        g += onehot * dz_factor
    return _softcap_slope(g, z, t_over_c, SOFTCAP)


@triton.jit
def bwd_kernel(H, W, HD, WD, DAD, Bias, Lse, Ez, Coef, GEnt, GMean, DA, GBias,
               M, Vc, D, stride_h, stride_w, stride_da, num_programs,
               scale, softcap, inv_temp, dz_factor, t_over_c,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SCALED: tl.constexpr, HAS_ENT: tl.constexpr,
               HAS_MEAN: tl.constexpr, NEED_GB: tl.constexpr,
               EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, FLATTEN: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """``dL/da`` for one vocabulary chunk ``[M, Vc]`` (W, Bias, DA, GBias point at the chunk),
    without the log-prob gradient's one-hot part: `label_entry_kernel` then takes the label entries
    out (a per-element label test and its row sums cost this epilogue ~10%)."""
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(Vc, BN)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n, rm, row_ok, rm_c, rn, col_ok, z = _z_tile(
            tile, H, W, HD, WD, Bias, M, Vc, D, stride_h, stride_w, scale, softcap, inv_temp,
            HAS_BIAS, SOFTCAP, SCALED, EVEN_K, DOT_PREC, USE_TMA, BM, BN, BK, GROUP_M)
        g = grad_a(z, rm_c, 0.0, Lse, Ez, Coef, GEnt, GMean, dz_factor, t_over_c, SOFTCAP, HAS_ENT, HAS_MEAN, False)
        g_op = g.to(DA.dtype.element_ty)
        if USE_TMA:  # two half-width stores: half the staging buffer in shared memory
            halves = tl.split(tl.permute(tl.reshape(g_op, (BM, 2, BN // 2)), (0, 2, 1)))
            DAD.store([pid_m * BM, pid_n * BN], halves[0])
            DAD.store([pid_m * BM, pid_n * BN + BN // 2], halves[1])
        else:
            tl.store(DA + (rm * stride_da)[:, None] + rn[None, :], g_op, mask=row_ok[:, None] & col_ok[None, :])
        if NEED_GB:
            gs = tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0), 0)
            tl.atomic_add(GBias + rn, gs, mask=col_ok)


@triton.jit
def label_entry_kernel(Lbl, LabelZ, Lse, Ez, Coef, GEnt, GMean, GLogp, DA, GBias, Entry,
                       M, Vc, stride_da, label_offset, dz_factor, t_over_c,
                       SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_MEAN: tl.constexpr,
                       NEED_GB: tl.constexpr, BR: tl.constexpr):
    """Each token's label entry of ``dL/da`` in one vocabulary chunk, from the forward's label logit
    ``LabelZ``: kept in fp32 in ``Entry`` and zeroed in ``DA`` (where `bwd_kernel` left the entry
    without ``g_logprob``); with ``NEED_GB`` its one-hot part is added to the bias gradient.
    """
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    ok = rows < M
    rows_c = tl.where(ok, rows, 0)
    local = tl.load(Lbl + rows_c) - label_offset
    hit = ok & (local >= 0) & (local < Vc)
    z = tl.load(LabelZ + rows_c)[:, None]
    glogp = tl.load(GLogp + rows_c)[:, None]
    g = tl.sum(grad_a(z, rows_c, glogp, Lse, Ez, Coef, GEnt, GMean, dz_factor, t_over_c,
                       SOFTCAP, HAS_ENT, HAS_MEAN, True), 1)
    tl.store(DA + rows_c * stride_da + tl.where(hit, local, 0), tl.zeros_like(g).to(DA.dtype.element_ty), mask=hit)
    tl.store(Entry + rows_c, g, mask=hit)
    if NEED_GB:
        onehot = tl.sum(_softcap_slope(glogp * dz_factor, z, t_over_c, SOFTCAP), 1)
        tl.atomic_add(GBias + tl.where(hit, local, 0), onehot, mask=hit)


@triton.jit
def label_rows_kernel(Acc, LblCoef, W, Lbl, M, D, V, stride_w, label_offset,
                      BR: tl.constexpr, BD: tl.constexpr):
    """``Acc[t] += LblCoef[t] * W[label_t - label_offset]`` in place, for ``[BR, BD]`` of the fp32
    ``[M, D]`` accumulator, without a gathered ``[M, D]`` copy of weight rows (tokens whose label is
    not among this shard's ``V`` rows skipped)."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = rows < M
    rows_c = tl.where(ok, rows, 0)
    local = tl.load(Lbl + rows_c) - label_offset
    hit = ok & (local >= 0) & (local < V)
    coef = tl.load(LblCoef + rows_c, mask=hit, other=0.0)
    tile = rows_c[:, None] * D + cols[None, :]
    tile_ok = hit[:, None] & (cols < D)[None, :]
    acc = tl.load(Acc + tile, mask=tile_ok, other=0.0)
    w = tl.load(W + tl.where(hit, local, 0)[:, None] * stride_w + cols[None, :], mask=tile_ok, other=0.0)
    tl.store(Acc + tile, acc + coef[:, None] * w.to(tl.float32), mask=tile_ok)


@triton.jit
def _add_within_runs(sum_a, start_a, sum_b, start_b):
    """Combine step of a scan that sums within runs: a run restarts where its start flag is set."""
    return tl.where(start_b, sum_b, sum_a + sum_b), start_a | start_b


@triton.jit
def _pick(x, at):
    """Element ``at`` of the 1-D tensor ``x``, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, x.shape[0]) == at, x, 0), 0)


@triton.jit
def label_weight_rows_kernel(GW, H, Entry, SortedLbl, Order, M, V, D, stride_gw, stride_h, label_offset,
                             BT: tl.constexpr, BD: tl.constexpr, TAIL: tl.constexpr):
    """``GW[r] += sum over the tokens t labelled r of Entry[t] * H[t]``, the sum and the addition in
    fp32, rounded once with the row (whose GEMM part was rounded before, but holds only the other
    tokens' small probability terms). ``SortedLbl`` ``[M]``: the labels sorted (global ids; this
    shard's ``V`` rows from ``label_offset``), ``Order`` their tokens.

    A program takes ``BT`` sorted positions and ``BD`` columns. A scan sums ``Entry * H`` within each
    run of one label; a run belongs to the program where it starts, which writes its row once: a
    run that goes on past the block is summed on to its end (found by a binary search), ``TAIL``
    tokens a step (a frequent label costs its program ``count / TAIL`` steps). Fixed summation
    order: deterministic, unlike atomics.
    """
    pos = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    d_ok = cols < D
    ok = pos < M
    label = tl.load(SortedLbl + pos, mask=ok, other=-1)
    starts = ok & (label != tl.load(SortedLbl + pos - 1, mask=ok & (pos > 0), other=-1))
    ends = ok & (label != tl.load(SortedLbl + pos + 1, mask=pos + 1 < M, other=-1))
    local = label.to(tl.int64) - label_offset  # 64-bit row offsets even for int32 labels
    mine = ok & (local >= 0) & (local < V)
    tok = tl.load(Order + pos, mask=mine, other=0)
    e = tl.load(Entry + tok, mask=mine, other=0.0)
    h = tl.load(H + tok[:, None] * stride_h + cols[None, :], mask=mine[:, None] & d_ok[None, :], other=0.0)
    restart = tl.broadcast_to(starts[:, None], (BT, BD))  # before the first start: a run owned elsewhere
    run_sum, _ = tl.associative_scan((e[:, None] * h.to(tl.float32), restart), 0, _add_within_runs)
    # The run still open at the block's last position, if it is this program's and this shard's
    last = tl.minimum(M - 1 - tl.program_id(0).to(tl.int64) * BT, BT - 1)
    open_label = _pick(label, last)
    owned = tl.cumsum(starts.to(tl.int32), 0) > 0  # inside a run that starts in this block
    go = (_pick((owned & mine & ~ends).to(tl.int32), last) > 0)
    # The open run's end: the first position past the block with a larger label (a binary search)
    lo = tl.program_id(0).to(tl.int64) * BT + BT
    hi = tl.where(go, M, lo)
    tail_start = lo
    while lo < hi:
        mid = (lo + hi) // 2
        past = tl.load(SortedLbl + mid) > open_label
        hi = tl.where(past, mid, hi)
        lo = tl.where(past, lo, mid + 1)
    tail = tl.zeros((BD,), dtype=tl.float32)
    for q in range(tail_start, lo, TAIL):
        p2 = q + tl.arange(0, TAIL)
        same = p2 < lo
        tok2 = tl.load(Order + p2, mask=same, other=0)
        h2 = tl.load(H + tok2[:, None] * stride_h + cols[None, :], mask=same[:, None] & d_ok[None, :], other=0.0)
        tail += tl.sum(tl.load(Entry + tok2, mask=same, other=0.0)[:, None] * h2.to(tl.float32), 0)
    is_last = tl.arange(0, BT) == last
    total = tl.where((is_last & ~ends)[:, None], run_sum + tail[None, :], run_sum)
    write = owned & mine & (ends | is_last)
    tile = GW + (tl.where(write, local, 0) * stride_gw)[:, None] + cols[None, :]
    tile_ok = write[:, None] & d_ok[None, :]
    tl.store(tile, (tl.load(tile, mask=tile_ok, other=0.0).to(tl.float32) + total).to(GW.dtype.element_ty), mask=tile_ok)
