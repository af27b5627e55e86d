"""The ``"torch"`` backend's tile plan (`align_losses.ops.tiled_head.Tiling`): that it stays in its budget, that the
walk it picks moves the fewest bytes among the walks it could have picked (measured by counting what the
backward's GEMMs read and write, not by the plan's own model), and that walks of any blocks, the forward's unlike
the backward's, give the float64 full-logits values and gradients."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import align_losses
from align_losses.ops import gemm
from align_losses.ops import tiled_head
from align_losses.ops.tiled_head import Blocks, TiledHeadFunction, Tiling
from align_losses.problem import HeadProblem, LogitTransform
from reference import full_logits, rel, token_stats


@pytest.mark.parametrize("tokens,vocab,width,budget", [
    (1, 1, 1, 1), (24576, 151936, 2048, 512 * 2**20), (6144, 128256, 4096, 512 * 2**20), (7, 5000, 16, 16 * 3),
    (50_000, 32, 64, 2**20), (3, 70_000, 8, 2**30), (777, 999, 33, 16 * 4000),
])
@pytest.mark.parametrize("forward_bytes,scaled_bytes", [(16, 16), (4, 6), (4, 8)])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_plan_stays_in_budget(tokens, vocab, width, budget, forward_bytes, scaled_bytes, need):
    plan = Tiling.plan(tokens, vocab, width, budget, forward_bytes=forward_bytes, need=need,
                       scaled_backward_bytes=scaled_bytes)
    assert (plan.scaled_backward is None) == (scaled_bytes == 16)
    assert plan.backward_walk(row_scaled=False) == plan.backward
    scaled = plan.backward_walk(row_scaled=True)
    for walk, per_element in ((plan.forward, forward_bytes), (plan.backward, 16), (scaled, scaled_bytes)):
        assert 1 <= walk.tokens <= tokens and 1 <= walk.vocab <= vocab
        # within the budget wherever one element is (one token by one id is the least a tile can be)
        assert walk.tokens * walk.vocab * per_element <= max(budget, per_element), walk


def test_plan_at_head_benchmark_shapes():
    """What the plan does at head.py's shapes (bf16 on CUDA, compiled tiles, the 512 MiB default): Qwen3 and Llama
    keep all tokens in one block; the long shape splits them (see `Tiling.plan`); the compiled forward's tiles
    are four times wider, the compiled row-scaled backward's 16 / 6 times; a frozen head's backward, with no
    weight-gradient blocks to revisit, splits further. The long shape splits its tokens even though one token block
    would write the weight gradient's rows in place (``rows_in_place="redo"``, bf16 on CUDA)."""
    budget = 512 * 2**20
    qwen = Tiling.plan(6144, 151936, 2048, budget, forward_bytes=4, scaled_backward_bytes=6, rows_in_place="redo")
    assert qwen.backward == Blocks(6144, 5440) and qwen.forward == Blocks(6144, 21824)
    assert qwen.scaled_backward == Blocks(6144, 14528)
    assert Tiling.plan(6144, 128256, 4096, budget, forward_bytes=4).backward == Blocks(6144, 5440)
    long = Tiling.plan(24576, 151936, 2048, budget, forward_bytes=4)
    assert long.backward == Blocks(6144, 5440)
    for rows_in_place in ("", "redo"):
        long = Tiling.plan(24576, 151936, 2048, budget, forward_bytes=4, scaled_backward_bytes=6,
                           rows_in_place=rows_in_place)
        assert long.scaled_backward == Blocks(8192, 10880)
    frozen = Tiling.plan(24576, 151936, 2048, budget, forward_bytes=4, need=(True, False))
    assert frozen.backward.tokens < long.backward.tokens


def test_plan_counts_weight_rows_written_in_place(monkeypatch):
    """A walk of one token block writes the weight gradient's rows in place (`align_losses.ops.weight_rows`), so the
    plan keeps one token block where, charged for an fp32 block and its copy, it would split them; in bf16 on CUDA
    (``"redo"``) only while each block's redo reads less than its fp32 block would move (narrow blocks take the fp32
    path, and plan as it does). `Tiling.for_option` tells the plan which way the rows go for the hidden states'
    dtype and device and for the sync-free backward."""
    budget = 16 * 128 * 64
    assert Tiling.plan(128, 2000, 128, budget, operand_bytes=2).backward == Blocks(64, 128)
    for kind in ("fp32", "redo"):
        assert Tiling.plan(128, 2000, 128, budget, operand_bytes=2, rows_in_place=kind).backward == Blocks(128, 64)
    budget = 16 * 192 * 64  # the redo's read of the hidden states tips this one back to the split
    assert Tiling.plan(192, 2000, 128, budget, operand_bytes=2, rows_in_place="fp32").backward == Blocks(192, 64)
    assert Tiling.plan(192, 2000, 128, budget, operand_bytes=2, rows_in_place="redo").backward == Blocks(96, 128)
    narrow = 16 * 384 * 24  # 24-id blocks of 384 tokens: a redo would read 384 x 2 B a column against 24 x 8 B
    for kind in ("", "redo"):  # (charging every block its redo, the plan would split the tokens in two)
        assert Tiling.plan(384, 5000, 128, narrow, operand_bytes=2, rows_in_place=kind).backward == Blocks(384, 24)

    kinds = []
    real_plan = Tiling.plan
    monkeypatch.setattr(Tiling, "plan", staticmethod(lambda *a, **k: kinds.append(k["rows_in_place"])
                                                     or real_plan(*a, **k)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        Tiling.for_option(torch.ones(8, 4, dtype=dtype), 100, 2**20, None, compile_tiles=False)
    monkeypatch.setattr(gemm, "writes_bf16", lambda a: a.dtype == torch.bfloat16)  # as on CUDA
    Tiling.for_option(torch.ones(8, 4, dtype=torch.bfloat16), 100, 2**20, None, compile_tiles=False)
    assert kinds == ["fp32", "", "", "redo"]
    # The sync-free backward (the registered op's, here in `no_host_sync`) keeps fp32 blocks in bf16: it plans so.
    kinds.clear()
    hidden = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(100, 4, dtype=torch.bfloat16, requires_grad=True)
    with align_losses.no_host_sync():
        align_losses.linear_logprobs(hidden, weight, torch.arange(8), impl="torch",
                                     backend_options={"compile_tiles": False}).sum().backward()
    assert kinds[-1] == "", kinds  # the backward's plan (the forward's walk does not depend on the rows)


class _Traffic(TorchDispatchMode):
    """Counts the bytes the GEMMs of `align_losses.ops.gemm` read and write (operands read, results written, and
    an accumulator read as well when added to) and, while entered as a dispatch mode, the bytes of the 2-d copies
    (the fp32 weight-gradient blocks copied into the gradient: read and written)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.bytes = 0
        self.on = False
        matmul, mm_into, mm_rounded = gemm.matmul_fp32, gemm.mm_into, gemm.mm_rounded

        def counted_matmul(a, b):
            out = matmul(a, b)
            self._count(a, b, out, 1)
            return out

        def counted_mm_into(acc, a, b, first):
            mm_into(acc, a, b, first)
            self._count(a, b, acc, 1 if first else 2)

        def counted_mm_rounded(a, b, out):
            mm_rounded(a, b, out)
            self._count(a, b, out, 1)

        monkeypatch.setattr(gemm, "matmul_fp32", counted_matmul)
        monkeypatch.setattr(gemm, "mm_into", counted_mm_into)
        monkeypatch.setattr(gemm, "mm_rounded", counted_mm_rounded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and func is torch.ops.aten.copy_.default and args[1].dim() == 2:
            self.bytes += args[0].numel() * args[0].element_size() + args[1].numel() * args[1].element_size()
        return func(*args, **(kwargs or {}))

    def _count(self, a, b, out, out_passes):
        if self.on:
            self.bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
            self.bytes += out.numel() * out.element_size() * out_passes


def _backward_traffic(traffic, hidden, weight, labels, up, budget, token_chunk):
    hidden = hidden.detach().requires_grad_(hidden.requires_grad)
    weight = weight.detach().requires_grad_(weight.requires_grad)
    options = {"memory_budget": budget, "compile_tiles": False}
    if token_chunk is not None:
        options["token_chunk"] = token_chunk
    logps = align_losses.linear_logprobs(hidden, weight, labels, impl="torch", backend_options=options)
    traffic.bytes, traffic.on = 0, True
    with traffic:
        (logps * up).sum().backward()
    traffic.on = False
    return traffic.bytes


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["both", "frozen-head", "hidden-frozen"])
@pytest.mark.parametrize("m,ids", [(384, 40), (128, 64)], ids=["long", "near-even"])
def test_plan_picks_the_walk_that_moves_fewest_bytes(monkeypatch, need, m, ids):
    """Long-input proportions (many tokens, a budget that leaves narrow vocabulary blocks with all of them in one
    block: ``ids`` a block), fp32 so that no operand is copied: every token block from 1 to all is tried through
    the backend's ``token_chunk`` option, and the plan's own choice must move no more bytes than the best of them.
    The per-tile launch cost is set to 0 here: the count sees bytes only. At the second shape one token block,
    whose weight-gradient rows are written in place, is the best walk by a few percent with both gradients (a plan
    that charged it an fp32 block and its copy splits the tokens in two)."""
    monkeypatch.setattr(tiled_head, "_TILE_OVERHEAD_BYTES", 0)
    traffic = _Traffic(monkeypatch)
    g = torch.Generator().manual_seed(11)
    d, v, budget = 128, 2000, 16 * m * ids
    hidden = torch.randn(m, d, generator=g).requires_grad_(need[0])
    weight = (torch.randn(v, d, generator=g) / 2).requires_grad_(need[1])
    labels = torch.randint(0, v, (m,), generator=g)
    up = torch.randn(m, generator=g)
    chosen = _backward_traffic(traffic, hidden, weight, labels, up, budget, None)
    candidates = sorted({-(-m // n) for n in range(1, m + 1)})
    measured = {t: _backward_traffic(traffic, hidden, weight, labels, up, budget, t) for t in candidates}
    best = min(measured, key=measured.get)
    assert chosen <= measured[best], (chosen, best, measured[best])
    if m == 384:
        # a real saving over all tokens in one block, the tiles' own bytes included: 1.32x with the hidden-state
        # gradient (its accumulator is what narrow blocks revisit), 1.08x without
        assert measured[m] > (1.25 if need[0] else 1.05) * chosen


def _reference(hidden, weight, bias, labels, transform, up):
    z = full_logits(hidden, weight, bias, logit_scale=transform.logit_scale, softcap=transform.softcap)
    ref = token_stats(z, labels)
    return ref, sum((ref[name] * up[name]).sum() for name in up)


@pytest.mark.parametrize("forward,backward", [
    (Blocks(37, 301), Blocks(37, 301)), (Blocks(37, 64), Blocks(5, 96)), (Blocks(8, 128), Blocks(37, 17)),
    (Blocks(1, 7), Blocks(11, 300)),
])
@pytest.mark.parametrize("frozen", [None, "weight", "hidden"])
def test_any_walks_give_float64_values_and_gradients(forward, backward, frozen):
    """Whatever blocks each walk takes (the forward's unlike the backward's, uneven last blocks, one token a tile),
    the outputs and the gradients of random non-uniform upstream gradients match float64 full-logits math; a
    frozen input gets no gradient."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((forward, backward, frozen)).encode()))
    m, d, v = 37, 24, 301
    hidden = torch.randn(m, d, generator=g, dtype=torch.float64).float().requires_grad_(frozen != "hidden")
    weight = (torch.randn(v, d, generator=g) / 2).requires_grad_(frozen != "weight")
    bias = torch.randn(v, generator=g).requires_grad_()
    labels = torch.randint(0, v, (m,), generator=g)
    transform = LogitTransform(logit_scale=1.3, softcap=20.0)
    names = ("logprobs", "entropy", "logsumexp")
    problem = HeadProblem(hidden, weight, bias, labels, transform, frozenset(names))
    outs = TiledHeadFunction.apply(hidden, weight, bias, problem, Tiling(forward, backward), names)
    up = {name: torch.randn(m, generator=g, dtype=torch.float64) * 2 + 0.5 for name in names}
    leaves = [t for t in (hidden, weight, bias) if t.requires_grad]
    ours = torch.autograd.grad(sum((o.double() * up[n]).sum() for n, o in zip(names, outs)), leaves)
    ref, total = _reference(hidden, weight, bias, labels, transform, up)
    for name, out in zip(names, outs):
        assert rel(out, ref[name]) < 1e-5, name
    theirs = torch.autograd.grad(total, leaves)
    for got, want in zip(ours, theirs):
        assert rel(got, want) < 1e-4


def test_plan_traces_under_a_callers_fullgraph_compile_without_warnings():
    """A vocabulary-parallel head under a caller's ``torch.compile`` traces the plan (its sizes may then be
    symbolic): it compiles with no graph break, plans as eagerly, and says nothing about the plan cache."""
    import warnings

    def vocab_block(x):
        return x * Tiling.plan(x.shape[0], 5000, x.shape[1], 16 * 4096).backward.vocab

    compiled = torch.compile(vocab_block, fullgraph=True, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tokens in (100, 130):  # the second with symbolic sizes (automatic dynamic)
            x = torch.ones(tokens, 8)
            assert torch.equal(compiled(x), vocab_block(x))
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
