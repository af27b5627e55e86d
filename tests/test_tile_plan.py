"""The ``"torch"`` backend's tile plan (`align_losses.ops.tiled_head.Tiling`): that it stays in its budget, that the
walk it picks moves the fewest bytes among the walks it could have picked (measured by counting what the
backward's GEMMs read and write, not by the plan's own model), and that walks of any blocks, the forward's unlike
the backward's, give the float64 full-logits values and gradients."""

from __future__ import annotations

import zlib

import pytest
import torch

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
    weight-gradient blocks to revisit, splits further."""
    budget = 512 * 2**20
    qwen = Tiling.plan(6144, 151936, 2048, budget, forward_bytes=4, scaled_backward_bytes=6)
    assert qwen.backward == Blocks(6144, 5440) and qwen.forward == Blocks(6144, 21824)
    assert qwen.scaled_backward == Blocks(6144, 14528)
    assert Tiling.plan(6144, 128256, 4096, budget, forward_bytes=4).backward == Blocks(6144, 5440)
    long = Tiling.plan(24576, 151936, 2048, budget, forward_bytes=4)
    assert long.backward == Blocks(6144, 5440)
    frozen = Tiling.plan(24576, 151936, 2048, budget, forward_bytes=4, need=(True, False))
    assert frozen.backward.tokens < long.backward.tokens


class _Traffic:
    """Counts the bytes the GEMMs of `align_losses.ops.gemm` read and write: operands read, results written, and
    an accumulator read as well when added to."""

    def __init__(self, monkeypatch):
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
    (logps * up).sum().backward()
    traffic.on = False
    return traffic.bytes


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["both", "frozen-head", "hidden-frozen"])
def test_plan_picks_the_walk_that_moves_fewest_bytes(monkeypatch, need):
    """Long-input proportions (many tokens, a budget that leaves narrow vocabulary blocks with all of them in one
    block), fp32 so that no operand is copied: every token block from 1 to all is tried through the backend's
    ``token_chunk`` option, and the plan's own choice must move no more bytes than the best of them. The per-tile
    launch cost is set to 0 here: the count sees bytes only."""
    monkeypatch.setattr(tiled_head, "_TILE_OVERHEAD_BYTES", 0)
    traffic = _Traffic(monkeypatch)
    g = torch.Generator().manual_seed(11)
    m, d, v, budget = 384, 128, 2000, 16 * 384 * 40  # all tokens in one block: 40 ids a block, 50 blocks
    hidden = torch.randn(m, d, generator=g).requires_grad_(need[0])
    weight = (torch.randn(v, d, generator=g) / 2).requires_grad_(need[1])
    labels = torch.randint(0, v, (m,), generator=g)
    up = torch.randn(m, generator=g)
    chosen = _backward_traffic(traffic, hidden, weight, labels, up, budget, None)
    candidates = sorted({-(-m // n) for n in range(1, m + 1)})
    measured = {t: _backward_traffic(traffic, hidden, weight, labels, up, budget, t) for t in candidates}
    best = min(measured, key=measured.get)
    assert chosen <= measured[best], (chosen, best, measured[best])
    # a real saving over all tokens in one block, the tiles' own bytes included: 1.39x with the hidden-state gradient
    # (its accumulator is what narrow blocks revisit), 1.18x without
    assert measured[m] > (1.3 if need[0] else 1.1) * chosen


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
