"""Pure-PyTorch head op: per-token log-probs and statistics without ever holding ``[M, V]``.

The forward walks the vocabulary in blocks (outer loop) and the tokens in blocks (inner loop),
keeps per-token running statistics in fp32 (an online logsumexp) and saves only those. The
backward recomputes each ``[tokens, vocab]`` tile, turns it into the gradient of the logits for the
upstream gradients it received, and multiplies it out: the hidden-state gradient is accumulated in
an fp32 ``[M, D]`` buffer, and each vocabulary block's weight gradient is accumulated over token
blocks in an fp32 ``[V_block, D]`` buffer and written once, so no fp32 ``[V, D]`` buffer exists (with all
tokens in one block, the block's one GEMM writes its rows in place: `align_losses.ops.weight_rows`).
Each token's label entry of the logit gradient stays out of the GEMM operands and is added in fp32
afterwards (`add_label_entries`). On CUDA the backward waits for the GPU once, for the labels' block bounds
(`align_losses.ops.weight_rows.LabelledRows`).

Here are the GEMMs and the accumulators; what happens to a tile between its GEMMs is in
`align_losses.ops.tiles`: pure functions of the raw fp32 tile (bias and logit transform applied inside),
`fold_tile` in the forward and `tile_grad` in the backward (``dL/da`` as a GEMM operand, the label entries
and the bias gradient's column sums). They run eagerly, or compiled into a few fused kernels by
`torch.compile` (the default on CUDA/XPU with Triton; the backend option ``compile_tiles``), so that a tile
goes through memory a few times instead of once per elementwise step.

Tiles hold at most ``memory_budget`` bytes of fp32 temporaries; within that, `Tiling.plan` picks each walk's
token and vocabulary blocks for the fewest bytes moved (`_traffic`). Logits are never rounded to the
input dtype: GEMMs on CUDA take bf16/fp16 operands with fp32 outputs, elsewhere they run in fp32.
For a vocabulary-parallel head each rank walks its own shard; the per-token statistics are merged
across ranks with one max and one sum all-reduce, the hidden-state gradient with one sum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ..problem import DIFFERENTIABLE_OUTPUTS, OUTPUTS, HeadProblem, LogitTransform
from . import gemm, weight_rows
from .stats import Stats, finish_outputs, rows_of
from .tiles import (Upstream, compiled_before, compiled_tiles, compiles, fold_tile, label_entries, row_scale, run_tile,
                    tile_grad)

#: The fields of `Upstream`, in its order: the differentiable outputs.
_UPSTREAM = Upstream._fields

# Bytes of fp32 temporaries per tile element: eagerly, logits, probabilities, their gradient, a cast copy. A
# compiled forward fold holds less (`_forward_bytes`).
_BYTES_PER_TILE_ELEMENT = 16
_ALIGN = 64
# What one more tile costs beside the bytes `_traffic` counts, as bytes of memory traffic: a tile is about six
# kernel launches (its GEMMs and fused kernels), some 30 us, in which an H100 moves ~100 MB. It keeps the plan
# from trading many small tiles for a few bytes.
_TILE_OVERHEAD_BYTES = 1 << 26
# The plan tries at most this many token-block counts (it stops earlier, once one vocabulary block holds all ids).
_MAX_TOKEN_SPLITS = 4096


class Blocks(NamedTuple):
    """One walk's block sizes: ``tokens x vocab`` elements per tile."""

    tokens: int
    vocab: int


@dataclass(frozen=True)
class Tiling:
    """Block sizes of the forward's and the backward's tile walks, whether the tiles' math runs compiled, and
    whether a failure to compile falls back to eager tiles (the option at its default; see
    `align_losses.ops.tiles.run_tile`). ``scaled_backward``: the backward's walk when its tiles are row-scaled (the
    losses' case, `align_losses.ops.tiles.row_scale`) and compiled, whose kernels hold less (`_backward_bytes`);
    None: ``backward``'s."""

    forward: Blocks
    backward: Blocks
    compiled: bool = False
    fallback: bool = False
    scaled_backward: Optional[Blocks] = None

    def backward_walk(self, row_scaled: bool) -> Blocks:
        """The backward's blocks, for tiles that are row-scaled (``row_scaled``) or not."""
        return self.scaled_backward if row_scaled and self.scaled_backward is not None else self.backward

    @staticmethod
    def plan(num_tokens: int, vocab: int, width: int, memory_budget: int, token_block: Optional[int] = None,
             compiled: bool = False, fallback: bool = False, operand_bytes: int = 2,
             forward_bytes: int = _BYTES_PER_TILE_ELEMENT, need: tuple = (True, True),
             scaled_backward_bytes: int = _BYTES_PER_TILE_ELEMENT, rows_in_place: str = "") -> "Tiling":
        """The walks that move the fewest bytes (`_traffic`) under ``memory_budget`` bytes of tile temporaries
        (`_BYTES_PER_TILE_ELEMENT` per element in the backward, ``scaled_backward_bytes`` in a backward of row-scaled
        tiles, ``forward_bytes`` in the forward), for ``num_tokens`` tokens of hidden size ``width``, ``vocab`` ids,
        GEMM operands of ``operand_bytes`` and the gradients ``need = (hidden states', weight's)``. ``token_block``
        fixes every walk's token blocks. ``rows_in_place``: how a walk of one token block writes the weight
        gradient's rows (`align_losses.ops.weight_rows.rows_in_place`, `_traffic`): ``""`` through an fp32 block,
        ``"fp32"`` in place, ``"redo"`` in place with the labelled rows made again.

        Long inputs are where this matters: with every token in one block, a small budget leaves narrow vocabulary
        blocks, and each of them reads and writes the whole fp32 hidden-state gradient (at 24576 tokens x 2048,
        151936 ids and 512 MiB: 114 blocks, 46 GB a backward); four token blocks cut that to 28 blocks, for
        four passes over the weight gradient's blocks instead of one.
        """
        num_tokens, vocab, width = max(num_tokens, 1), max(vocab, 1), max(width, 1)  # an empty shard or batch plans
        need_h, need_w = need
        forward = _cheapest(num_tokens, vocab, width, memory_budget // forward_bytes, token_block,
                            dict(hidden_reads=1, weight_reads=1, operand_bytes=operand_bytes))
        walk = dict(hidden_reads=1 + need_w, weight_reads=1 + need_h, operand_bytes=operand_bytes,
                    hidden_grad=need_h, weight_grad=need_w, rows_in_place=rows_in_place if need_w else "")
        backward = _cheapest(num_tokens, vocab, width, memory_budget // _BYTES_PER_TILE_ELEMENT, token_block, walk)
        scaled = None
        if scaled_backward_bytes != _BYTES_PER_TILE_ELEMENT:
            scaled = _cheapest(num_tokens, vocab, width, memory_budget // scaled_backward_bytes, token_block, walk)
        return Tiling(forward, backward, compiled, fallback, scaled)

    @staticmethod
    def for_option(hidden: torch.Tensor, vocab: int, memory_budget: int, token_block: Optional[int],
                   compile_tiles: Optional[bool], softcap: bool = False, need: tuple = (True, True),
                   sync_free: bool = False) -> "Tiling":
        """`plan` for ``hidden [M, D]`` (its size, dtype and device), with the backend option ``compile_tiles``
        (`align_losses.ops.tiles.COMPILE_TILES`) resolved: None compiles where
        `align_losses.ops.tiles.compiled_tiles` says so, falling back to eager tiles if compiling fails; True or
        False is followed as given. ``softcap``: whether the logits are soft-capped; ``sync_free``: whether the
        backward runs without waiting for the device (`backward_grads`)."""
        compiled, fallback = compiled_tiles(compile_tiles, hidden.device), compile_tiles is None
        upcasts = gemm.upcasts(hidden.dtype, hidden.device)
        # The wide forward tile only once the fold has compiled and while it runs compiled: a first compile that
        # fails (or a failure that sends it eager later) would otherwise run the eager fold on tiles sized for 4 B.
        fused = compiles(fold_tile, compiled, fallback) and compiled_before(fold_tile) and not upcasts
        # Likewise the backward's wide row-scaled tiles, once `tile_grad` has compiled.
        fused_grad = compiles(tile_grad, compiled, fallback) and compiled_before(tile_grad) and not upcasts
        return Tiling.plan(hidden.shape[0], vocab, hidden.shape[1], memory_budget, token_block, compiled, fallback,
                           operand_bytes=4 if upcasts else hidden.element_size(),
                           forward_bytes=_forward_bytes(fused, softcap), need=need,
                           scaled_backward_bytes=_backward_bytes(fused_grad, _grad_operand_bytes(hidden)),
                           rows_in_place=weight_rows.rows_in_place_kind(hidden, sync_free))


def _forward_bytes(fused: bool, softcap: bool) -> int:
    """Bytes of temporaries per forward tile element. ``fused``: the fold is compiled into kernels that read the
    raw fp32 tile and hold no tile of their own but the soft cap's (seen in Inductor's code), and the GEMM makes no
    fp32 copy of the weight block (which grows with the block; off CUDA it does), so the tile can be four times
    as wide as the backward's."""
    if not fused:
        return _BYTES_PER_TILE_ELEMENT
    return 8 if softcap else 4


def _backward_bytes(fused: bool, grad_operand_bytes: int) -> int:
    """Bytes of temporaries per element of a row-scaled backward tile. ``fused``: `tile_grad` is compiled into one
    elementwise kernel (seen in Inductor's code) that reads the raw fp32 tile and writes the GEMM operand
    ``exp(z - shift)`` of ``grad_operand_bytes``, holding nothing else; the raw tile is freed before the gradient
    GEMMs. Otherwise the plan takes `_BYTES_PER_TILE_ELEMENT`, as for tiles that are not row-scaled. (The eager
    row-scaled tile holds about as little on CUDA, where ``exp(out=)`` casts in its kernel; elsewhere it may make a
    temporary. So the wide walk is kept for compiled tiles, and a compile of `tile_grad` that fails after another of
    its graphs compiled, which would run the planned wide tiles eagerly, costs no memory on CUDA.)"""
    return 4 + grad_operand_bytes if fused else _BYTES_PER_TILE_ELEMENT


def _grad_operand_bytes(hidden: torch.Tensor) -> int:
    """Bytes of an element of the backward's GEMM operand ``dL/da`` for ``hidden``'s dtype and device (see
    `_backward_grads`): half precision where the GEMMs take it, else fp32."""
    return 2 if _rounds(hidden) else 4


def _rounds(hidden: torch.Tensor) -> bool:
    """Whether ``dL/da`` is rounded to ``hidden``'s dtype as a GEMM operand: bf16 anywhere (the CPU's bf16 GEMMs
    run on oneDNN's bf16 kernels: `gemm.cpu_bf16_kernels`), fp16 on CUDA (elsewhere fp16 is upcast to fp32)."""
    return hidden.dtype == torch.bfloat16 or (hidden.is_cuda and hidden.dtype != torch.float32)


def _traffic(num_tokens: int, vocab: int, width: int, blocks: Blocks, hidden_reads: int, weight_reads: int,
             operand_bytes: int, hidden_grad: bool = False, weight_grad: bool = False, rows_in_place: str = "",
             overhead: int = _TILE_OVERHEAD_BYTES) -> int:
    """The bytes a walk in ``blocks`` moves that depend on the blocks.

    - The GEMMs read the hidden states ``[M, D]`` once per vocabulary block and the weight ``[V, D]`` once per
      token block, ``hidden_reads`` and ``weight_reads`` times (the forward's one GEMM; the backward's recompute
      and its gradient GEMMs).
    - The fp32 hidden-state gradient is written by the first vocabulary block and read and written by each later
      one (``hidden_grad``).
    - A weight-gradient block ``[W, D]`` (``weight_grad``) likewise over the token blocks, in fp32, then read once
      more to be written into the gradient: ``8 x token blocks`` bytes per element. With one token block the rows
      may be written in place instead (``rows_in_place``, `align_losses.ops.weight_rows.rows_in_place_kind`):
      nothing more than the gradient's own write, which every walk makes, but where the labelled rows are made
      again (``"redo"``) their GEMM reads the GEMM operand of the hidden states once per vocabulary block, or the
      block takes the fp32 path where that read is the larger (as `align_losses.ops.weight_rows.redo_pays` decides,
      its flops left out).
    - Each tile adds ``overhead`` (`_TILE_OVERHEAD_BYTES`).

    Left out: the tiles' own bytes (``M x V`` elements, however blocked), the per-token statistics and the
    gradients' own writes.
    """
    token_blocks, vocab_blocks = -(-num_tokens // blocks.tokens), -(-vocab // blocks.vocab)
    per_width = (vocab_blocks * num_tokens * hidden_reads + token_blocks * vocab * weight_reads) * operand_bytes
    if hidden_grad:
        per_width += (8 * vocab_blocks - 4) * num_tokens
    if weight_grad and token_blocks == 1 and rows_in_place:
        if rows_in_place == "redo":  # a block whose redo would read more than its fp32 block moves takes that block
            per_width += min(vocab_blocks * num_tokens * operand_bytes, 8 * vocab)
    elif weight_grad:
        per_width += 8 * token_blocks * vocab
    return per_width * width + token_blocks * vocab_blocks * overhead


def _cheapest(num_tokens: int, vocab: int, width: int, elements: int, token_block: Optional[int],
              walk: dict) -> Blocks:
    """The blocks of at most ``elements`` elements with the least `_traffic` for ``walk`` (its keyword arguments);
    ``token_block``: the token block to use instead. Plans of plain ints are cached (a call plans once per walk,
    and a search can take thousands of steps); under a caller's compile, whose sizes may be symbolic, each time."""
    args = (num_tokens, vocab, width, max(elements, 1), token_block, tuple(sorted(walk.items())), _TILE_OVERHEAD_BYTES)
    if not torch.compiler.is_compiling() and all(type(x) is int or x is None for x in args[:5]):
        return _cheapest_cached(*args)
    return _cheapest_cached.__wrapped__(*args)  # traced by a caller's compile: no cache (Dynamo would warn)


def _widest(tokens: int, vocab: int, elements: int) -> Blocks:
    """``tokens`` per block and the widest aligned vocabulary block with tiles of at most ``elements`` (one id at
    least)."""
    return Blocks(tokens, _aligned(max(min(vocab, elements // tokens), 1), vocab))


@functools.lru_cache(maxsize=1024)
def _cheapest_cached(num_tokens: int, vocab: int, width: int, elements: int, token_block: Optional[int],
                     walk: tuple, overhead: int) -> Blocks:
    """`_cheapest`: the search. It tries token blocks no larger than ``elements`` (so that a tile of one column
    fits, where one token does), for 1, 2, ... more token blocks until one vocabulary block holds all ids; fewer
    token blocks on a tie."""
    if token_block is not None:
        return _widest(max(min(token_block, num_tokens), 1), vocab, elements)
    walk = dict(walk)
    best, best_cost, last = None, None, None
    first = -(-num_tokens // elements)  # the fewest token blocks whose tiles hold at least one column
    for splits in range(first, min(num_tokens, first + _MAX_TOKEN_SPLITS - 1) + 1):
        tokens = -(-num_tokens // splits)
        if tokens == last:
            continue  # the same blocks as the count before
        last = tokens
        blocks = _widest(tokens, vocab, elements)
        cost = _traffic(num_tokens, vocab, width, blocks, overhead=overhead, **walk)
        if best_cost is None or cost < best_cost:
            best, best_cost = blocks, cost
        if blocks.vocab >= vocab:
            break  # more token blocks only re-read the weight
    return best


def _aligned(block: int, total: int) -> int:
    """``block`` rounded down to a multiple of ``_ALIGN`` when that splits ``total`` anyway.

    A tile's columns are the leading dimension of its logits and of its gradient as GEMM operands;
    cuBLAS's fastest tensor-core kernels want leading dimensions of 16-byte multiples, which a block of,
    say, 5461 columns (the 512 MiB default at 6144 tokens) is not.
    """
    if block >= total or block < _ALIGN:
        return block
    return block - block % _ALIGN


def _first(vocab_id: int, device: torch.device) -> torch.Tensor:
    """The first vocabulary id of a tile as an int64 0-dim tensor, the form the tile functions take."""
    return torch.full((), vocab_id, dtype=torch.int64, device=device)


def _forward_stats(problem: HeadProblem, tiling: Tiling) -> Stats:
    hidden, weight, bias, labels = problem.hidden, problem.weight, problem.bias, problem.labels
    offset = problem.shard.start if problem.shard is not None else 0
    blocks = tiling.forward
    stats = Stats.empty(hidden.shape[0], hidden.device, problem.outputs)
    for v0 in range(0, weight.shape[0], blocks.vocab):
        w = weight[v0 : v0 + blocks.vocab]
        b = bias[v0 : v0 + blocks.vocab] if bias is not None else None
        first = _first(offset + v0, hidden.device)
        for t0 in range(0, hidden.shape[0], blocks.tokens):
            rows = slice(t0, t0 + blocks.tokens)
            raw = gemm.matmul_fp32(hidden[rows], w.t())
            stats.put(rows, run_tile(fold_tile, tiling.compiled, raw, stats.take(rows), b, rows_of(labels, rows), first,
                                     problem.transform, fallback=tiling.fallback))
            del raw  # given to the tile function
    if problem.shard is not None:
        stats.all_reduce(problem.shard.group)
    return stats


class TiledHeadFunction(torch.autograd.Function):
    """Autograd function behind the ``"torch"`` backend.

    ``forward(hidden [M, D], weight [V_local, D], bias [V_local] | None, problem, tiling, names)``
    returns one fp32 ``[M]`` tensor per name in ``names`` (a subset of `OUTPUTS`, in its order);
    ``argmax_hit`` and ``log_sum_p2`` are marked non-differentiable. Saved for backward: the inputs, the labels,
    the label logits ``[M]``, ``logsumexp [M]`` and, when the entropy is requested, ``E_p[z] [M]``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: HeadProblem, tiling: Tiling, names: tuple):
        # An output the loss does not differentiate (a metric) gives None, not zeros: the backward then knows
        # which gradients exist, and the losses' case keeps its row-scaled backward (`backward_grads`).
        ctx.set_materialize_grads(False)
        problem = HeadProblem(hidden, weight, bias, problem.labels, problem.transform, problem.outputs, problem.shard)
        result, lse, expected_z, label_logit = forward_outputs(problem, tiling)
        ctx.save_for_backward(hidden, weight, bias, problem.labels, label_logit, lse, expected_z)
        ctx.problem_meta = (problem.transform, problem.shard, problem.vocab_size)
        ctx.tiling = tiling
        ctx.names = names
        outs = tuple(result[n] for n in names)
        ctx.mark_non_differentiable(*[o for n, o in zip(names, outs) if n in ("argmax_hit", "log_sum_p2")])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, labels, label_logit, lse, expected_z = ctx.saved_tensors
        transform, shard, vocab = ctx.problem_meta
        upstream = {n: g for n, g in zip(ctx.names, grads) if g is not None}
        grad_hidden, grad_weight, grad_bias = backward_grads(
            hidden, weight, bias, labels, label_logit, lse, expected_z, upstream, transform, shard, vocab, ctx.tiling,
            need=ctx.needs_input_grad[:3],
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None


def forward_outputs(problem: HeadProblem, tiling: Tiling
                    ) -> tuple[dict, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The forward of `TiledHeadFunction` and of the registered op (`align_losses.ops.library`):
    ``({output name: fp32 [M]}, logsumexp fp32 [M], E_p[z] fp32 [M] or None without the entropy, label logit
    fp32 [M])``, the last three being what `backward_grads` needs (the label logit is the logits tile's own value
    at the label; merged over a vocabulary-parallel head's shards, as the other statistics)."""
    stats = _forward_stats(problem, tiling)
    result = finish_outputs(stats, problem.outputs, problem.vocab_size, problem.labels)
    lse = stats.max + torch.log(stats.sum_exp)
    return result, lse, stats.expected_z(), stats.label_logit


def backward_grads(hidden, weight, bias, labels, label_logit, lse, expected_z, up: dict, transform: LogitTransform,
                   shard, vocab: int, tiling: Tiling, need, sync_free: bool = False):
    """The backward of `TiledHeadFunction` and of the registered op: ``(grad_hidden [M, D] | None,
    grad_weight [V_local, D] | None, grad_bias [V_local] | None)`` in the inputs' dtypes, for the upstream
    gradients ``up`` ({output name: [M]}) and the forward's ``label_logit``, ``lse`` and ``expected_z``
    (`forward_outputs`). ``need``: which of the three to compute. ``sync_free``: never wait for the device (for a
    CUDA-graph capture), at the cost of a masked pass over all tokens per vocabulary block for the labelled weight
    rows.

    When only the log-probs and the logsumexp have upstream gradients (the losses' case) and there is no
    softcap or bias gradient, ``dL/da = s (p c + g_logp [label])`` with a per-token ``c``
    (`align_losses.ops.tiles.row_scale`): the tiles are then ``p |s c|`` (``|s c|`` folded into the exponent), and
    ``sign(s c)`` is applied outside them, to the hidden states before the weight-gradient GEMMs and to the summed
    hidden-state gradient after the last block.

    Runs with autocast off, as the forward does: a backward called inside an autocast region would otherwise
    round the recomputed logits and the fp32 GEMMs to the autocast dtype.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _backward_grads(hidden, weight, bias, labels, label_logit, lse, expected_z, up, transform, shard,
                               vocab, tiling, need, sync_free)


def _backward_grads(hidden, weight, bias, labels, label_logit, lse, expected_z, up, transform, shard, vocab, tiling,
                    need, sync_free):
    need_h, need_w, need_b = need
    up = {n: g.float() for n, g in up.items() if n in DIFFERENTIABLE_OUTPUTS}
    offset = shard.start if shard is not None else 0
    m = hidden.shape[0]
    grad_hidden = None
    if need_h:  # written by the first vocabulary block's GEMMs, added to by the later ones; zeros if there is none
        grad_hidden = (torch.empty if weight.shape[0] > 0 else torch.zeros)(m, hidden.shape[1], dtype=torch.float32,
                                                                           device=hidden.device)
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias = torch.empty_like(bias) if (need_b and bias is not None) else None
    operand_dtype = hidden.dtype if _rounds(hidden) else torch.float32
    upstream = Upstream(*(up.get(name) for name in _UPSTREAM))
    scale = row_scale(upstream, transform) if grad_bias is None else None
    blocks = tiling.backward_walk(row_scaled=scale is not None)
    # See `add_label_entries`: the label entries stay out of the GEMM operands (the tiles zero them), computed
    # once here in fp32 from the forward's label logits. No token, or an empty shard: no label; with only the bias
    # to differentiate, the entries need not move.
    entry = None
    if "logprobs" in up and m > 0 and weight.shape[0] > 0 and (need_h or need_w):
        inside = (labels >= offset) & (labels < offset + weight.shape[0])
        entry = label_entries(label_logit, lse, expected_z, upstream, transform, vocab, inside)
    labelled = None
    if entry is not None and need_w:
        labelled = (weight_rows.AllRows(labels, entry, hidden) if sync_free else
                    weight_rows.LabelledRows.of(labels, entry, hidden, offset, weight.shape[0], blocks.vocab,
                                                chunk=_label_chunk(tiling.backward, hidden.shape[1])))
    sign = shift = None
    if scale is not None:  # once per backward, not per tile
        sign = torch.sign(scale)
        shift = lse - torch.log(scale.abs())  # p |s c| = exp(z - shift); +inf where s c = 0, so p |s c| = 0
    # The row-scaled tiles hold p |s c|; the sign goes on the hidden states (exact in any dtype).
    signed_hidden = (hidden * sign[:, None].to(hidden.dtype)) if sign is not None and need_w else None
    # All tokens in one block: each block's weight-gradient rows are one GEMM's output, not a sum.
    one_gemm_per_block = 0 < m <= blocks.tokens
    for block_index, v0 in enumerate(range(0, weight.shape[0], blocks.vocab)):
        w = weight[v0 : v0 + blocks.vocab]
        b = bias[v0 : v0 + blocks.vocab] if bias is not None else None
        out = grad_weight[v0 : v0 + blocks.vocab] if need_w else None  # the block's rows of the weight gradient
        gw_block = None
        if need_w and not one_gemm_per_block:  # written by the first token block's GEMM, added to by the later ones
            gw_block = (torch.empty if m > 0 else torch.zeros)(w.shape, dtype=torch.float32, device=w.device)
        gb_block = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if grad_bias is not None else None
        first = _first(offset + v0, hidden.device)
        for t0 in range(0, m, blocks.tokens):
            rows = slice(t0, t0 + blocks.tokens)
            h = hidden[rows]
            up_rows = Upstream(*(rows_of(g, rows) for g in upstream))
            tile = run_tile(tile_grad, tiling.compiled, gemm.matmul_fp32(h, w.t()), b, rows_of(labels, rows), first,
                            rows_of(lse, rows), rows_of(expected_z, rows), up_rows, transform, vocab, operand_dtype,
                            entry is not None, gb_block is not None, rows_of(shift, rows), fallback=tiling.fallback)
            if gb_block is not None:
                gb_block += tile.bias_sum
            if need_h:
                gemm.mm_into(grad_hidden[rows], tile.grad_op, w, first=block_index == 0)
            if need_w:
                h_op = signed_hidden[rows] if signed_hidden is not None else h
                if one_gemm_per_block and weight_rows.rows_in_place(out, tile.grad_op, h_op, labelled, block_index, m):
                    weight_rows.write_rows(out, tile.grad_op, h_op, labelled, block_index, offset + v0)
                elif gw_block is None:
                    gw_block = gemm.matmul_fp32(tile.grad_op.t(), h_op)
                else:
                    gemm.mm_into(gw_block, tile.grad_op.t(), h_op, first=t0 == 0)
            del tile
        if gw_block is not None:
            if labelled is not None:
                labelled.add_to_block(gw_block, block_index, offset + v0)
            out.copy_(gw_block)
        if gb_block is not None:
            grad_bias[v0 : v0 + blocks.vocab] = gb_block
    if need_h and sign is not None:
        grad_hidden.mul_(sign[:, None])  # the blocks summed p |s c| W; dL/dh = sign(s c) that (+ the label entries)
    if need_h and entry is not None:
        add_label_entries(grad_hidden, entry, weight, labels, offset)
    if need_h and shard is not None:
        import torch.distributed as dist

        dist.all_reduce(grad_hidden, group=shard.group)
    if need_h:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def _label_chunk(blocks: Blocks, width: int) -> int:
    """Tokens whose label terms `align_losses.ops.weight_rows.LabelledRows` makes at once: ``[chunk, width]``
    products of about the eager tile's size (``blocks``: the walk planned at `_BYTES_PER_TILE_ELEMENT`, whatever walk
    the backward takes), so that they take no more than a fraction of the budget beside the first weight-gradient
    block."""
    return max(blocks.tokens * blocks.vocab // max(width, 1), 256)


def add_label_entries(acc: torch.Tensor, entry: torch.Tensor, weight: torch.Tensor,
                      labels: torch.Tensor, offset: int) -> None:
    """``acc[t] += entry[t] * weight[labels[t] - offset]``: the label entries, added unrounded.

    The label entry of ``dL/da`` holds a token's whole log-prob upstream gradient, and a sequence
    loss (DPO, SFT's mean) gives every token of a sequence the same one. Rounded to bf16 as a GEMM
    operand it would have the same relative error (up to 2^-8) for the whole sequence, which no sum
    averages out (at the head benchmark's long shape it dominated grad_hidden's error:
    benchmarks/NOTES-triton.md). So the backward zeroes each entry in its tile
    (`align_losses.ops.tiles.tile_grad`; the entries come from `align_losses.ops.tiles.label_entries`) and adds its
    products in fp32 after the GEMMs: with the label's weight row into the hidden-state gradient (here), with the
    token's hidden state into the weight gradient's row (`align_losses.ops.weight_rows.LabelledRows`), as the
    ``"triton"`` backend does.

    ``acc`` fp32 ``[M, D]``; ``entry`` fp32 ``[M]``, 0 where the label is in another shard.
    """
    rows = (labels - offset).clamp(0, weight.shape[0] - 1)
    acc.addcmul_(weight.index_select(0, rows), entry[:, None])


def tiled_head(problem: HeadProblem, memory_budget: int, token_block: Optional[int] = None,
               compile_tiles: Optional[bool] = None) -> dict:
    """Run the op on a normalised problem; returns ``{output name: fp32 [M]}``. ``compile_tiles``: the
    backend option `align_losses.ops.tiles.COMPILE_TILES` (None: `align_losses.ops.tiles.compiled_tiles`'s choice)."""
    inputs = (problem.hidden, problem.weight, problem.bias)
    # The backward is planned for the gradients it will compute (a frozen head moves no weight-gradient bytes).
    tiling = Tiling.for_option(problem.hidden, problem.weight.shape[0], memory_budget, token_block, compile_tiles,
                               softcap=problem.transform.softcap is not None,
                               need=(problem.hidden.requires_grad, problem.weight.requires_grad))
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        # Reference passes: statistics only, nothing kept for a backward that will not come.
        stats = _forward_stats(problem, tiling)
        return finish_outputs(stats, problem.outputs, problem.vocab_size, problem.labels)
    names = tuple(n for n in OUTPUTS if n in problem.outputs)
    outs = TiledHeadFunction.apply(problem.hidden, problem.weight, problem.bias, problem, tiling, names)
    return dict(zip(names, outs))
