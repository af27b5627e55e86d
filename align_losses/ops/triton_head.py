"""Triton head op (the ``"triton"`` backend): fused logits GEMM + online softmax statistics.

Forward: one Triton GEMM over ``[tokens, vocab]`` tiles (grouped tile order, fp32 accumulation;
for 16-bit operands one program per SM walks the tiles so that the next tile's loads overlap this
tile's epilogue) whose epilogue applies bias and logit transform and reduces each tile row to
partial statistics (max, sum exp, and what the requested outputs need); no logits reach memory.
A second small Triton kernel merges the ``[vocab blocks, M]`` partials per token. For a
vocabulary-parallel head the per-rank statistics are merged with `align_losses.ops.stats.Stats.all_reduce`.

Backward, per vocabulary chunk of ``Vc`` columns (``Vc`` from a memory budget): a Triton GEMM
recomputes the logits tile and writes ``dL/da`` (operand dtype) for the chunk over all tokens into
an ``[M, Vc]`` buffer, and a small kernel takes the label entries out of it, kept in fp32 (with
their one-hot term, from the forward's label logits); then two cuBLAS GEMMs: ``grad_hidden += dA @
W_chunk`` into an fp32 ``[M, D]`` accumulator and ``grad_weight[chunk] = dA^T @ hidden`` written
once. After the chunks, the label entries are added unrounded: ``entry[t] * W[label_t]`` to the
fp32 accumulator (`add_label_rows`), ``entry[t] * hidden[t]`` to the weight gradient's labelled
rows (`add_label_weight_rows`; both in `align_losses.ops.triton_shared`). In a GEMM operand a
label entry would be rounded to bf16, and a sequence loss gives all tokens of a sequence the same log-prob gradient, so that rounding is one
relative error (up to 2^-8) for all of them, which no sum averages out (at the head benchmark's
long shape, larger than the output's own rounding: benchmarks/NOTES-triton.md). The first, widest chunks borrow their buffer from the weight gradient's rows that later chunks write
(`chunk_plan`). The bias gradient is summed in the Triton epilogues (fp32 atomics).

All index arithmetic on rows is 64-bit, so ``M x V`` and ``M x D`` past 2^31 elements work. The
kernels are in `align_losses.ops.triton_kernels`; this module holds their launches, the chunking
and the autograd function; what it shares with the filtering backward (`align_losses.ops.triton_filter`)
is in `align_losses.ops.triton_shared`, and the per-token statistics in `align_losses.ops.stats`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..problem import DIFFERENTIABLE_OUTPUTS, OUTPUTS, HeadProblem, LogitTransform, VocabShard
from .gemm import mm_into
from . import triton_filter  # the module, so that its functions are looked up at each call (tests spy on them)
from .stats import Stats, finish_outputs
from .triton_kernels import bwd_kernel, combine_kernel, fwd_kernel, interpreting, label_entry_kernel
from .triton_shared import (EXTRA_BUFFER_BYTES, Upstream, add_label_weight_rows, dot_prec, hidden_grad, transform_args,
                            transform_flags)


@functools.lru_cache(maxsize=None)
def _device_properties(device_index: int):
    """A CUDA device's properties, read once (each query costs the host time, and a call makes several)."""
    return torch.cuda.get_device_properties(device_index)


def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one GEMM kernel."""

    BM: int = 128
    BN: int = 256
    BK: int = 64
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    #: One program per SM walking the tiles, the tile loop flattened with the K loop so the next
    #: tile's loads are issued during this tile's epilogue; otherwise one program per tile.
    persistent: bool = False

    def launch(self) -> dict:
        return dict(BM=self.BM, BN=self.BN, BK=self.BK, GROUP_M=self.GROUP_M, FLATTEN=self.persistent,
                    num_warps=self.num_warps, num_stages=self.num_stages)

    def programs(self, tiles: int, device: torch.device) -> int:
        """Programs to launch for ``tiles`` tiles: one per SM when persistent (4 off CUDA, for the interpreter)."""
        if not self.persistent:
            return tiles
        slots = _sm_count(device.index) if device.type == "cuda" else 4
        return max(1, min(tiles, slots))


#: Defaults per operand dtype (Hopper); fp32 uses IEEE dots (exact mode) and smaller tiles.
#: The 16-bit config is the fastest of those timed on Hopper with TMA operands (128x128 / 128x256,
#: 3 / 4 stages, persistent or not, warp-specialised or not; the timings are in
#: benchmarks/NOTES-triton.md).
FWD_CONFIGS = {
    torch.bfloat16: KernelConfig(128, 256, 64, 16, 8, 3, persistent=True),
    torch.float16: KernelConfig(128, 256, 64, 16, 8, 3, persistent=True),
    torch.float32: KernelConfig(64, 128, 32, 8, 4, 3),
}
BWD_CONFIGS = dict(FWD_CONFIGS)

# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


#: Use tensor-memory-accelerator (TMA) descriptors for the GEMM operands on Hopper and later
#: when the layout allows it (16-bit operands, 16-byte aligned rows).
USE_TMA = True


def _tma_ok(*tensors) -> bool:
    interp = interpreting()
    if not USE_TMA or (interp and os.environ.get("ALIGN_LOSSES_TMA_INTERP") != "1"):
        return False
    t0 = tensors[0]
    if not interp and (not t0.is_cuda or _device_properties(t0.device.index).major < 9):
        return False
    return all(
        t.dtype in (torch.bfloat16, torch.float16) and t.stride(-1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in tensors
    )


def _desc(t: torch.Tensor, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def _descs(hidden, weight, cfg: "KernelConfig"):
    return _desc(hidden, [cfg.BM, cfg.BK]), _desc(weight, [cfg.BN, cfg.BK])


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


#: Tokens and vocabulary blocks per step of a `combine_kernel` program: 64 blocks a step, not 16
#: (fewer steps, a faster merge; timed in benchmarks/NOTES-triton.md).
_COMBINE_TILE = (32, 64)


def _forward_stats(hidden, weight, bias, labels, transform: LogitTransform, outputs: frozenset,
                   shard: Optional[VocabShard], cfg: KernelConfig, keep_partials: bool = False):
    """Per-token statistics; with ``keep_partials`` also the per-block ``(max, sum exp)`` partials
    (fp32 ``[V / BN, M]`` each, None when there are no tokens or no vocabulary), else None."""
    m, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    offset = shard.start if shard is not None else 0
    need_ez = "entropy" in outputs
    need_sz = "mean_logit" in outputs
    need_se2 = "log_sum_p2" in outputs
    need_arg = "argmax_hit" in outputs
    f32 = dict(dtype=torch.float32, device=dev)
    nb = triton.cdiv(v, cfg.BN) if v > 0 else 0
    if m == 0 or nb == 0:
        stats = Stats.empty(m, dev, outputs)
        if stats.argmax is not None:
            stats.argmax.fill_(offset)
        return stats, None
    pmax = torch.empty((nb, m), **f32)
    psum = torch.empty((nb, m), **f32)
    psez = torch.empty((nb, m), **f32) if need_ez else pmax
    psz = torch.empty((nb, m), **f32) if need_sz else pmax
    pse2 = torch.empty((nb, m), **f32) if need_se2 else pmax
    parg = torch.empty((nb, m), dtype=torch.int32, device=dev) if need_arg else pmax
    # Every label is in one tile of an unsharded vocabulary, so each row is written; a shard's
    # tokens labelled elsewhere keep 0.
    label_logit = torch.zeros(m, **f32) if shard is not None else torch.empty(m, **f32)
    programs = cfg.programs(triton.cdiv(m, cfg.BM) * nb, dev)
    use_tma = _tma_ok(hidden, weight)
    hd, wd = _descs(hidden, weight, cfg) if use_tma else (None, None)
    fwd_kernel[(programs,)](
        hidden, weight, hd, wd, bias if bias is not None else hidden,
        labels, pmax, psum, psez, psz, pse2, parg, label_logit,
        m, v, d, hidden.stride(0), weight.stride(0), offset, programs, *transform_args(transform)[:3],
        HAS_BIAS=bias is not None, **transform_flags(transform),
        NEED_EZ=need_ez, NEED_SZ=need_sz, NEED_SE2=need_se2, NEED_ARG=need_arg,
        EVEN_K=(d % cfg.BK == 0), DOT_PREC=dot_prec(hidden.dtype), USE_TMA=use_tma, **cfg.launch(),
    )
    mx = torch.empty(m, **f32)
    se = torch.empty(m, **f32)
    sez = torch.empty(m, **f32) if need_ez else None
    sz = torch.empty(m, **f32) if need_sz else None
    se2 = torch.empty(m, **f32) if need_se2 else None
    arg = torch.empty(m, dtype=torch.int32, device=dev) if need_arg else None
    br, bb = _COMBINE_TILE
    combine_kernel[(triton.cdiv(m, br),)](
        pmax, psum, psez, psz, pse2, parg,
        mx, se, sez if need_ez else mx, sz if need_sz else mx, se2 if need_se2 else mx,
        arg if need_arg else mx, m, nb,
        NEED_EZ=need_ez, NEED_SZ=need_sz, NEED_SE2=need_se2, NEED_ARG=need_arg, BR=br, BB=bb, num_warps=4,
    )
    partials = (pmax, psum) if keep_partials else None
    del pmax, psum, psez, psz, pse2, parg
    stats = Stats(
        max=mx, sum_exp=se, label_logit=label_logit, sum_exp_z=sez, sum_z=sz, sum_exp2=se2,
        argmax=(arg.long() + offset) if need_arg else None,
    )
    return stats, partials


def _stats(problem_parts, cfg, keep_partials: bool = False):
    """`_forward_stats` merged across the vocabulary shards (the partials stay this rank's)."""
    hidden, weight, bias, labels, transform, outputs, shard = problem_parts
    stats, partials = _forward_stats(hidden, weight, bias, labels, transform, outputs, shard, cfg, keep_partials)
    if shard is not None:
        stats.all_reduce(shard.group)
    return stats, partials


#: Tokens per program of `label_entry_kernel` (one thread each).
_LABEL_ROWS = 1024

#: Elements of one output tile of cuBLAS's large bf16 GEMMs on Hopper (128 x 256 or 256 x 128).
_CUBLAS_TILE = 128 * 256


def _wave_efficiency(tiles: int, sms: int) -> float:
    """Fraction of the SMs' time a GEMM of ``tiles`` equal tiles keeps busy (full waves only)."""
    return tiles / (-(-tiles // sms) * sms)


def vocab_chunk(m: int, d: int, v: int, elem: int, block: int, memory_budget: Optional[int],
                sms: Optional[int] = None, held: int = 0) -> int:
    """Columns of the backward's ``[M, Vc]`` ``dL/da`` buffer: a multiple of ``block``, at most ``V``.

    Without a ``memory_budget``, and given the GPU's ``sms``, the width within 10% of the default
    budget's whose ``[Vc, D]`` weight-gradient GEMM fills the SMs' last wave best (the widest of
    those within 1% of the best). Narrower chunks fill waves better but cost a pass over the fp32
    ``[M, D]`` accumulator each, so the search stays within 10% of the widest width; trimming to a
    full last wave paid off where the wave was far from full, and narrowing further to one full
    wave did not (benchmarks/NOTES-triton.md has the timings).
    """
    budget = memory_budget if memory_budget else m * d * elem + EXTRA_BUFFER_BYTES - held
    widest = max(block, (budget // max(m * elem, 1)) // block * block)
    if memory_budget or not sms or widest >= v:
        return max(1, min(widest, v))
    return _wave_filling_width(widest, d, block, sms)


def _wave_filling_width(widest: int, d: int, block: int, sms: int) -> int:
    """Of the widths within 10% under ``widest`` (multiples of ``block``), the widest whose ``[Vc, D]``
    weight-gradient GEMM fills the SMs' last wave within 1% of the best."""
    widths = range(max(block, -(-widest * 9 // 10) // block * block), widest + 1, block)
    eff = {w: _wave_efficiency(-(-w * d // _CUBLAS_TILE), sms) for w in widths}
    best = max(eff.values())
    return max(w for w in widths if eff[w] >= best - 0.01)


#: Let the first backward chunks' ``dL/da`` live in the weight gradient's rows that later chunks
#: write (tests switch it off to compare).
USE_WEIGHT_GRAD_SCRATCH = True

#: Elements a scratch chunk's start is rounded up to (128 bytes in 16-bit: aligned for TMA and cuBLAS).
_SCRATCH_ALIGN = 64


@dataclass(frozen=True)
class Chunk:
    """Columns ``[start, start + width)`` of one backward chunk; ``in_scratch``: its ``dL/da`` lives
    in the weight gradient's rows after it (see `chunk_plan`), else in the chunk buffer."""

    start: int
    width: int
    in_scratch: bool


def scratch_columns(m: int, d: int, rest: int, block: int) -> int:
    """Widest chunk (a multiple of ``block``, possibly 0) of the ``rest`` columns still to do whose
    ``[M, Vc]`` ``dL/da`` fits, aligned, in the ``(rest - Vc) x D`` weight-gradient rows after it."""
    return max(0, (rest * d - _SCRATCH_ALIGN + 1) // (m + d)) // block * block


def chunk_plan(m: int, d: int, v: int, buffer_width: int, block: int, sms: Optional[int] = None,
               scratch: bool = True) -> list:
    """The backward's `Chunk`s over ``[0, V)``, in order.

    With ``scratch``, a chunk goes into the weight gradient's not yet written rows while they hold
    more columns than the buffer (``buffer_width``): at the Qwen3-1.7B shape (6144 tokens, D 2048)
    the first such chunk is a quarter of the vocabulary, and 10 chunks replace 18. Given ``sms``,
    each such width is trimmed (by up to 10%) to fill the SMs' last wave, as `vocab_chunk` does.
    """
    chunks, start = [], 0
    while start < v:
        wide = scratch_columns(m, d, v - start, block) if scratch else 0
        if wide > buffer_width and sms:
            wide = _wave_filling_width(wide, d, block, sms)
        in_scratch = wide > buffer_width
        width = wide if in_scratch else min(buffer_width, v - start)
        chunks.append(Chunk(start, width, in_scratch))
        start += width
    return chunks


def _buffer_row_stride(width: int, buffer_width: int) -> int:
    """Row stride of a buffer chunk ``width`` columns wide: a multiple of 64 elements (aligned rows
    for TMA and cuBLAS's fast kernels) within the buffer's ``buffer_width``."""
    return min(buffer_width, -(-width // 64) * 64)


def _scratch_rows(grad_weight: torch.Tensor, row: int, m: int, ld: int) -> torch.Tensor:
    """An ``[m, ld]`` view of contiguous ``grad_weight`` storage from row ``row`` on (aligned start)."""
    start = -(-row * grad_weight.shape[1] // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    return grad_weight.view(-1)[start : start + m * ld].view(m, ld)


def backward_grads(hidden, weight, bias, labels, label_logit, lse, expected_z, up: dict, transform: LogitTransform,
              shard: Optional[VocabShard], vocab: int, cfg: KernelConfig, memory_budget, need, held: int = 0):
    """The dense backward; ``label_logit``: the forward's fp32 ``[M]`` label logits; ``held``:
    bytes kept beside it (a filter's mask) that the default chunk buffer gives back."""
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    m, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    offset = shard.start if shard is not None else 0
    grad_hidden = None
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias32 = torch.zeros(v, **f32) if need_b else None
    acc = entry = None
    if need_h and (v == 0 or m == 0):
        acc = torch.zeros(m, d, **f32)
    if m > 0 and v > 0 and (need_h or need_w or need_b):
        u = Upstream.of(up, m, expected_z, vocab, dev)
        sms = _sm_count(dev.index) if dev.type == "cuda" else None
        vc = vocab_chunk(m, d, v, hidden.element_size(), cfg.BN, memory_budget, sms, held)
        scratch = (need_w and USE_WEIGHT_GRAD_SCRATCH and grad_weight.is_contiguous()
                   and grad_weight.dtype == hidden.dtype)
        plan = chunk_plan(m, d, v, vc, cfg.BN, None if memory_budget else sms, scratch)
        buf_ld = max((_buffer_row_stride(c.width, vc) for c in plan if not c.in_scratch), default=0)
        buf = None  # allocated at the first chunk that needs it
        # Each token's label entry, fp32, 0 where the label is in another shard (see `label_entry_kernel`).
        entry = torch.zeros(m, **f32) if u.has_logprob else None
        targs = transform_args(transform)
        first = True
        for chunk in plan:
            v0, cv = chunk.start, chunk.width
            if chunk.in_scratch:
                da = _scratch_rows(grad_weight, v0 + cv, m, cv)
            else:
                if buf is None:
                    buf = torch.empty(m * buf_ld, dtype=hidden.dtype, device=dev)
                ld = _buffer_row_stride(cv, vc)
                da = buf[: m * ld].view(m, ld)[:, :cv]
            w = weight[v0 : v0 + cv]
            programs = cfg.programs(triton.cdiv(m, cfg.BM) * triton.cdiv(cv, cfg.BN), dev)
            use_tma = _tma_ok(hidden, w, da)
            hd, wd = _descs(hidden, w, cfg) if use_tma else (None, None)
            dad = _desc(da, [cfg.BM, cfg.BN // 2]) if use_tma else None
            gbias = grad_bias32[v0 : v0 + cv] if need_b else lse
            bwd_kernel[(programs,)](
                hidden, w, hd, wd, dad, bias[v0 : v0 + cv] if bias is not None else hidden, lse,
                *u.kernel_args(), da, gbias, m, cv, d, hidden.stride(0), weight.stride(0), da.stride(0), programs,
                *targs, HAS_BIAS=bias is not None, **transform_flags(transform), **u.kernel_flags(),
                NEED_GB=need_b, EVEN_K=(d % cfg.BK == 0), DOT_PREC=dot_prec(hidden.dtype), USE_TMA=use_tma,
                **cfg.launch(),
            )
            if u.has_logprob:
                label_entry_kernel[(triton.cdiv(m, _LABEL_ROWS),)](
                    labels, label_logit, lse, *u.kernel_args(), u.g_logprob, da, gbias,
                    entry, m, cv, da.stride(0), offset + v0, *targs[3:],
                    SOFTCAP=transform.softcap is not None, **u.kernel_flags(), NEED_GB=need_b,
                    BR=_LABEL_ROWS, num_warps=4,
                )
            if need_h:
                if acc is None:
                    acc = torch.empty(m, d, **f32)
                mm_into(acc, da, w, first)
                first = False
            if need_w:
                torch.mm(da.t(), hidden, out=grad_weight[v0 : v0 + cv])
        # Free the chunk buffer before the hidden-state gradient is cast: the views and the TMA
        # descriptors (which hold their tensor) all keep it alive.
        del buf, da, dad, hd, wd, w
        if need_w and entry is not None:
            add_label_weight_rows(grad_weight, entry, hidden, labels, offset)
    if need_h:
        grad_hidden = hidden_grad(acc, entry, weight, labels, shard, hidden.dtype)
        del acc
    if need_w and m == 0:
        grad_weight.zero_()
    grad_bias = grad_bias32.to(bias.dtype) if need_b else None
    return grad_hidden, grad_weight, grad_bias


def forward_outputs(hidden, weight, bias, labels, transform: LogitTransform, outputs: frozenset,
                    shard: Optional[VocabShard], cfg: KernelConfig, keep_partials: bool = False):
    """The forward of `TritonHeadFunction` and of the registered op (`align_losses.ops.library`):
    ``({output name: fp32 [M]}, logsumexp [M], E_p[z] [M] or None, label logit [M], partials or None)``,
    fp32; the middle three are what `backward_grads` needs, the partials what the filtering backward needs."""
    stats, partials = _stats((hidden, weight, bias, labels, transform, outputs, shard), cfg, keep_partials)
    vocab = shard.size if shard is not None else weight.shape[0]
    result = finish_outputs(stats, outputs, vocab, labels)
    lse = stats.max + torch.log(stats.sum_exp)
    return result, lse, stats.expected_z(), stats.label_logit, partials


class TritonHeadFunction(torch.autograd.Function):
    """Autograd function behind the ``"triton"`` backend (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, outputs, shard, names, cfgs, memory_budget,
                filter_mass):
        fwd_cfg, bwd_cfg = cfgs
        ctx.set_materialize_grads(False)  # an output without a gradient needs no epilogue term
        result, lse, expected_z, label_logit, partials = forward_outputs(
            hidden, weight, bias, labels, transform, outputs, shard, fwd_cfg, keep_partials=filter_mass is not None)
        vocab = shard.size if shard is not None else weight.shape[0]
        keep = None
        if partials is not None:
            ranks = 1
            if shard is not None:  # each rank drops its share, so the token's total stays within its budget
                import torch.distributed as dist

                ranks = dist.get_world_size(shard.group)
            budget = triton_filter.drop_budget(filter_mass, label_logit, lse, ranks)
            keep = triton_filter.kept_blocks(*partials, lse, labels, shard.start if shard is not None else 0,
                                             weight.shape[0], fwd_cfg.BN, budget)
            del partials
        ctx.save_for_backward(hidden, weight, bias, labels, label_logit, lse, expected_z, keep)
        ctx.meta = (transform, shard, vocab, bwd_cfg, memory_budget, fwd_cfg.BN)
        ctx.names = names
        outs = tuple(result[n] for n in names)
        ctx.mark_non_differentiable(*[o for n, o in zip(names, outs) if n not in DIFFERENTIABLE_OUTPUTS])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, labels, label_logit, lse, expected_z, keep = ctx.saved_tensors
        transform, shard, vocab, bwd_cfg, memory_budget, block = ctx.meta
        upstream = {n: g for n, g in zip(ctx.names, grads) if g is not None and n in DIFFERENTIABLE_OUTPUTS}
        need = ctx.needs_input_grad[:3]
        result = None
        if keep is not None:
            result = triton_filter.filtered_backward(hidden, weight, bias, labels, lse, keep, upstream, transform,
                                                     shard, block, memory_budget, need)
        if result is None:  # not filtering, or too few pairs to skip: the dense backward
            result = backward_grads(hidden, weight, bias, labels, label_logit, lse, expected_z, upstream, transform,
                                    shard, vocab, bwd_cfg, memory_budget, need,
                                    held=keep.numel() if keep is not None else 0)
        return (*result, None, None, None, None, None, None, None, None)


def triton_head(problem: HeadProblem, memory_budget: Optional[int] = None,
                fwd_config: Optional[KernelConfig] = None, bwd_config: Optional[KernelConfig] = None,
                filter_mass: Optional[float] = None) -> dict:
    """Run the op on a normalised problem; returns ``{output name: fp32 [M]}``.

    ``filter_mass`` (a probability in (0, 1), default None: exact) turns on the filtering backward
    of `align_losses.ops.triton_filter`.
    """
    hidden = _rowmajor(problem.hidden)
    weight = _rowmajor(problem.weight)
    bias = problem.bias.contiguous() if problem.bias is not None else None
    labels = problem.labels.contiguous()
    dtype = hidden.dtype
    fwd_cfg = fwd_config or FWD_CONFIGS[dtype]
    bwd_cfg = bwd_config or BWD_CONFIGS[dtype]
    inputs = (hidden, weight, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        stats, _ = _stats((hidden, weight, bias, labels, problem.transform, problem.outputs, problem.shard), fwd_cfg)
        return finish_outputs(stats, problem.outputs, problem.vocab_size, labels)
    names = tuple(n for n in OUTPUTS if n in problem.outputs)
    outs = TritonHeadFunction.apply(hidden, weight, bias, labels, problem.transform, problem.outputs,
                                    problem.shard, names, (fwd_cfg, bwd_cfg), memory_budget, filter_mass)
    return dict(zip(names, outs))
