"""The "torch" backend's tiles through `torch.compile` (``backend_options={"compile_tiles": True}``), on the CPU.

The default compiles them on CUDA/XPU only; forcing it on here runs the same pure tile functions
(`align_losses.ops.tiles`) through Inductor's C++ backend. One configuration with everything on (bias, soft-cap,
logit scale, temperature, all six outputs, a random non-uniform upstream gradient for each of the four
differentiable ones, ignored labels, labels on tile edges, several vocabulary and token blocks) is checked against
a float64 full-logit reference written here and against the eager tiles; compiling it takes a few seconds, so
the other tests reuse its graphs (same flags, other sizes: shapes are dynamic).
"""

from __future__ import annotations

import pytest
import torch

from align_losses import linear_token_stats
from align_losses.ops import tiles

IGNORE = -100
OUTPUTS = ("entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2")
GRADED = ("logprobs", "entropy", "mean_logit", "logsumexp")
TRANSFORM = dict(softcap=20.0, logit_scale=1.3, temperature=0.7)
BLOCK = 192  # vocabulary ids per tile: memory_budget 16 * 32 * BLOCK bytes with token_chunk 32


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


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def test_compiled_tiles_match_float64_and_eager():
    inputs = _inputs(n=83, d=11, v=2 * BLOCK + 101, seed=0)  # 3 vocabulary blocks, 3 token blocks
    want, want_grads = _run(inputs, compiled=False, dtype=torch.float64)
    got, grads = _run(inputs, compiled=True)
    eager, eager_grads = _run(inputs, compiled=False)
    for name, value in got.items():
        assert value.dtype == torch.float32
        assert _rel(value, want[name]) < 2e-6, name
        assert _rel(value, eager[name]) < 1e-6, name
    assert torch.equal(got["argmax_hit"], want["argmax_hit"].float())
    for grad, want_grad, eager_grad, name in zip(grads, want_grads, eager_grads, ("hidden", "weight", "bias")):
        assert _rel(grad, want_grad) < 1e-5, name
        assert _rel(grad, eager_grad) < 1e-5, name


def test_compiled_tiles_do_not_recompile_for_new_sizes():
    """Dynamic shapes: new token counts, vocabulary sizes and tile widths reuse the graphs already built."""
    from torch._dynamo.utils import counters

    _run(_inputs(n=83, d=11, v=2 * BLOCK + 101, seed=0), compiled=True)  # built by the test above if it ran
    before = counters["stats"]["unique_graphs"]
    for n, v, seed in ((70, 3 * BLOCK + 37, 1), (131, BLOCK + 55, 2)):
        inputs = _inputs(n=n, d=11, v=v, seed=seed)
        got, grads = _run(inputs, compiled=True)
        want, want_grads = _run(inputs, compiled=False, dtype=torch.float64)
        assert _rel(got["logprobs"], want["logprobs"]) < 2e-6
        assert _rel(grads[1], want_grads[1]) < 1e-5
    assert counters["stats"]["unique_graphs"] == before


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
    monkeypatch.setattr(tiles.importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert tiles.compiled_tiles(None, torch.device("cuda")) and tiles.compiled_tiles(None, torch.device("xpu"))
