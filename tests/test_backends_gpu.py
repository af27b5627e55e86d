"""GPU accuracy tests of the "torch", "cce" and "liger" backends against full-logit references.

Every case computes per-token log-probs (and, where asked, entropies) of labelled tokens with a
random non-uniform upstream gradient (as DPO's per-sequence weights give), then compares values and
the gradients of hidden, weight and bias with a reference built here from the SAME low-precision
inputs upcast to fp32 (fp64 for the fp32 cases), with the full ``[tokens, vocab]`` logits and
``log_softmax``. Sizes are odd on purpose: N=1000 tokens (150 ignored), D=293, V=10007.

Errors are relative norms ``||got - ref|| / ||ref||`` over the labelled tokens. The "torch"
backend must be within 3e-3 on bf16 gradients (bf16 rounding of the gradient alone is ~1.5e-3);
"cce" and "liger" are held to a loose 3e-2 and their figures are printed (``pytest -s``).

Measured on one H200 (torch 2.11, triton 3.6, cut-cross-entropy 25.1.1, liger-kernel 0.8.5 without
nvidia-cutlass-dsl), bf16, relative errors of grad_hidden / grad_weight:
torch 2.4e-3 / 2.4e-3 (fp32 vs fp64: <1e-6); cce 9.7e-3 / 3.4e-3 (softcap 1.3e-2 / 3.2e-3;
filter_eps="high" 9.4e-3 / 3.3e-3); liger flce 4.3e-3 / 4.3e-3 (bias+softcap 3.1e-3 / 3.1e-3,
bf16 accumulation 5.5e-3 / 6.0e-3); liger scaled (its PyTorch fallback) 1.5e-2 / 1.5e-2, entropy
1.5e-2. Large case: 32768 x 151936 x 256 fwd+bwd 0.27 s after the suite's earlier cases (0.70 s as
a fresh process's first call), 0.71-0.77 GiB above the inputs (an N x V bf16 tensor is 9.3 GiB;
benchmarks/results/gpu-tests-latest.txt).
"""

from __future__ import annotations

import time

import pytest
import torch

from align_losses import linear_token_stats
from reference import bf16_ulps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

N, D, V = 1000, 256 + 37, 10000 + 7
N_IGNORED = 150
TORCH_BF16_GRAD_TOL = 3e-3
KERNEL_LIB_TOL = 3e-2


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = old[0]
    torch.set_float32_matmul_precision(old[1])


def _skip_unavailable(impl):
    from align_losses.backends import get

    reason = get(impl).available()
    if reason is not None:
        pytest.skip(f"{impl}: {reason}")


def _make(dtype, bias, seed=0, n=N, d=D, v=V, n_ignored=N_IGNORED):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hidden = torch.randn(n, d, device=dev, generator=g).to(dtype)
    weight = (0.2 * torch.randn(v, d, device=dev, generator=g)).to(dtype)
    b = (0.5 * torch.randn(v, device=dev, generator=g)).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    labels[torch.randperm(n, device=dev, generator=g)[:n_ignored]] = -100
    # Non-uniform upstream gradients: per-"sequence" factors times per-token noise, some negative.
    seq_factor = torch.repeat_interleave(torch.randn(n // 50 + 1, device=dev, generator=g) * 2.0, 50)[:n]
    up_lp = seq_factor * (0.5 + torch.rand(n, device=dev, generator=g))
    up_ent = torch.randn(n, device=dev, generator=g)
    return hidden, weight, b, labels, up_lp, up_ent


def _reference(hidden, weight, bias, labels, *, softcap=None, temperature=1.0, logit_scale=1.0, dtype=torch.float32):
    a = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        a = a + bias.to(dtype)
    a = a * logit_scale
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    z = a / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != -100
    lp = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * valid
    ent = -(logp.exp() * logp).sum(dim=-1) * valid
    return lp, ent


def _rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _case(impl, dtype=torch.bfloat16, *, bias=False, softcap=None, temperature=1.0, logit_scale=1.0,
          entropy=False, options=None, ref_dtype=torch.float32, seed=0):
    """Run one backend and the reference; returns the relative errors (values and gradients)."""
    hidden, weight, b, labels, up_lp, up_ent = _make(dtype, bias, seed)
    transform = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale)
    valid = labels != -100

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)] + ([b.clone().requires_grad_()] if bias else [])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = linear_token_stats(
        leaves[0], leaves[1], labels, bias=leaves[2] if bias else None, outputs=("entropy",) if entropy else (),
        impl=impl, backend_options=options, **transform,
    )
    loss = (stats.logprobs * up_lp).sum() + ((stats.entropy * up_ent).sum() if entropy else 0.0)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert stats.logprobs.dtype == torch.float32 and stats.logprobs.shape == (N,)
    assert not stats.logprobs[~valid].any()

    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in leaves]
    lp, ent = _reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, labels, dtype=ref_dtype, **transform)
    ((lp * up_lp.to(ref_dtype)).sum() + ((ent * up_ent.to(ref_dtype)).sum() if entropy else 0.0)).backward()

    errors = {
        "logprobs": _rel(stats.logprobs[valid], lp[valid]),
        "max_abs_logprob": float((stats.logprobs[valid].double() - lp[valid].double()).abs().max()),
        "grad_hidden": _rel(leaves[0].grad, ref_leaves[0].grad),
        "grad_weight": _rel(leaves[1].grad, ref_leaves[1].grad),
    }
    if entropy:
        errors["entropy"] = _rel(stats.entropy[valid], ent[valid])
    if bias:
        errors["grad_bias"] = _rel(leaves[2].grad, ref_leaves[2].grad)
    assert leaves[0].grad.dtype == dtype and leaves[1].grad.dtype == dtype
    label = f"{impl} {str(dtype).replace('torch.', '')} bias={bias} softcap={softcap} T={temperature} s={logit_scale} entropy={entropy} options={options or {}}"
    print(f"\n[{label}] {seconds * 1e3:.0f} ms (first call includes compilation): " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    return errors


# --- the torch backend ---------------------------------------------------------------------------

TORCH_CASES = [
    dict(),
    dict(bias=True, softcap=10.0, entropy=True),
    dict(bias=True, temperature=0.7, logit_scale=1.3, entropy=True),
    dict(bias=True, softcap=10.0, temperature=0.7, logit_scale=1.3, entropy=True, options={"memory_budget": 4 * 2**20}),
    # The losses' row-scaled backward (log-probs only, no bias), scaled, over several token blocks.
    dict(temperature=0.7, logit_scale=1.3, options={"memory_budget": 4 * 2**20}),
]


@pytest.mark.parametrize("kwargs", TORCH_CASES)
def test_torch_bf16(kwargs):
    errors = _case("torch", torch.bfloat16, **kwargs)
    assert errors["logprobs"] < 1e-5, errors
    for key in ("grad_hidden", "grad_weight", "grad_bias", "entropy"):
        if key in errors:
            assert errors[key] < TORCH_BF16_GRAD_TOL, (key, errors)


@pytest.mark.parametrize("kwargs", TORCH_CASES[:2] + TORCH_CASES[3:])
def test_torch_fp32_vs_fp64(kwargs):
    errors = _case("torch", torch.float32, ref_dtype=torch.float64, **kwargs)
    for key, value in errors.items():
        if key != "max_abs_logprob":
            assert value < 1e-5, (key, errors)


def test_torch_all_ignored_on_cuda():
    _empty_batch("torch", bias=True)


# The cases above run the torch backend's default on CUDA: its tiles compiled by torch.compile when Triton is
# installed (`align_losses.ops.tiles.compiled_tiles`). These name the mode, at the same moderate shape.
ALL_ON = dict(bias=True, softcap=10.0, temperature=0.7, logit_scale=1.3, entropy=True)


@pytest.mark.parametrize("compile_tiles", [True, False], ids=["compiled", "eager"])
def test_torch_tiles_fp32_vs_fp64(compile_tiles):
    """Compiled and eager tiles against float64 full logits, several vocabulary blocks (4 MiB budget)."""
    options = {"compile_tiles": compile_tiles, "memory_budget": 4 * 2**20}
    errors = _case("torch", torch.float32, ref_dtype=torch.float64, options=options, **ALL_ON)
    for key, value in errors.items():
        if key != "max_abs_logprob":
            assert value < 1e-5, (key, errors)


def test_torch_compiled_tiles_bf16_without_recompiling():
    """bf16 through the compiled tiles, default budget, then other sizes (a smaller budget, fewer tokens) with
    no new graph: the tile functions are compiled with dynamic shapes."""
    from torch._dynamo.utils import counters

    from align_losses.ops.tiles import compiled_tiles

    assert compiled_tiles(None, torch.device("cuda")), "Triton is installed: the default compiles the tiles"
    errors = _case("torch", torch.bfloat16, options={"compile_tiles": True}, **ALL_ON)
    assert errors["logprobs"] < 1e-5, errors
    for key in ("grad_hidden", "grad_weight", "grad_bias", "entropy"):
        assert errors[key] < TORCH_BF16_GRAD_TOL, (key, errors)
    before = counters["stats"]["unique_graphs"]
    _case("torch", torch.bfloat16, options={"compile_tiles": True, "memory_budget": 3 * 2**20}, seed=1, **ALL_ON)
    assert counters["stats"]["unique_graphs"] == before


# --- cce -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(softcap=10.0), dict(options={"filter_eps": "high"})],
    ids=["plain", "softcap", "filter_eps_high"],
)
def test_cce_bf16(kwargs):
    _skip_unavailable("cce")
    errors = _case("cce", torch.bfloat16, **kwargs)
    assert errors["logprobs"] < 1e-3, errors
    bound = 1.0 if "options" in kwargs else KERNEL_LIB_TOL  # filtering drops gradient: only record it
    for key in ("grad_hidden", "grad_weight"):
        assert errors[key] < bound, (key, errors)


def test_cce_all_ignored():
    _skip_unavailable("cce")
    _empty_batch("cce", bias=False)


# --- liger ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(bias=True, softcap=10.0),
        dict(bias=True, options={"accum_fp32": False}),
        dict(entropy=True, temperature=0.7, logit_scale=1.3),
    ],
    ids=["flce", "flce_bias_softcap", "flce_bf16_accum", "scaled_entropy_temperature"],
)
def test_liger_bf16(kwargs):
    _skip_unavailable("liger")
    from align_losses.backends import liger

    errors = _case("liger", torch.bfloat16, **kwargs)
    if kwargs.get("entropy"):
        print(f"liger 'scaled' ran kernel: {liger.LAST_SCALED_KERNEL}")
    assert errors["logprobs"] < 1e-2, errors
    for key in ("grad_hidden", "grad_weight", "grad_bias", "entropy"):
        if key in errors:
            assert errors[key] < KERNEL_LIB_TOL, (key, errors)


def test_liger_flce_fp32():
    _skip_unavailable("liger")
    errors = _case("liger", torch.float32, bias=True, softcap=10.0, ref_dtype=torch.float64)
    for key, value in errors.items():
        if key != "max_abs_logprob":
            assert value < 1e-4, (key, errors)


def test_liger_all_ignored():
    _skip_unavailable("liger")
    _empty_batch("liger", bias=True)


def _empty_batch(impl, bias):
    hidden, weight, b, labels, _, _ = _make(torch.bfloat16, bias, n=64, v=1003, d=64, n_ignored=0)
    labels.fill_(-100)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)] + ([b.clone().requires_grad_()] if bias else [])
    stats = linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None, outputs=(), impl=impl)
    assert stats.logprobs.shape == (64,) and not stats.logprobs.any()
    stats.logprobs.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and not leaf.grad.any()


# --- a head past 2^31 logits: the torch backend ----------------------------------------------------


def test_torch_large_vocab_past_int32():
    """32768 tokens x 151936 vocabulary (4.98e9 logits > 2^31), D=256, bf16: runs, matches, no N x V buffer."""
    n, d, v = 32768, 256, 151936
    assert n * v > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (0.2 * torch.randn(v, d, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[:: 97] = -100
    up = torch.randn(n, device="cuda", generator=g) * (0.5 + torch.rand(n, device="cuda", generator=g))

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    stats = linear_token_stats(hidden, weight, labels, outputs=("entropy",), impl="torch")
    ((stats.logprobs * up).sum() + stats.entropy.sum()).backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    nv_bf16 = n * v * 2

    rows = torch.randperm(n, device="cuda", generator=g)[:64]
    rows = rows[labels[rows] != -100]
    h = hidden.detach()[rows].float().requires_grad_()
    lp, ent = _reference(h, weight.detach().float(), None, labels[rows])
    ((lp * up[rows]).sum() + ent.sum()).backward()  # a row's hidden gradient depends on that row only
    err_lp = _rel(stats.logprobs[rows], lp)
    err_ent = _rel(stats.entropy[rows], ent)
    err_gh = _rel(hidden.grad[rows], h.grad)
    print(
        f"\n[torch large N={n} V={v} D={d}] fwd+bwd {seconds:.2f} s; peak extra memory {peak / 2**30:.2f} GiB "
        f"(an N x V bf16 tensor is {nv_bf16 / 2**30:.1f} GiB); sampled rows: logprobs {err_lp:.2e}, "
        f"entropy {err_ent:.2e}, grad_hidden {err_gh:.2e}"
    )
    assert torch.isfinite(stats.logprobs).all() and torch.isfinite(weight.grad.float()).all()
    assert err_lp < 1e-5 and err_ent < 1e-4 and err_gh < TORCH_BF16_GRAD_TOL
    assert peak < nv_bf16 / 4, f"peak {peak / 2**30:.2f} GiB suggests an N x V buffer"


def _with_waits_counted(monkeypatch, fn):
    """``(fn(), the synchronising calls CUDA's sync debug mode reported, the CUDA event waits)`` of one call of
    ``fn``, after the GPU's queue has drained."""
    import warnings

    torch.cuda.synchronize()
    waits = []
    event_wait = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda event: waits.append(event) or event_wait(event))
    mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", event_wait)
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    return result, syncs, len(waits)


def test_torch_backward_syncs_once_and_is_deterministic(monkeypatch):
    """The "torch" backend's backward over several vocabulary blocks with one label on a third of the
    tokens: one wait for the device in all (the labelled rows' block bounds, not one per tile or block), and
    that on an event after their copy, not on the stream (no synchronising call that CUDA's sync debug mode
    reports), and the same gradients bit for bit on a second run (repeated labels summed in a fixed order)."""
    from align_losses.problem import HeadProblem, LogitTransform
    from align_losses.ops.tiled_head import tiled_head

    g = torch.Generator(device="cuda").manual_seed(9)
    m, d, v = 701, 96, 3001
    hidden = torch.randn(m, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (0.2 * torch.randn(v, d, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (m,), device="cuda", generator=g)
    labels[::3] = 1234
    up = torch.randn(m, device="cuda", generator=g)
    problem = HeadProblem(hidden=hidden, weight=weight, bias=None, labels=labels, transform=LogitTransform(),
                          outputs=frozenset({"logprobs"}))

    def grads():
        out = tiled_head(problem, memory_budget=256 * 1024 * 16, token_block=256)  # 3 token blocks in the backward
        return torch.autograd.grad((out["logprobs"] * up).sum(), (hidden, weight))

    # A first call compiles the tile functions, after which the compiled walks are wider (`Tiling.for_option`):
    # the two runs compared take the same walks, run alone or after other tests.
    grads()
    first = grads()
    second, syncs, waits = _with_waits_counted(monkeypatch, grads)
    assert syncs == [] and waits == 1, (syncs, waits)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_torch_weight_rows_written_in_place(monkeypatch):
    """bf16 with all tokens in one block: each vocabulary block's weight-gradient GEMM writes its rows in bf16 itself
    (no fp32 block, no cast: `align_losses.ops.weight_rows.rows_in_place`) and the labelled rows are made again in
    fp32 with their label terms. The gradients are within one bf16 step of the fp32 block's path everywhere, rows
    whose product and label terms cancel included (pairs of tokens with one hidden state and one upstream gradient,
    one labelled ``l``, the other putting half its probability on ``l``); the backward waits for the device once, on
    an event, and gives the same gradients bit for bit again; the GEMM precision settings are left as they were."""
    from align_losses.ops import gemm, tiled_head, weight_rows
    from align_losses.problem import HeadProblem, LogitTransform

    g = torch.Generator(device="cuda").manual_seed(21)
    m, d, v, pairs = 509, 128, 5003, 100
    hidden = torch.randn(m, d, device="cuda", generator=g)
    up = torch.randn(m, device="cuda", generator=g) * 2 + 0.5
    labels = torch.randperm(v - 500, device="cuda", generator=g)[:m]  # distinct; the last 500 ids get none
    hidden[pairs : 2 * pairs], up[pairs : 2 * pairs] = hidden[:pairs], up[:pairs]
    hidden[: 2 * pairs, d // 2 :] = 0
    hidden[2 * pairs :, : d // 2] = 0
    hidden = hidden.bfloat16()
    weight = 0.1 * torch.randn(v, d, device="cuda", generator=g)
    weight[labels[: 2 * pairs]] = 0.25 * hidden[: 2 * pairs].float()  # a pair's two labels: p ~ 1/2 each
    weight = weight.bfloat16()
    settings = torch._C._get_cublas_allow_bf16_reduced_precision_reduction()  # with its split-K part, where it has one
    inside = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: inside.append(torch.backends.cuda.matmul
                                                                   .allow_bf16_reduced_precision_reduction)
                        or real_mm(*a, **k))

    def grads(in_place: bool = True):
        monkeypatch.setattr(gemm, "writes_bf16", lambda a: in_place)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        problem = HeadProblem(hidden=h, weight=w, bias=None, labels=labels, transform=LogitTransform(),
                              outputs=frozenset({"logprobs"}))
        out = tiled_head.tiled_head(problem, memory_budget=16 * m * 1024, token_block=m)
        return torch.autograd.grad((out["logprobs"] * up).sum(), (h, w))

    grads()  # compiles the tile functions, after which the walks are wider: the runs compared take the same
    written = []
    real_write = weight_rows.write_rows
    monkeypatch.setattr(weight_rows, "write_rows", lambda out, *a: written.append(out.shape[0]) or real_write(out, *a))
    fp32_h, fp32_w = grads(in_place=False)
    assert not written
    first = grads()
    assert len(written) >= 2 and sum(written) == v
    second, syncs, waits = _with_waits_counted(monkeypatch, grads)
    assert syncs == [] and waits == 1, (syncs, waits)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(first[0], fp32_h)
    steps = bf16_ulps(first[1], fp32_w)
    assert steps.max() <= 1, steps.max()
    assert settings == torch._C._get_cublas_allow_bf16_reduced_precision_reduction()
    assert False in inside  # the in-place GEMMs ran without reduced-precision reductions
    p = torch.softmax(hidden.double() @ weight.double().t(), dim=1)
    assert (p[:pairs, labels[:pairs]].diagonal() - 0.5).abs().max() < 0.1  # the pairs' rows cancel
