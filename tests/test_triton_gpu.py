"""The ``"triton"`` backend against float64 full-logits references.

GPU tests are marked ``gpu`` and skipped without CUDA. The same checks run on the CPU in the
Triton interpreter (small sizes, small tiles) when the environment sets ``TRITON_INTERPRET=1``
and Triton is installed: ``TRITON_INTERPRET=1 pytest tests/test_triton_gpu.py -k interp``.
"""

from __future__ import annotations

import math

import pytest
import torch

from align_losses.problem import HeadProblem, LogitTransform
from tests.triton_markers import HAS_TRITON, gpu, interp

DIFF = ("logprobs", "entropy", "mean_logit", "logsumexp")
ALL = ("logprobs", "entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2")


def rel(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    """``||a - b|| / ||b||`` in float64, over chunks of ``chunk`` elements: a float64 copy of a whole
    gradient past 2^31 elements would take 16 GiB or more at once."""
    a, b = a.reshape(-1), b.reshape(-1)
    diff = ref = 0.0
    for i in range(0, b.numel(), chunk):
        x, y = a[i : i + chunk].double(), b[i : i + chunk].double()
        diff += float((x - y).square().sum())
        ref += float(y.square().sum())
    return math.sqrt(diff) / max(math.sqrt(ref), 1e-30)


def reference(hidden, weight, bias, labels, transform: LogitTransform):
    """All outputs in float64 from full logits (differentiable through the float64 copies)."""
    a = hidden @ weight.t()
    if bias is not None:
        a = a + bias
    z = a * transform.logit_scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    z = z / transform.temperature
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    return {
        "logprobs": logp_all.gather(1, labels[:, None]).squeeze(1),
        "entropy": -(p * logp_all).sum(1),
        "mean_logit": z.mean(1),
        "logsumexp": torch.logsumexp(z, 1),
        "argmax_hit": (z.argmax(1) == labels).double(),
        "log_sum_p2": torch.log((p * p).sum(1)),
        "_z": z,
    }


def make(m, d, v, dtype, device, std=2.0, with_bias=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(m, d, generator=g, device=device)
    weight = torch.randn(v, d, generator=g, device=device) * (std / math.sqrt(d))
    bias = torch.randn(v, generator=g, device=device) * 0.5 if with_bias else None
    labels = torch.randint(0, v, (m,), generator=g, device=device)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)
    return cast(hidden), cast(weight), cast(bias), labels.to(device)


def run_triton(hidden, weight, bias, labels, transform, outputs, small_tiles=False, memory_budget=None, shard=None):
    from align_losses.ops import triton_head as th

    problem = HeadProblem(hidden=hidden, weight=weight, bias=bias, labels=labels, transform=transform,
                          outputs=frozenset(("logprobs", *outputs)), shard=shard)
    kw = {}
    if small_tiles:
        # persistent: a few programs walk many tiles (4 programs in the interpreter, one per SM on a GPU)
        tiles = th.KernelConfig(16, 32, 16, 2, 4, 2, persistent=True)
        kw = dict(fwd_config=tiles, bwd_config=tiles)
    return th.triton_head(problem, memory_budget=memory_budget, **kw)


def check(m, d, v, dtype, device, transform=LogitTransform(), with_bias=False, outputs=ALL, std=2.0,
          small_tiles=False, memory_budget=None, seed=0, tol=None):
    hidden, weight, bias, labels = make(m, d, v, dtype, device, std, with_bias, seed)
    got = run_triton(hidden, weight, bias, labels, transform, outputs, small_tiles, memory_budget)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    rh, rw = ref_leaves[0], ref_leaves[1]
    rb = ref_leaves[2] if with_bias else None
    ref = reference(rh, rw, rb, labels, transform)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ups = {n: torch.randn(m, generator=g).to(device) * (1 + torch.rand(m, generator=g).to(device) * 3) for n in DIFF}
    val_tol = 1e-5 if dtype == torch.float32 else 1e-5
    grad_tol = tol or (1e-4 if dtype == torch.float32 else 3e-3)
    errs = {}
    for n in ("logprobs", *outputs):
        assert got[n].dtype == torch.float32 and got[n].shape == (m,)
        assert torch.isfinite(got[n]).all(), n
        if n == "argmax_hit":  # compared where the top two logits are apart by more than rounding
            top2 = ref["_z"].detach().topk(2, dim=1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp_min(1.0)
            assert torch.equal(got[n].double()[clear], ref[n][clear]), "argmax_hit"
            continue
        errs[n] = rel(got[n], ref[n])
        assert errs[n] < (val_tol if n != "log_sum_p2" else 1e-4), (n, errs[n])
    loss = sum((got[n] * ups[n]).sum() for n in DIFF if n in got)
    ref_loss = sum((ref[n] * ups[n].double()).sum() for n in DIFF if n in got)
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, gg, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert gg.dtype == dtype and gg.shape == rg.shape
        errs["grad_" + name] = rel(gg, rg)
        assert errs["grad_" + name] < grad_tol, (name, errs["grad_" + name])
    return errs


# ------------------------------------------------------------------------------ interpreter (CPU)

TRANSFORMS = [
    LogitTransform(),
    LogitTransform(softcap=3.0),
    LogitTransform(logit_scale=0.7, temperature=1.3),
    LogitTransform(logit_scale=1.5, softcap=5.0, temperature=0.8),
]


@interp
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_interp_fp32_all_outputs(transform, with_bias):
    check(37, 40, 150, torch.float32, "cpu", transform, with_bias, small_tiles=True, memory_budget=37 * 64 * 4)


@interp
@pytest.mark.parametrize("outputs", [(), ("entropy",), ("mean_logit",), ("logsumexp",), ("entropy", "logsumexp")])
def test_interp_output_subsets(outputs):
    check(21, 33, 97, torch.float32, "cpu", LogitTransform(softcap=4.0), True, outputs=outputs, small_tiles=True)


@interp
def test_interp_bf16():
    # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), doubling the error of
    # the dL/da tiles: hence the looser bound here.
    check(40, 48, 130, torch.bfloat16, "cpu", LogitTransform(softcap=6.0), True, small_tiles=True,
          memory_budget=40 * 64 * 2, tol=6e-3)


@interp
def test_interp_argmax_ties():
    argmax_ties("cpu", small_tiles=True)


@interp
def test_interp_empty_tokens():
    empty_tokens("cpu", small_tiles=True)


@interp
def test_interp_entropy_under_a_common_logit_offset():
    entropy_offset("cpu", small_tiles=True)


def entropy_offset(device, small_tiles=False, m=45, d=40, v=700):
    """A bias common to the whole vocabulary: the entropy and its gradient stay within the fp32
    rounding of the logits themselves (summing ``e^(z - max) z`` per block, as before, gave 3.5e-3
    at -3000). 700 columns: several vocabulary blocks, merged in more than one combine step."""
    for offset in (500.0, -3000.0):
        hidden, weight, bias, labels = make(m, d, v, torch.float32, device, with_bias=True, seed=3)
        with torch.no_grad():
            bias += offset
        got = run_triton(hidden, weight, bias, labels, LogitTransform(), ("entropy",), small_tiles)["entropy"]
        rh = hidden.detach().double().requires_grad_(True)
        ref = reference(rh, weight.detach().double(), bias.detach().double(), labels, LogitTransform())["entropy"]
        assert float((got.double() - ref).abs().max()) < 2e-6 + 6e-8 * abs(offset), offset
        up = torch.randn(m, generator=torch.Generator().manual_seed(1)).to(device)
        gh = torch.autograd.grad((got * up).sum(), hidden)[0]
        rgh = torch.autograd.grad((ref * up.double()).sum(), rh)[0]
        assert rel(gh, rgh) < 1e-5 + 6e-8 * abs(offset), offset


@interp
def test_interp_vocabulary_tail_masked_by_a_minus_inf_bias():
    masked_tail("cpu", small_tiles=True)


def masked_tail(device, small_tiles=False, m=37, d=40, v=700, keep=300):
    """Ids from ``keep`` on get a bias of -inf: outputs and gradients equal those of the head without
    them (whole vocabulary blocks of -inf gave NaN log-probs), and their rows get no gradient."""
    hidden, weight, bias, labels = make(m, d, v, torch.float32, device, with_bias=True, seed=4)
    labels = labels % keep
    with torch.no_grad():
        bias[keep:] = -float("inf")
    outputs = ("entropy", "logsumexp", "log_sum_p2")
    got = run_triton(hidden, weight, bias, labels, LogitTransform(), outputs, small_tiles)
    leaves = [hidden, weight, bias]
    ref_leaves = [t.detach()[:keep] if i else t.detach() for i, t in enumerate(leaves)]
    ref_leaves = [t.double().requires_grad_(True) for t in ref_leaves]
    ref = reference(*ref_leaves, labels, LogitTransform())
    for n in ("logprobs", *outputs):
        assert rel(got[n], ref[n]) < 1e-5, n
    ups = {n: torch.randn(m, generator=torch.Generator().manual_seed(i)).to(device) for i, n in enumerate(DIFF)}
    names = ("logprobs", "entropy", "logsumexp")
    grads = torch.autograd.grad(sum((got[n] * ups[n]).sum() for n in names), leaves)
    ref_grads = torch.autograd.grad(sum((ref[n] * ups[n].double()).sum() for n in names), ref_leaves)
    assert rel(grads[0], ref_grads[0]) < 1e-4
    for gg, rg in zip(grads[1:], ref_grads[1:]):
        assert torch.count_nonzero(gg[keep:]) == 0
        assert rel(gg[:keep], rg) < 1e-4


def argmax_ties(device, small_tiles=False, dtype=torch.float32, m=24, d=32, v=150):
    hidden, weight, bias, labels = make(m, d, v, dtype, device, with_bias=True)
    with torch.no_grad():
        dup = (7, 70, 149) if v > 149 else (7, v - 1)
        for j in dup[1:]:
            weight[j] = weight[dup[0]]
        bias[list(dup)] = 40.0
    labels = labels.clone()
    labels[: m // 3] = dup[0]
    labels[m // 3 : 2 * m // 3] = dup[1]
    got = run_triton(hidden, weight, bias, labels, LogitTransform(), ("argmax_hit",), small_tiles)
    want = torch.zeros(m, device=device)
    want[: m // 3] = 1.0
    assert torch.equal(got["argmax_hit"], want)


def empty_tokens(device, small_tiles=False):
    hidden, weight, bias, _ = make(0, 16, 50, torch.float32, device, with_bias=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    got = run_triton(hidden, weight, bias, labels, LogitTransform(), ALL, small_tiles)
    for n in ALL:
        assert got[n].shape == (0,) and got[n].dtype == torch.float32
    loss = got["logprobs"].sum() + got["entropy"].sum()
    gh, gw, gb = torch.autograd.grad(loss, (hidden, weight, bias))
    assert gh.shape == (0, 16) and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


def confident_labels(device, dtype, small_tiles=False, memory_budget=None, tol=1e-4, m=48, d=40, v=300):
    """Each token's label logit far above the rest (p_label near 1). 25 above: the log-probs stay
    <= 0, which holds only while the label logit and the logsumexp come from the same logits. 10
    above: the gradients (the label entry ``g (1 - p_label)`` from the forward's label logit, the
    row's other entries from the recomputed tiles) match float64."""
    for margin in (25.0, 10.0):
        g = torch.Generator(device="cpu").manual_seed(5)
        hidden = torch.randn(m, d, generator=g)
        labels = torch.randperm(v, generator=g)[:m]
        weight = torch.randn(v, d, generator=g) * (2.0 / math.sqrt(d))
        weight[labels] = hidden * (margin / hidden.pow(2).sum(1, keepdim=True)) + weight[labels] * 0.1
        hidden, weight = (t.to(device=device, dtype=dtype).requires_grad_(True) for t in (hidden, weight))
        labels = labels.to(device)
        got = run_triton(hidden, weight, None, labels, LogitTransform(), (), small_tiles, memory_budget)["logprobs"]
        assert (got <= 0).all(), (margin, got.max())
        if margin > 20:  # 1 - p_label is below fp32 resolution there: the gradients are rounding noise
            continue
        rh, rw = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
        ref = reference(rh, rw, None, labels, LogitTransform())["logprobs"]
        up = torch.randn(m, generator=g).to(device) + 2.0
        grads = torch.autograd.grad((got * up).sum(), (hidden, weight))
        ref_grads = torch.autograd.grad((ref * up.double()).sum(), (rh, rw))
        for name, gg, rg in zip(("hidden", "weight"), grads, ref_grads):
            assert rel(gg, rg) < tol, (name, rel(gg, rg))


@interp
def test_interp_confident_labels():
    confident_labels("cpu", torch.float32, small_tiles=True, memory_budget=48 * 64 * 4)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_fp32_all_outputs(transform, with_bias):
    # odd sizes: no dimension a multiple of any block; several backward vocabulary chunks
    check(301, 200, 1234, torch.float32, "cuda", transform, with_bias, memory_budget=301 * 512 * 4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("std", [2.0, 8.0])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gpu_bf16(std, transform):
    check(517, 264, 3001, torch.bfloat16, "cuda", transform, True, std=std, memory_budget=517 * 1024 * 2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("std", [2.0, 8.0])
def test_gpu_bf16_many_tiles_per_program(std):
    # the default (persistent) 16-bit configs with more tiles than SMs: each program walks several
    # tiles in the forward and in every backward chunk (last chunk partial)
    check(1100, 264, 9001, torch.bfloat16, "cuda", LogitTransform(softcap=20.0), True, std=std,
          memory_budget=1100 * 8192 * 2)  # chunks of 8192 columns (288 tiles) and 809 (36 tiles)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the backend's host code imports it)")
@pytest.mark.parametrize("how,want", [("legacy allow_tf32", "tf32"), ("new API, tf32", "tf32"),
                                      ("new API, ieee", "ieee"), ("default", "ieee")])
def test_fp32_dot_precision_follows_either_tf32_api(how, want, monkeypatch):
    """fp32 operands multiply as PyTorch's CUDA matmuls would, whichever API set TF32. Since torch 2.9, reading the
    legacy ``allow_tf32`` raises once TF32 was set through the new one, as transformers' TrainingArguments does
    under ``torch_compile``: this asked for the legacy flag and raised there (CPU check: only host settings)."""
    from align_losses.ops import triton_shared

    monkeypatch.setattr(triton_shared, "interpreting", lambda: False)
    if how.startswith("new API") and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    # Each setting is undone through the API that made it: undoing a legacy one through the new API leaves torch
    # refusing legacy reads (the mix it warns about) for the rest of the process.
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision) if how.startswith("new API") else None
    try:
        if how == "legacy allow_tf32":
            monkeypatch.setattr(matmul, "allow_tf32", True)
        elif saved is not None:  # the global setting, and the matmuls' own, which overrides it once set
            torch.backends.fp32_precision = matmul.fp32_precision = want
        assert triton_shared.dot_prec(torch.float32) == want
        assert triton_shared.dot_prec(torch.bfloat16) == "ieee"
    finally:
        if saved is not None:
            torch.backends.fp32_precision, matmul.fp32_precision = saved


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_gpu_confident_labels(dtype, tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    # TF32: 2.4e-3 measured on an H200 (the tensor cores drop the low mantissa bits); the bug this
    # guards against (a label logit more exact than the logsumexp's tiles) gave 7.4e-2 there.
    tol = 3e-3 if dtype == torch.bfloat16 else (5e-3 if tf32 else 1e-4)
    confident_labels("cuda", dtype, memory_budget=300 * 512 * 4, tol=tol, m=300, d=264, v=3001)


def scratch_chunks(device, dtype, monkeypatch, small_tiles, m, d, v, memory_budget, std=2.0, tol=None,
                   min_scratch=2):
    """Backward chunks whose dL/da lives in the weight gradient's unwritten rows (`chunk_plan`), then
    the buffer's, against float64; then with a frozen weight, which has no rows to lend."""
    from align_losses.ops import triton_head as th

    scratch_starts, chunks = [], []
    real_rows, real_mm = th._scratch_rows, th.mm_into
    monkeypatch.setattr(th, "_scratch_rows", lambda g, row, *a: scratch_starts.append(row) or real_rows(g, row, *a))
    monkeypatch.setattr(th, "mm_into", lambda acc, da, *a: chunks.append(da.shape[1]) or real_mm(acc, da, *a))
    transform = LogitTransform(softcap=5.0)
    check(m, d, v, dtype, device, transform, True, outputs=("entropy",), std=std, small_tiles=small_tiles,
          memory_budget=memory_budget, tol=tol)
    assert len(scratch_starts) >= min_scratch and len(chunks) > len(scratch_starts), (scratch_starts, chunks)
    assert sum(chunks) == v

    scratch_starts.clear()
    hidden, weight, bias, labels = make(m, d, v, dtype, device, std, True, seed=3)
    weight.requires_grad_(False)
    got = run_triton(hidden, weight, bias, labels, transform, (), small_tiles, memory_budget)["logprobs"]
    up = torch.randn(m, device=device)
    grads = torch.autograd.grad((got * up).sum(), (hidden, bias))
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, bias)]
    ref = reference(leaves[0], weight.double(), leaves[1], labels, transform)["logprobs"]
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), leaves)
    assert scratch_starts == []
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < (tol or (1e-4 if dtype == torch.float32 else 3e-3))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 65])
def test_interp_scratch_chunks(dtype, d, monkeypatch):
    # 32-column tiles, a 64-column buffer: chunks of 352 and 96 columns in the weight gradient's
    # later rows, then 52 in the buffer (bf16 looser: the interpreter truncates); with D 65 the
    # scratch's start is rounded up to 64 elements, past the chunk's own rows
    elem = torch.empty((), dtype=dtype).element_size()
    scratch_chunks("cpu", dtype, monkeypatch, True, 24, d, 500, 24 * 64 * elem,
                   tol=None if dtype == torch.float32 else 6e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,std", [(torch.bfloat16, 2.0), (torch.bfloat16, 8.0), (torch.float32, 2.0)])
def test_gpu_scratch_chunks(dtype, std, monkeypatch):
    # a 512-column buffer: 3840 and 768 columns in the weight gradient's later rows (TMA in 16-bit),
    # then 392 in the buffer
    elem = torch.empty((), dtype=dtype).element_size()
    scratch_chunks("cuda", dtype, monkeypatch, False, 300, 1024, 5000, 300 * 512 * elem, std=std)


@pytest.mark.gpu
@gpu
def test_gpu_scratch_chunks_default_budget(monkeypatch):
    # the default buffer (8k columns here) and widths trimmed to fill the last wave: one scratch chunk
    scratch_chunks("cuda", torch.bfloat16, monkeypatch, False, 6144, 2048, 40000, None, min_scratch=1)


@pytest.mark.gpu
@gpu
def test_gpu_entropy_under_a_common_logit_offset():
    entropy_offset("cuda")


@pytest.mark.gpu
@gpu
def test_gpu_vocabulary_tail_masked_by_a_minus_inf_bias():
    masked_tail("cuda")


@pytest.mark.gpu
@gpu
def test_gpu_fp16():
    check(300, 128, 2000, torch.float16, "cuda", LogitTransform(softcap=10.0), True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("outputs", [(), ("entropy",), ("mean_logit", "logsumexp")])
def test_gpu_output_subsets(outputs):
    check(257, 96, 1500, torch.bfloat16, "cuda", LogitTransform(), False, outputs=outputs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_argmax_ties(dtype):
    argmax_ties("cuda", dtype=dtype, m=300, d=64, v=1000)


@pytest.mark.gpu
@gpu
def test_gpu_empty_tokens():
    empty_tokens("cuda")


@pytest.mark.gpu
@gpu
def test_gpu_through_core():
    """End to end through `linear_token_stats` (ignore_index, shift), when "triton" is registered."""
    from align_losses import backends, linear_token_stats

    if "triton" not in backends.names():
        pytest.skip("backend 'triton' not registered")
    hidden, weight, bias, labels = make(2 * 50, 64, 777, torch.bfloat16, "cuda", with_bias=True)
    labels = labels.view(2, 50).clone()
    labels[:, :10] = -100
    h = hidden.view(2, 50, 64)
    kw = dict(outputs=("entropy", "mean_logit", "logsumexp"), bias=bias, shift=True, softcap=8.0)
    a = linear_token_stats(h, weight, labels, impl="triton", **kw)
    b = linear_token_stats(h, weight, labels, impl="torch", **kw)
    for n in ("logprobs", "entropy", "mean_logit", "logsumexp"):
        assert rel(getattr(a, n), getattr(b, n)) < 1e-5, n
    la = sum(getattr(a, n).sum() for n in ("logprobs", "entropy"))
    lb = sum(getattr(b, n).sum() for n in ("logprobs", "entropy"))
    ga = torch.autograd.grad(la, (hidden, weight, bias))
    gb = torch.autograd.grad(lb, (hidden, weight, bias))
    for x, y in zip(ga, gb):
        assert rel(x, y) < 5e-3


def _chunked_reference(hidden, weight, labels, ups, chunk=4096):
    """fp32 per-token logprobs/lse and grads, chunked over tokens (for sizes past 2^31 elements)."""
    m = hidden.shape[0]
    lp = torch.empty(m, device=hidden.device)
    gh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
    w = weight.float()
    for t0 in range(0, m, chunk):
        h = hidden[t0 : t0 + chunk].float()
        z = h @ w.t()
        lse = torch.logsumexp(z, 1)
        lp[t0 : t0 + chunk] = z.gather(1, labels[t0 : t0 + chunk, None]).squeeze(1) - lse
        gz = torch.softmax(z, 1).mul_(-ups[t0 : t0 + chunk, None])
        gz[torch.arange(h.shape[0], device=h.device), labels[t0 : t0 + chunk]] += ups[t0 : t0 + chunk]
        gh[t0 : t0 + chunk] = gz @ w
        gw += gz.t() @ h
        del z, gz
    return lp, gh, gw


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(16384, 64, 140_000), (2_200_000, 1024, 320)])
def test_gpu_past_int32(shape):
    """M x V (first) and M x D (second) past 2^31 elements."""
    m, d, v = shape
    hidden, weight, _, labels = make(m, d, v, torch.bfloat16, "cuda", std=4.0)
    ups = torch.randn(m, device="cuda")
    got = run_triton(hidden, weight, None, labels, LogitTransform(), ())
    gh, gw = torch.autograd.grad((got["logprobs"] * ups).sum(), (hidden, weight))
    lp, rgh, rgw = _chunked_reference(hidden.detach(), weight.detach(), labels, ups)
    assert rel(got["logprobs"], lp) < 1e-5
    assert rel(gh, rgh) < 3e-3
    assert rel(gw, rgw) < 3e-3


def _sharded_worker(rank, world, init_file, device, dtype, small_tiles, result_file):
    import torch.distributed as dist

    from align_losses.problem import VocabShard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m, d, v = 45, 40, 170
        transform = LogitTransform(softcap=5.0, temperature=1.2)
        hidden, weight, bias, labels = make(m, d, v, dtype, device, std=3.0, with_bias=True)
        with torch.no_grad():  # a tie across the shard boundary: the first max is on rank 0
            weight[150] = weight[20]
            bias[[20, 150]] = 30.0
            labels[:10] = 20
            labels[10:20] = 150
        bounds = [0, 100, v] if world == 2 else [0, v]
        lo, hi = bounds[rank], bounds[rank + 1]
        w_local = weight.detach()[lo:hi].clone().requires_grad_(True)
        b_local = bias.detach()[lo:hi].clone().requires_grad_(True)
        h = hidden.detach().clone().requires_grad_(True)
        got = run_triton(h, w_local, b_local, labels, transform, ALL, small_tiles,
                         shard=VocabShard(start=lo, size=v, group=dist.group.WORLD))
        rh, rw, rb = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
        ref = reference(rh, rw, rb, labels, transform)
        ups = {n: torch.linspace(-2, 3, m, device=device) * (i + 1) for i, n in enumerate(DIFF)}
        loss = sum((got[n] * ups[n]).sum() for n in DIFF)
        gh, gw, gb = torch.autograd.grad(loss, (h, w_local, b_local))
        rgh, rgw, rgb = torch.autograd.grad(sum((ref[n] * ups[n].double()).sum() for n in DIFF), (rh, rw, rb))
        errs = {n: rel(got[n], ref[n]) for n in ("logprobs", "entropy", "mean_logit", "logsumexp", "log_sum_p2")}
        errs["argmax_hit"] = float((got["argmax_hit"].double() != ref["argmax_hit"]).sum())
        errs["grad_hidden"] = rel(gh, rgh)
        errs["grad_weight"] = rel(gw, rgw[lo:hi])
        errs["grad_bias"] = rel(gb, rgb[lo:hi])
        torch.save(errs, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def sharded(device, dtype, small_tiles, tmp_path, world=2):
    import torch.multiprocessing as mp

    init_file, result = tmp_path / "init", tmp_path / "result"
    mp.spawn(_sharded_worker, args=(world, str(init_file), device, dtype, small_tiles, str(result)), nprocs=world)
    for r in range(world):
        errs = torch.load(f"{result}.{r}")
        assert errs.pop("argmax_hit") == 0
        for name, e in errs.items():
            assert e < (1e-5 if not name.startswith("grad") else 1e-4), (r, name, e)


@interp
def test_interp_vocab_parallel(tmp_path):
    sharded("cpu", torch.float32, True, tmp_path)


@pytest.mark.gpu
@gpu
def test_gpu_vocab_parallel(tmp_path):
    """Two ranks (gloo) on one GPU, each with a shard of the vocabulary."""
    sharded("cuda", torch.float32, False, tmp_path)


# ------------------------------------------------------------------ sequence-loss upstream (both)

#: An upstream gradient just under a bf16 rounding tie (1 + 2^-8): its label entry rounds to 1.0,
#: 3.8e-3 off, the same for every token of the "sequence".
SEQUENCE_UPSTREAM = 1.0038


def sequence_upstream_errors(device, impl):
    """Relative errors (vs float64) of grad_hidden and grad_weight when every token has the same log-prob
    upstream: (ours, a head that rounds the label entries to bf16 as GEMM operands)."""
    from align_losses.ops import tiled_head, triton_head

    # 0.23 labels per vocabulary row: rows with a label carry most of grad_weight's norm
    hidden, weight, _, labels = make(700, 64, 3001, torch.bfloat16, device, std=2.0, seed=3)
    problem = HeadProblem(hidden=hidden, weight=weight, bias=None, labels=labels, transform=LogitTransform(),
                          outputs=frozenset({"logprobs"}))
    if impl == "triton":
        tiles = triton_head.KernelConfig(16, 32, 16, 2, 4, 2, persistent=True) if device == "cpu" else None
        got = triton_head.triton_head(problem, memory_budget=700 * 1024 * 2, fwd_config=tiles, bwd_config=tiles)
    else:
        got = tiled_head.tiled_head(problem, memory_budget=700 * 1024 * 16)
    gh, gw = torch.autograd.grad(got["logprobs"].sum() * SEQUENCE_UPSTREAM, (hidden, weight))
    h64, w64 = hidden.detach().double(), weight.detach().double()
    # dL/da in float64, then the bf16 roundings a head without the label-entry handling would make
    da = torch.softmax(h64 @ w64.t(), dim=1) * -SEQUENCE_UPSTREAM
    da[torch.arange(700, device=device), labels] += SEQUENCE_UPSTREAM
    rgh, rgw = da @ w64, da.t() @ h64
    rounded = da.to(torch.bfloat16).double()
    naive = ((rounded @ w64).to(torch.bfloat16), (rounded.t() @ h64).to(torch.bfloat16))
    return (rel(gh, rgh), rel(gw, rgw)), (rel(naive[0], rgh), rel(naive[1], rgw))


def label_weight_rows_match_float64(device):
    """`add_label_weight_rows` against float64 math: a shard of 211 rows from id 20 (so its last row block
    reaches into the next shard's ids), labels on both sides of each edge and in other shards,
    repeated labels (one of them 112 times), odd sizes, hidden rows wider than D (a column slice);
    rows without a label and the memory on both sides of the shard untouched."""
    from align_losses.ops import triton_shared

    g = torch.Generator(device=device).manual_seed(12)
    m, d, v, offset = 301, 300, 211, 20
    hidden = torch.randn(m, d + 8, generator=g, device=device).to(torch.bfloat16)[:, :d]
    entry = torch.randn(m, generator=g, device=device)
    labels = torch.randint(0, v + 2 * offset, (m,), generator=g, device=device)
    labels[:8] = torch.tensor([offset - 1, offset, offset + v - 1, offset + v, offset + v + 3, offset + 5, offset + 5,
                               offset + 5])
    labels[8:120] = offset + 40  # one label over several of the kernel's token steps
    storage = torch.randn(8 + v + 16, d, generator=g, device=device).to(torch.bfloat16)  # guard rows both sides
    before = storage.clone()
    shard = slice(8, 8 + v)
    triton_shared.add_label_weight_rows(storage[shard], entry, hidden, labels, offset)
    local = labels - offset
    mine = (local >= 0) & (local < v)
    added = torch.zeros(v, d, dtype=torch.float64, device=device)
    added.index_add_(0, local[mine], entry[mine].double()[:, None] * hidden[mine].double())
    want = before[shard].double() + added
    got = storage[shard].double()
    labelled = torch.zeros(v, dtype=torch.bool, device=device)
    labelled[local[mine]] = True
    assert 0 < int(labelled.sum()) < v
    ulp = 2.0**-7 if device == "cpu" else 2.0**-8  # the interpreter truncates to bf16, the GPU rounds
    assert bool(((got - want).abs() <= want.abs() * ulp).all())  # fp32 sums rounded once
    assert torch.equal(storage[shard][~labelled], before[shard][~labelled])
    assert torch.equal(storage[:8], before[:8]) and torch.equal(storage[8 + v :], before[8 + v :])


@interp
def test_interp_label_weight_rows_kernel():
    label_weight_rows_match_float64("cpu")


@pytest.mark.gpu
@gpu
def test_gpu_label_weight_rows_kernel():
    label_weight_rows_match_float64("cuda")


def label_weight_rows_runs_match_float64(device, m: int, labels_from: int, frequent: float):
    """`add_label_weight_rows` with runs of one label across the kernel's blocks of sorted tokens: labels
    from a few ids (runs of every length, ending on and off block edges), one label on a ``frequent``
    share of the tokens, ``m`` below, at and past a block; twice, bit for bit the same."""
    from align_losses.ops import triton_shared

    g = torch.Generator(device=device).manual_seed(m + labels_from)
    d, v = 260, max(40, labels_from)
    hidden = torch.randn(m, d, generator=g, device=device).to(torch.bfloat16)
    entry = torch.randn(m, generator=g, device=device)
    labels = torch.randint(0, labels_from, (m,), generator=g, device=device)
    labels[torch.randperm(m, generator=g, device=device)[: int(frequent * m)]] = 3
    start = torch.randn(v, d, generator=g, device=device).to(torch.bfloat16)
    got = [start.clone(), start.clone()]
    for out in got:
        triton_shared.add_label_weight_rows(out, entry, hidden, labels, 0)
    terms = entry.double()[:, None] * hidden.double()
    want = start.double().index_add(0, labels, terms)
    # what fp32 sums may lose where a row's terms cancel: 2^-20 of its terms' magnitudes
    fp32_slack = start.double().abs().index_add(0, labels, terms.abs()) * 2.0**-20
    labelled = torch.zeros(v, dtype=torch.bool, device=device)
    labelled[labels] = True
    ulp = 2.0**-7 if device == "cpu" else 2.0**-8  # the interpreter truncates to bf16, the GPU rounds
    assert bool(((got[0].double() - want).abs() <= want.abs() * ulp + fp32_slack).all())
    assert torch.equal(got[0][~labelled], start[~labelled])
    assert torch.equal(got[0], got[1])


RUN_CASES = [(7, 3, 0.0), (32, 2, 0.0), (70, 5, 0.0), (100, 30, 0.3), (100, 40, 1.0)]


@interp
@pytest.mark.parametrize("m,labels_from,frequent", RUN_CASES)
def test_interp_label_weight_rows_runs(m, labels_from, frequent):
    label_weight_rows_runs_match_float64("cpu", m, labels_from, frequent)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,labels_from,frequent", RUN_CASES + [(24576, 151936, 0.05), (5000, 7, 0.0)])
def test_gpu_label_weight_rows_runs(m, labels_from, frequent):
    label_weight_rows_runs_match_float64("cuda", m, labels_from, frequent)


def label_rows_match_float64(device):
    """`add_label_rows` (one kernel) against float64 math: odd sizes, repeated labels, a shard
    offset with labels on both sides of each edge, labels in other shards left alone, weight rows
    wider than D (a column slice)."""
    from align_losses.ops import triton_shared

    g = torch.Generator(device=device).manual_seed(11)
    m, d, v, offset = 37, 300, 53, 20
    acc = torch.randn(m, d, generator=g, device=device)
    coef = torch.randn(m, generator=g, device=device) * 0.1
    weight = torch.randn(v, d + 24, generator=g, device=device).to(torch.bfloat16)[:, :d]
    # global ids; this shard holds [20, 73)
    labels = torch.randint(0, v + 2 * offset, (m,), generator=g, device=device)
    labels[:4] = torch.tensor([offset - 1, offset, offset + v - 1, offset + v])
    got = acc.clone()
    triton_shared.add_label_rows(got, coef, weight, labels, offset)
    local = labels - offset
    mine = (local >= 0) & (local < v)
    rows = weight.double()[local.clamp(0, v - 1)] * mine[:, None]
    want = acc.double() + coef.double()[:, None] * rows
    assert 0 < int(mine.sum()) < m
    assert rel(got, want) < 1e-6  # fp32 arithmetic
    assert torch.equal(got[~mine], acc[~mine])


@interp
def test_interp_label_rows_kernel():
    label_rows_match_float64("cpu")


@pytest.mark.gpu
@gpu
def test_gpu_label_rows_kernel():
    label_rows_match_float64("cuda")


@interp
def test_interp_sequence_upstream_label_entries():
    ours, naive = sequence_upstream_errors("cpu", "triton")
    assert min(naive) > 3e-3, naive  # the test's own premise: rounding the label entries costs that much
    assert ours[0] < 2e-3, (ours, naive)
    # The interpreter truncates the labelled rows' final cast to bf16 (3.4e-3 here, where the GPU
    # rounds to nearest): only better than rounding the label entries.
    assert ours[1] < naive[1] - 3e-4, (ours, naive)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_sequence_upstream_label_entries(impl):
    ours, naive = sequence_upstream_errors("cuda", impl)
    assert min(naive) > 3e-3, naive  # the test's own premise: rounding the label entries costs that much
    assert max(ours) < 2e-3, (ours, naive)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_vocab_chunk_fills_the_last_wave():
    from align_losses.ops.triton_head import EXTRA_BUFFER_BYTES, _wave_efficiency, vocab_chunk

    for m, d, v in [(6144, 2048, 151936), (6144, 4096, 128256), (24576, 2048, 151936), (999, 1000, 50000)]:
        widest = (m * d * 2 + EXTRA_BUFFER_BYTES) // (m * 2) // 256 * 256
        assert vocab_chunk(m, d, v, 2, 256, None) == min(widest, v)  # no SM count: the budget's width
        vc = vocab_chunk(m, d, v, 2, 256, None, sms=132)
        assert vc % 256 == 0 and 0.9 * widest <= vc <= widest
        eff = lambda w: _wave_efficiency(-(-w * d // (128 * 256)), 132)
        assert eff(vc) >= max(eff(w) for w in range(256, widest + 1, 256) if w >= 0.9 * widest) - 0.01
    # benchmarks/NOTES-triton.md, version 7: 528 tiles = 4 waves on 132 SMs; 3584 is already the best
    # of 3328 and 3584 (208 and 224 tiles over 2 waves)
    assert vocab_chunk(6144, 2048, 151936, 2, 256, None, sms=132) == 8448
    assert vocab_chunk(24576, 2048, 151936, 2, 256, None, sms=132) == 3584
    assert vocab_chunk(6144, 2048, 151936, 2, 256, 6144 * 1000 * 2, sms=132) == 768  # a budget wins


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("sms", [None, 132])
def test_chunk_plan(sms):
    from align_losses.ops.triton_head import _SCRATCH_ALIGN, chunk_plan, vocab_chunk

    g = torch.Generator().manual_seed(5)
    cases = [(m, d, v, 256, vocab_chunk(m, d, v, 2, 256, None, sms))
             for m, d, v in [(6144, 2048, 151936), (6144, 4096, 128256), (24576, 2048, 151936)]]
    for _ in range(400):  # odd sizes, buffers of a few blocks
        m, d, v = (int(x) for x in torch.randint(1, 3000, (3,), generator=g))
        block = (1, 16, 32, 256)[int(torch.randint(0, 4, (), generator=g))]
        cases.append((m, d, v, block, block * int(torch.randint(1, 6, (), generator=g))))
    used = 0
    for m, d, v, block, vc in cases:
        plan = chunk_plan(m, d, v, vc, block, sms)
        assert [c.start for c in plan] == [sum(c.width for c in plan[:i]) for i in range(len(plan))]
        assert sum(c.width for c in plan) == v and all(c.width > 0 for c in plan)
        assert not plan[-1].in_scratch  # a chunk needs rows after it
        for c in plan:
            if c.in_scratch:  # wider than the buffer, whole tiles, and inside the weight gradient
                assert c.width > vc and c.width % block == 0
                first = -(-(c.start + c.width) * d // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
                assert first + m * c.width <= v * d
            else:
                assert c.width <= vc
        used += any(c.in_scratch for c in plan)
        plain = chunk_plan(m, d, v, vc, block, sms, scratch=False)
        assert len(plain) == -(-v // vc) and not any(c.in_scratch for c in plain)
    assert used >= 100
    # benchmarks/NOTES-triton.md, version 12: 10 chunks instead of 18 at the Qwen3-1.7B shape on 132 SMs
    if sms:
        assert len(chunk_plan(6144, 2048, 151936, cases[0][4], 256, sms)) == 10
