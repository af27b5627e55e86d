"""The "torch" backend's tiles through `torch.compile` (``backend_options={"compile_tiles": True}``), on the CPU.

The default compiles them on CUDA/XPU only; forcing it on here runs the same pure tile functions
(`align_losses.ops.tiles`) through Inductor's C++ backend. One configuration with everything on (bias, soft-cap,
logit scale, temperature, all six outputs, a random non-uniform upstream gradient for each of the four
differentiable ones, ignored labels, labels on tile edges, several vocabulary and token blocks) is checked against
a float64 full-logit reference written here and against the eager tiles; compiling it takes a few seconds, so
the other tests reuse its graphs (same flags, other sizes: shapes are dynamic).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from align_losses import linear_token_stats
from align_losses.ops import tiled_head, tiles
from align_losses.ops.tiled_head import Tiling
from align_losses.packages import installed

IGNORE = -100
OUTPUTS = ("entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2")
GRADED = ("logprobs", "entropy", "mean_logit", "logsumexp")
TRANSFORM = dict(softcap=20.0, logit_scale=1.3, temperature=0.7)
BLOCK = 192  # vocabulary ids per tile: memory_budget 16 * 32 * BLOCK bytes with token_chunk 32
#: CPU (Inductor's C++ kernels), and CUDA (its Triton kernels) as a GPU test
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def _options(compiled: bool) -> dict:
    return {"compile_tiles": compiled, "memory_budget": 16 * 32 * BLOCK, "token_chunk": 32}


def _inputs(n: int, d: int, v: int, seed: int):
    """fp32 inputs with a spread of logits, ignored labels and labels on every tile edge, and upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = 0.4 * torch.randn(v, d, generator=g)
    bias = 0.5 * torch.randn(v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    edges = [e for first in range(0, v, BLOCK) for e in (first, min(first + BLOCK, v) - 1)]
    labels[: len(edges)] = torch.tensor(edges)
    labels[len(edges) :: 5] = IGNORE
    up = {name: torch.randn(n, generator=g) * (0.5 + torch.rand(n, generator=g)) for name in GRADED}
    return hidden, weight, bias, labels, up


def _reference(hidden, weight, bias, labels) -> dict:
    """Every output from the full float64 logits (0 at ignored tokens)."""
    z = TRANSFORM["logit_scale"] * (hidden @ weight.t() + bias)
    z = TRANSFORM["softcap"] * torch.tanh(z / TRANSFORM["softcap"]) / TRANSFORM["temperature"]
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE
    column = labels.clamp(min=0)[:, None]
    p = logp.exp()
    out = {
        "logprobs": logp.gather(1, column).squeeze(1),
        "entropy": -(p * logp).sum(-1),
        "mean_logit": z.mean(-1),
        "logsumexp": torch.logsumexp(z, -1),
        "argmax_hit": (z.argmax(-1) == labels).double(),
        "log_sum_p2": torch.log((p * p).sum(-1)),
    }
    return {name: value * valid for name, value in out.items()}


def _run(inputs, compiled: bool, dtype=torch.float32) -> tuple[dict, list]:
    """The backend's outputs and the gradients of hidden, weight and bias for the upstream gradients."""
    hidden, weight, bias, labels, up = inputs
    leaves = [t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
    reference = dtype == torch.float64
    if reference:
        out = _reference(*leaves, labels)
    else:
        stats = linear_token_stats(*leaves[:2], labels, bias=leaves[2], outputs=OUTPUTS, impl="torch",
                                   backend_options=_options(compiled), **TRANSFORM)
        out = {name: getattr(stats, name) for name in ("logprobs", *OUTPUTS)}
    sum(((out[name] * up[name].to(dtype)).sum() for name in GRADED)).backward()
    return {name: value.detach() for name, value in out.items()}, [leaf.grad for leaf in leaves]


def _graphs(fn) -> int:
    """How many graphs Dynamo holds for the function ``fn``."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _record_tile_widths(monkeypatch, tile_fn=tiles.fold_tile) -> list:
    """Plan the next calls' tiles as before the tile functions first compiled (``BLOCK`` ids wide: once they have,
    the plan widens the compiled ones, the forward's four times, past these tests' vocabularies, to one tile a token
    block), and record the width of each tile the compiled ``tile_fn`` gets."""
    monkeypatch.setattr(tiles, "_ran_compiled", set())
    widths = []
    run_tile = tiled_head.run_tile

    def spy(fn, compiled, a, *args, **kwargs):
        if fn is tile_fn and compiled:
            widths.append(a.shape[1])
        return run_tile(fn, compiled, a, *args, **kwargs)

    monkeypatch.setattr(tiled_head, "run_tile", spy)
    return widths


def _masked_head(n: int, d: int, v: int, g: torch.Generator, weight_scale: float, masked: bool):
    """fp32 hidden ``[n, d]``, weight ``[v, d]`` and bias ``[v]``, and the mask (bool ``[v]``) of the ids whose bias
    is -inf when ``masked``: the first tile and a half (nothing but -inf seen yet) and a run inside the third."""
    hidden = torch.randn(n, d, generator=g)
    weight = weight_scale * torch.randn(v, d, generator=g)
    bias = 0.5 * torch.randn(v, generator=g)
    mask = torch.zeros(v, dtype=torch.bool)
    if masked:
        mask[: BLOCK + BLOCK // 2] = True
        mask[2 * BLOCK + 5 : 2 * BLOCK + 50] = True
        bias[mask] = -float("inf")
    return hidden, weight, bias, mask


def _assert_matches(got, grads, eager, eager_grads, want, want_grads, keep, masked) -> None:
    """Outputs ``{name: [N]}`` and gradients of hidden, weight and bias: finite, against the float64 reference
    ``want`` (its weight and bias gradients over the ids ``keep`` only) and the eager tiles; the ``masked`` ids'
    weight and bias gradients exactly zero."""
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
        assert _rel(value, want[name]) < 2e-6, name
        assert _rel(value, eager[name]) < 1e-6, name
    assert _rel(grads[0], want_grads[0]) < 1e-5 and _rel(grads[0], eager_grads[0]) < 1e-5
    for grad, eager_grad, want_grad in zip(grads[1:], eager_grads[1:], want_grads[1:]):
        assert torch.count_nonzero(grad[masked]) == 0
        assert _rel(grad[keep], want_grad) < 1e-5 and _rel(grad, eager_grad) < 1e-5


def test_compiled_tiles_match_float64_and_eager():
    inputs = _inputs(n=83, d=11, v=2 * BLOCK + 101, seed=0)  # 3 vocabulary blocks, 3 token blocks
    want, want_grads = _run(inputs, compiled=False, dtype=torch.float64)
    got, grads = _run(inputs, compiled=True)
    eager, eager_grads = _run(inputs, compiled=False)
    assert _graphs(tiles.fold_tile) and _graphs(tiles.tile_grad)  # Dynamo built them: the tiles ran compiled
    for name, value in got.items():
        assert value.dtype == torch.float32
        assert _rel(value, want[name]) < 2e-6, name
        assert _rel(value, eager[name]) < 1e-6, name
    assert torch.equal(got["argmax_hit"], want["argmax_hit"].float())
    for grad, want_grad, eager_grad, name in zip(grads, want_grads, eager_grads, ("hidden", "weight", "bias")):
        assert _rel(grad, want_grad) < 1e-5, name
        assert _rel(grad, eager_grad) < 1e-5, name


def test_compiled_row_scaled_tiles_match_float64_and_eager(monkeypatch):
    """The losses' backward (`tiles.row_scale`: upstream gradients on the log-probs and logsumexp only, no softcap,
    a bias that takes no gradient): compiled, eager and float64 agree, with a logit scale and a temperature, over
    several vocabulary and token blocks."""
    hidden, weight, bias, labels, up = _inputs(n=77, d=13, v=2 * BLOCK + 57, seed=3)
    scale, temperature = 1.3, 0.7

    def run(compiled, dtype=torch.float32):
        h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
        b = bias.to(dtype)
        if dtype == torch.float64:
            z = scale * (h @ w.t() + b) / temperature
            logp = torch.log_softmax(z, dim=-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
            valid = (labels != IGNORE).to(dtype)
            out = {"logprobs": logp * valid, "logsumexp": torch.logsumexp(z, -1) * valid}
        else:
            stats = linear_token_stats(h, w, labels, bias=b, outputs=("logsumexp",), impl="torch",
                                       backend_options=_options(compiled), logit_scale=scale, temperature=temperature)
            out = {"logprobs": stats.logprobs, "logsumexp": stats.logsumexp}
        loss = sum((out[n].double() * up[n].double()).sum() for n in out)
        return torch.autograd.grad(loss, (h, w))

    import align_losses.ops.tiled_head as tiled_head

    scales = []
    real = tiles.row_scale
    monkeypatch.setattr(tiled_head, "row_scale", lambda up_, t: scales.append(real(up_, t)) or scales[-1])
    want = run(False, torch.float64)
    got, eager = run(True), run(False)
    assert len(scales) == 2 and all(s is not None for s in scales)  # both backwards took the row-scaled path
    for g, e, r, name in zip(got, eager, want, ("hidden", "weight")):
        assert _rel(g, r) < 1e-5, name
        assert _rel(e, r) < 1e-5, name
        assert _rel(g, e) < 1e-5, name


@pytest.mark.parametrize("compiled", [False, True])
def test_row_scaled_tile_rounds_p_times_c_once(compiled):
    """A row-scaled tile in a bf16 operand is ``p |s c|`` rounded once (the sign of ``s c`` left to the caller),
    with the label entries zeroed (their fp32 values are `tiles.label_entries`', tests/test_core.py): against
    float64, per element, with ``c`` of both signs, zero, and magnitudes from 1e-6 to 1e3."""
    from align_losses.problem import LogitTransform

    g = torch.Generator().manual_seed(11)
    t_count, width, first_id = 37, 91, 200
    transform = LogitTransform(logit_scale=1.3, temperature=0.7)
    a = torch.randn(t_count, width, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(first_id - 20, first_id + width + 20, (t_count,), generator=g)  # some outside
    z = a * 1.3 / 0.7
    lse = torch.logsumexp(torch.cat([z, torch.randn(t_count, 500, generator=g, dtype=torch.float64) * 3], 1), 1)
    g_logp = torch.randn(t_count, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 4, (t_count,), generator=g)
    g_lse = torch.randn(t_count, generator=g, dtype=torch.float64)
    g_lse[:3] = g_logp[:3]  # c = 0
    up = tiles.Upstream(g_logp.float(), g_lse.float(), None, None)
    scale = tiles.row_scale(up, transform)
    shift = lse.float() - scale.abs().log()
    out = tiles.run_tile(tiles.tile_grad, compiled, a.float(), None, labels, torch.tensor(first_id), lse.float(), None,
                         up, transform, 10**6, torch.bfloat16, True, False, shift)
    assert out.grad_op.dtype == torch.bfloat16 and out.bias_sum is None
    s = 1.3 / 0.7
    sc = s * (g_lse - g_logp)
    want = (z - lse[:, None]).exp() * sc.abs()[:, None]
    local = labels - first_id
    inside = (local >= 0) & (local < width)
    want[inside.nonzero().squeeze(1), local[inside]] = 0.0
    got = out.grad_op.double()
    assert torch.equal(got == 0, want.to(torch.bfloat16).double() == 0)
    rel = ((got - want).abs() / want.abs().clamp_min(1e-300))[want != 0]
    assert float(rel.max()) <= 2.0**-8 * 1.01  # one rounding to bf16 (8 bits), nothing more


def test_compiled_tiles_do_not_recompile_for_new_sizes():
    """Dynamic shapes: new token counts, vocabulary sizes and tile widths reuse the graphs already built."""
    from torch._dynamo.utils import counters

    _run(_inputs(n=83, d=11, v=2 * BLOCK + 101, seed=0), compiled=True)  # built by the test above if it ran
    before = counters["stats"]["unique_graphs"]
    graphs = _graphs(tiles.fold_tile), _graphs(tiles.tile_grad)
    assert before > 0 and all(graphs)
    for n, v, seed in ((70, 3 * BLOCK + 37, 1), (131, BLOCK + 55, 2)):
        inputs = _inputs(n=n, d=11, v=v, seed=seed)
        got, grads = _run(inputs, compiled=True)
        want, want_grads = _run(inputs, compiled=False, dtype=torch.float64)
        assert _rel(got["logprobs"], want["logprobs"]) < 2e-6
        assert _rel(grads[1], want_grads[1]) < 1e-5
    assert counters["stats"]["unique_graphs"] == before
    assert (_graphs(tiles.fold_tile), _graphs(tiles.tile_grad)) == graphs


def test_compiled_tiles_inside_a_compiled_caller():
    """Under the user's `torch.compile` the head runs behind the registered ops, which pass the option on."""
    inputs = _inputs(n=77, d=11, v=2 * BLOCK + 101, seed=3)
    hidden, weight, bias, labels, up = inputs
    eager, eager_grads = _run(inputs, compiled=False)

    def loss(h, w, b):
        stats = linear_token_stats(h, w, labels, bias=b, outputs=OUTPUTS, impl="torch",
                                   backend_options=_options(True), **TRANSFORM)
        return sum((getattr(stats, name) * up[name]).sum() for name in GRADED), stats.logprobs

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    total, logprobs = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
    total.backward()
    assert _rel(logprobs.detach(), eager["logprobs"]) < 1e-6
    for leaf, eager_grad in zip(leaves, eager_grads):
        assert _rel(leaf.grad, eager_grad) < 1e-5


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_compile_tiles_option_must_be_a_bool(value):
    hidden, weight, _, labels, _ = _inputs(n=8, d=4, v=50, seed=4)
    with pytest.raises(ValueError, match="compile_tiles"):
        linear_token_stats(hidden, weight, labels, impl="torch", backend_options={"compile_tiles": value})


def test_compiled_tiles_that_fail_to_build_name_the_option(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(tiles._compiled, tiles.fold_tile, broken)
    hidden, weight, _, labels, _ = _inputs(n=8, d=4, v=50, seed=5)
    with pytest.raises(RuntimeError, match="compile_tiles.*False") as caught:
        linear_token_stats(hidden, weight, labels, impl="torch", backend_options={"compile_tiles": True})
    assert "no compiler here" in str(caught.value)


def test_tiles_are_compiled_by_default_only_where_inductor_emits_triton(monkeypatch):
    assert not tiles.compiled_tiles(None, torch.device("cpu"))
    assert tiles.compiled_tiles(True, torch.device("cpu")) and not tiles.compiled_tiles(False, torch.device("cuda"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    installed.cache_clear()  # the lookup is cached per process
    assert tiles.compiled_tiles(None, torch.device("cuda")) and tiles.compiled_tiles(None, torch.device("xpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_tiles_minus_inf_bias_and_argmax_ties(device, monkeypatch):
    """A bias of -inf on the first tile and a half (nothing but -inf seen yet: the shift of 0) and on a run inside
    the third; argmax ties within a tile and across tiles (the first maximum wins). Against float64 logits of the
    unmasked ids, and the eager tiles; the masked rows get exactly zero gradient. On CUDA the compiled tiles are
    Inductor's Triton kernels (on CPU its C++ ones)."""
    n, d, v = 45, 8, 3 * BLOCK + 20
    g = torch.Generator().manual_seed(7)
    hidden, weight, bias, masked = _masked_head(n, d, v, g, weight_scale=0.4, masked=True)
    ties = [BLOCK + BLOCK // 2 + 3, BLOCK + BLOCK // 2 + 9, 2 * BLOCK + 60, 3 * BLOCK + 1]  # tiles 1, 1, 2, 3
    weight[ties] = 0.0
    weight[ties, 0] = 3.0
    bias[ties] = 0.0
    hidden[:12] = 0.0
    hidden[:12, 0] = 4.0  # logits of exactly 12 at every tied id, the others far below
    keep = (~masked).nonzero().squeeze(1)
    labels = keep[torch.randint(0, len(keep), (n,), generator=g)]
    labels[:12] = torch.tensor(ties * 3)  # the first tied id is the argmax: a hit for 3 tokens, a miss for 9
    outputs = ("entropy", "logsumexp", "argmax_hit", "log_sum_p2")
    graded = ("logprobs", "entropy", "logsumexp")
    transform = dict(logit_scale=1.3, temperature=0.7)
    up = {name: torch.randn(n, generator=g) for name in graded}

    def run(compiled):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (hidden, weight, bias)]
        stats = linear_token_stats(*leaves[:2], labels.to(device), bias=leaves[2], outputs=outputs, impl="torch",
                                   backend_options=_options(compiled), **transform)
        out = {name: getattr(stats, name).detach().cpu() for name in ("logprobs", *outputs)}
        sum((getattr(stats, name) * up[name].to(device)).sum() for name in graded).backward()
        return out, [leaf.grad.cpu() for leaf in leaves]

    widths = _record_tile_widths(monkeypatch)
    got, grads = run(True)
    assert set(widths) == {BLOCK, 20}  # the tiles the docstring describes
    eager, eager_grads = run(False)
    # float64 reference over the unmasked ids only
    leaves = [t.double().requires_grad_() for t in (hidden, weight[keep], bias[keep])]
    z = transform["logit_scale"] * (leaves[0] @ leaves[1].t() + leaves[2]) / transform["temperature"]
    logp = torch.log_softmax(z, dim=-1)
    local = torch.searchsorted(keep, labels)
    p = logp.exp()
    want = {"logprobs": logp.gather(1, local[:, None]).squeeze(1), "entropy": -(p * logp).sum(-1),
            "logsumexp": torch.logsumexp(z, -1), "argmax_hit": (keep[z.argmax(-1)] == labels).double(),
            "log_sum_p2": torch.log((p * p).sum(-1))}
    want_grads = torch.autograd.grad(sum((want[name] * up[name]).sum() for name in graded), leaves)
    want = {name: value.detach() for name, value in want.items()}
    assert got["argmax_hit"][:12].tolist() == [1.0, 0.0, 0.0, 0.0] * 3
    assert torch.equal(got["argmax_hit"], eager["argmax_hit"]) and torch.equal(got["argmax_hit"], want["argmax_hit"].float())
    _assert_matches(got, grads, eager, eager_grads, want, want_grads, keep, masked)


def _scaled(a, k, owns_a=False):
    """A stand-in tile function (its own code object, so its own graphs): ``a * k``, or ``2 a`` for no ``k``."""
    return a * 2 if k is None else a * k


def test_compiled_tiles_recompile_past_dynamos_default_limit(monkeypatch):
    """With ``fullgraph=True`` Dynamo raises at its recompile limit (8 graphs a function by default, met by the
    flag combinations and 0/1 size specialisations of a long run): the tiles run under a limit of their own."""
    monkeypatch.setattr(tiles, "_compiled", {})
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    a = torch.randn(4, 3)
    assert torch.equal(tiles.run_tile(_scaled, True, a, None), a * 2)
    assert torch.equal(tiles.run_tile(_scaled, True, a, torch.tensor(3.0)), a * 3)  # a second graph
    assert _graphs(_scaled) == 2
    monkeypatch.setattr(tiles, "RECOMPILE_LIMIT", 1)
    with pytest.raises(RuntimeError, match="compile_tiles.*False"):
        tiles.run_tile(_scaled, True, a, torch.tensor([[3.0]]))  # would be a third


def test_compiled_tiles_compile_nothing_while_a_cuda_graph_is_captured(monkeypatch):
    """Under capture a call with a graph already built runs it; one that needs a new graph is a clear error
    (compiling there would launch and time kernels inside the capture)."""
    monkeypatch.setattr(tiles, "_compiled", {})
    a = torch.randn(5, 3)
    assert torch.equal(tiles.run_tile(_scaled, True, a, None), a * 2)  # the warm-up (built by the test above)
    monkeypatch.setattr(tiles, "_capturing", lambda device: True)
    b = torch.randn(7, 6)
    assert torch.equal(tiles.run_tile(_scaled, True, b, None), b * 2)  # dynamic shapes: the same graph
    with pytest.raises(RuntimeError, match="(?s)captured.*no_host_sync.*compile_tiles.*False"):
        tiles.run_tile(_scaled, True, b, torch.tensor([[[2.0]]]))


def test_compiled_tiles_reuse_graphs_across_tilings():
    """A call whose tiles cover whole tensors, then one with several blocks: the row and vocabulary slices reach
    the compiled functions as copies, not views, so the second call builds no graph (a view is guarded on its
    base's size and its offset)."""
    from torch._dynamo.utils import counters

    def call(options, seed):
        hidden, weight, bias, labels, _ = _inputs(n=96, d=16, v=700, seed=seed)
        hidden, weight, bias = (t.requires_grad_() for t in (hidden, weight, bias))
        stats = linear_token_stats(hidden, weight, labels, bias=bias, outputs=("entropy",), impl="torch",
                                   softcap=10.0, temperature=0.7, backend_options={"compile_tiles": True, **options})
        (stats.logprobs.sum() + stats.entropy.sum()).backward()

    call({}, seed=11)  # one tile: every slice is its whole tensor
    before = counters["stats"]["unique_graphs"]
    call({"memory_budget": 16 * 64 * 128}, seed=12)  # several token and vocabulary blocks
    assert counters["stats"]["unique_graphs"] == before


def test_default_compiled_tiles_fall_back_to_eager_with_one_warning(monkeypatch):
    """Left at its default (None), a failure to compile warns once and runs the tiles eagerly with the same
    values; asked for (True), it is an error (`test_compiled_tiles_that_fail_to_build_name_the_option`)."""
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(tiles, "_COMPILED_DEVICES", ("cpu",))  # the default compiles here: triton importable
    if not tiles.compiled_tiles(None, torch.device("cpu")):
        pytest.skip("triton is not importable: the default does not compile")
    monkeypatch.setattr(tiles, "_eager_after_failure", set())
    monkeypatch.setitem(tiles._compiled, tiles.fold_tile, broken)
    monkeypatch.setitem(tiles._compiled, tiles.tile_grad, broken)
    hidden, weight, bias, labels, _ = _inputs(n=40, d=8, v=300, seed=13)

    def run(options):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        stats = linear_token_stats(h, w, labels, bias=bias, outputs=("entropy",), impl="torch",
                                   backend_options=options)
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
        return stats.logprobs, stats.entropy, h.grad, w.grad

    monkeypatch.setattr(tiles, "_ran_compiled", {tiles.fold_tile})  # as if an earlier call had compiled it
    wide = Tiling.for_option(hidden, weight.shape[0], 4 * 40 * 256, None, None).forward
    with pytest.warns(RuntimeWarning, match="(?s)fold_tile.*no compiler here.*eagerly"):
        got = run({})
    assert tiles._eager_after_failure == {tiles.fold_tile, tiles.tile_grad}
    # the forward's tiles are planned for the eager fold from then on, not for the compiled one's 4 B an element
    narrow = Tiling.for_option(hidden, weight.shape[0], 4 * 40 * 256, None, None).forward
    assert narrow == Tiling.for_option(hidden, weight.shape[0], 4 * 40 * 256, None, False).forward
    assert wide.vocab == 4 * narrow.vocab and wide.tokens == narrow.tokens == 40
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the functions now run eagerly at once
        again = run({})
    want = run({"compile_tiles": False})
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)


def test_tile_functions_trace_into_a_callers_fullgraph_compile():
    """Called while a caller's function is being compiled, a tile function is traced into that graph (Dynamo does
    not nest compiles, and cannot trace the limit's config patch)."""
    a = torch.randn(6, 5)
    outer = torch.compile(lambda x: tiles.run_tile(_scaled, True, x, torch.tensor(3.0)) + 1, fullgraph=True)
    assert torch.allclose(outer(a), a * 3 + 1)


def test_recompile_limit_is_a_dynamo_setting():
    name = tiles._recompile_limit_name()
    assert isinstance(getattr(torch._dynamo.config, name), int)


def test_forward_tiles_widen_only_once_the_fold_has_compiled(monkeypatch):
    """The compiled fold holds only its raw tile, so the forward's tiles are planned four times as wide as the eager
    fold's, but only after the fold has compiled once: a first compile that fails would otherwise run the eager
    fold, with its larger temporaries, on the wide tiles."""
    monkeypatch.setattr(tiles, "_ran_compiled", set())
    hidden, weight, bias, labels, _ = _inputs(n=40, d=8, v=300, seed=14)
    budget = 4 * 40 * 256

    def forward_blocks():
        return Tiling.for_option(hidden, weight.shape[0], budget, None, True).forward

    before = forward_blocks()
    assert before == Tiling.for_option(hidden, weight.shape[0], budget, None, False).forward
    linear_token_stats(hidden, weight, labels, bias=bias, impl="torch", backend_options={"compile_tiles": True})
    assert tiles.compiled_before(tiles.fold_tile)
    after = forward_blocks()
    assert after.vocab == 4 * before.vocab and after.tokens == before.tokens


def test_row_scaled_backward_tiles_widen_only_once_tile_grad_has_compiled(monkeypatch):
    """A compiled row-scaled `tile_grad` holds its raw fp32 tile and its operand only (8 B an element in fp32), so
    the losses' backward walks tiles twice as wide as the eager 16 B ones here, once `tile_grad` has compiled (the
    first backward walks the narrow ones); tiles that are not row-scaled (an entropy gradient, a bias gradient, a
    soft cap) keep the narrow walk. The wide walk's gradients match the eager tiles'."""
    widths = _record_tile_widths(monkeypatch, tiles.tile_grad)
    hidden, weight, bias, labels, up = _inputs(n=61, d=9, v=3 * BLOCK + 5, seed=17)

    def backward(compiled, graded, bias_grad=False, **transform):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        b = bias.clone().requires_grad_(bias_grad)
        stats = linear_token_stats(*leaves, labels, bias=b, outputs=("logsumexp", "entropy"), impl="torch",
                                   backend_options=_options(compiled), **transform)
        widths.clear()
        sum((getattr(stats, name) * up[name]).sum() for name in graded).backward()
        return sorted(set(widths)), [leaf.grad for leaf in leaves]

    losses, entropy = ("logprobs", "logsumexp"), ("logprobs", "entropy")
    assert backward(True, losses)[0] == [5, BLOCK]  # planned before tile_grad had compiled
    wide, grads = backward(True, losses)
    assert wide == [BLOCK + 5, 2 * BLOCK]
    assert backward(True, entropy)[0] == [5, BLOCK]
    assert backward(True, losses, bias_grad=True)[0] == [5, BLOCK]
    assert backward(True, losses, softcap=20.0)[0] == [5, BLOCK]
    _, eager_grads = backward(False, losses)
    for got, want, name in zip(grads, eager_grads, ("hidden", "weight")):
        assert _rel(got, want) < 1e-5, name


def test_fold_takes_softmax_form_only_compiled_for_the_max_and_sum_of_a_wide_enough_tile(monkeypatch):
    """`fold_tile`'s softmax form is chosen while compiled, for the losses' statistics, on a tile at least
    `SOFTMAX_FORM_MIN_WIDTH` wide (a guard of the dynamic-width graph: a narrower tile gets a graph of its own);
    eagerly, or with the entropy, the sum of squares or the argmax, the two-pass form."""
    from align_losses.ops.stats import Stats

    def state(outputs):
        return tiles.RowStats(*Stats.empty(4, torch.device("cpu"), frozenset(outputs)).take(slice(0, 4)))

    losses = state(("logprobs",))
    wide = tiles.SOFTMAX_FORM_MIN_WIDTH + 9
    choose = torch.compile(lambda z: tiles._softmax_form(z, losses), dynamic=True, fullgraph=True)
    assert choose(torch.randn(4, wide)) and choose(torch.randn(4, wide + 50))
    assert not choose(torch.randn(4, tiles.SOFTMAX_FORM_MIN_WIDTH - 3))
    assert not tiles._softmax_form(torch.randn(4, wide), losses)  # eager
    # The statistics asked for, decided as while compiling (a compile per set would near Dynamo's limit per code).
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tiles._softmax_form(torch.randn(4, wide), state(("logprobs", "mean_logit", "logsumexp")))
    for extra in ("entropy", "log_sum_p2", "argmax_hit"):
        assert not tiles._softmax_form(torch.randn(4, wide), state(("logprobs", extra))), extra


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fold_in_softmax_form_matches_float64_and_eager(device, masked, monkeypatch):
    """The losses' case (log-probs, logsumexp and, unmasked, the mean logit) takes the compiled fold's softmax form:
    against float64 logits and the eager tiles, values and gradients for random upstream gradients. The last tile is
    5 ids wide, narrower than `SOFTMAX_FORM_MIN_WIDTH`: it takes the two-pass form in the same walk. ``masked``: a
    bias of -inf on the first tile and a half (nothing but -inf seen yet) and on a run inside the third; the
    masked ids get exactly zero gradient."""
    n, d, v = 53, 8, 3 * BLOCK + 5
    g = torch.Generator().manual_seed(21)
    hidden, weight, bias, mask = _masked_head(n, d, v, g, weight_scale=0.6, masked=masked)
    keep = (~mask).nonzero().squeeze(1)
    labels = keep[torch.randint(0, len(keep), (n,), generator=g)]
    labels[:3] = torch.tensor([v - 1, v - 5, keep[0]])  # labels in the narrow last tile and on the first kept id
    labels[7::6] = IGNORE
    outputs = ("logsumexp",) if masked else ("logsumexp", "mean_logit")
    graded = ("logprobs", *outputs)
    up = {name: torch.randn(n, generator=g) * (0.5 + torch.rand(n, generator=g)) for name in graded}
    transform = dict(logit_scale=1.3, temperature=0.7)

    def run(compiled):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (hidden, weight, bias)]
        stats = linear_token_stats(*leaves[:2], labels.to(device), bias=leaves[2], outputs=outputs, impl="torch",
                                   backend_options=_options(compiled), **transform)
        out = {name: getattr(stats, name).detach().cpu() for name in graded}
        sum((getattr(stats, name) * up[name].to(device)).sum() for name in graded).backward()
        return out, [leaf.grad.cpu() for leaf in leaves]

    widths = _record_tile_widths(monkeypatch)
    got, grads = run(True)
    assert set(widths) == {BLOCK, 5}  # wide tiles merged into running statistics, and the narrow last one
    eager, eager_grads = run(False)
    leaves = [t.double().requires_grad_() for t in (hidden, weight[keep], bias[keep])]
    z = transform["logit_scale"] * (leaves[0] @ leaves[1].t() + leaves[2]) / transform["temperature"]
    valid = labels != IGNORE
    local = torch.searchsorted(keep, labels.clamp(min=0))
    want = {"logprobs": torch.log_softmax(z, -1).gather(1, local[:, None]).squeeze(1) * valid,
            "logsumexp": torch.logsumexp(z, -1) * valid, "mean_logit": z.mean(-1) * valid}
    want_grads = torch.autograd.grad(sum((want[name] * up[name]).sum() for name in graded), leaves)
    want = {name: value.detach() for name, value in want.items()}
    _assert_matches(got, grads, eager, eager_grads, want, want_grads, keep, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_fold_reads_its_tile_in_one_online_softmax_pass():
    """On CUDA, Inductor lowers the compiled fold's softmax form, at a dynamic width, to its online softmax (the max
    and the sum in one pass over the tile): the reason the form exists."""
    from torch._inductor.utils import run_and_get_code

    from align_losses.ops.stats import Stats
    from align_losses.problem import LogitTransform

    torch._dynamo.reset()
    state = tiles.RowStats(*Stats.empty(64, torch.device("cuda"), frozenset({"logprobs"})).take(slice(0, 64)))
    fold = torch.compile(tiles.fold_tile, dynamic=True, fullgraph=True, options=tiles.inductor_options())
    labels = torch.randint(0, 300, (64,), device="cuda")
    first = torch.zeros((), dtype=torch.int64, device="cuda")
    _, code = run_and_get_code(fold, torch.randn(64, 300, device="cuda"), state, None, labels, first,
                               LogitTransform())
    assert "online_softmax" in "\n".join(code)
