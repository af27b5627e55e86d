"""The ``"triton"`` backend's filtering backward (``backend_options={"filter_mass": ...}``).

The slot layout is pure PyTorch and runs everywhere. The block selection and the kernels are
checked against float64 full-logits gradients whose ``dL/da`` is zeroed outside the pairs the op
kept: on a GPU (marked ``gpu``) and in the Triton interpreter on the CPU
(``TRITON_INTERPRET=1 pytest tests/test_triton_filter.py -k interp``).
"""

from __future__ import annotations

import math

import pytest
import torch

from align_losses.problem import HeadProblem, LogitTransform
from align_losses.backends.triton import DEFAULT_FILTER_MASS, filter_mass
from align_losses.ops.slots import Slots
from tests.reference import rel
from tests.triton_markers import gpu, interp


def block_partials(z: torch.Tensor, block: int):
    """What the forward keeps per (block, token): fp32 ``[NB, M]`` max and sum of ``exp(z - max)``."""
    m, v = z.shape
    nb = -(-v // block)
    zb = torch.nn.functional.pad(z, (0, nb * block - v), value=float("-inf")).view(m, nb, block)
    bmax = zb.max(-1).values
    bsum = torch.exp(zb - bmax[..., None]).sum(-1)
    return bmax.t().float().contiguous(), bsum.t().float().contiguous()


def block_mass(z: torch.Tensor, block: int) -> torch.Tensor:
    """float64 ``[M, NB]``: each token's probability in each vocabulary block."""
    p = torch.softmax(z.double(), -1)
    nb = -(-z.shape[1] // block)
    return torch.nn.functional.pad(p, (0, nb * block - z.shape[1])).view(z.shape[0], nb, block).sum(-1)


# ------------------------------------------------------------------------- selection (both)


def check_kept_blocks(tau, offset, device, m=37, v=1001, block=64):
    """Per token: at most its budget tau (1 - p_label) of the mass dropped, the label's block kept, and no more
    droppable; tokens whose label holds nearly all the mass keep every block."""
    from align_losses.ops.triton_filter import drop_budget, kept_blocks

    g = torch.Generator().manual_seed(1)
    z = (torch.randn(m, v, generator=g) * 4 + torch.randn(m, 1, generator=g)).to(device, torch.float64)
    labels = (torch.randint(0, v, (m,), generator=g) + offset).to(device)  # this rank: [offset, offset + v)
    labels[::5] = offset + v + 3  # some labels live on another rank
    mine = (labels >= offset) & (labels < offset + v)
    tokens = torch.arange(m, device=device)
    local = (labels - offset).clamp(0, v - 1)
    # Tokens sure of their label: 1 - p_label from about 1e-6 to 1e-3 (budgets under 2^-8, small but not 0),
    # and one with all the mass in fp32 (budget exactly 0).
    sure = (tokens % 7 == 3) & mine
    z[tokens[sure], local[sure]] = z[tokens[sure]].max(1).values + 8 + 6 * torch.rand(
        int(sure.sum()), generator=g, dtype=torch.float64).to(device)
    certain = int(tokens[sure][0])
    z[certain, local[certain]] += 60
    bmax, bsum = block_partials(z, block)
    lse64 = torch.logsumexp(z, -1)
    # the label logits over the whole vocabulary: those on another rank are drawn below the logsumexp
    label_z = torch.where(mine, z[tokens, local], lse64 - 3 * torch.rand(m, generator=g, dtype=torch.float64).to(device))
    budget = drop_budget(tau, label_z.float(), lse64.float())
    want = tau * -torch.expm1(label_z - lse64)  # tau (1 - p_label), float64
    # fp32 logits near 20 are ~1e-6 apart, so a sure token's 1 - p_label is known to that much
    slack = tau * 1e-5
    assert budget.dtype == torch.float32 and torch.allclose(budget.double(), want, rtol=1e-4, atol=slack)
    keep = kept_blocks(bmax, bsum, lse64.float(), labels, offset, v, block, budget).t()  # [M, NB]
    mass = block_mass(z, block)
    label_block = local // block
    assert keep[tokens[mine], label_block[mine]].all()  # the label's block stays
    dropped = (mass * ~keep).sum(1)
    assert (dropped <= want * (1 + 1e-4) + slack).all()
    assert (~keep).sum() > 0
    off_label = -torch.expm1(label_z - lse64)
    assert ((off_label[sure] > 1e-7) & (off_label[sure] < 2e-3)).sum() >= 3  # the regime meant
    assert budget[certain] == 0 and keep[certain, mass[certain] > 0].all()  # a budget of 0 keeps every block
    # a sure token drops at most tau (1 - p_label), far less than tau: before, it could drop all but its label's
    assert (dropped[sure] <= tau * off_label[sure] * (1 + 1e-4) + slack).all()
    # maximal: dropping the smallest kept block (other than a kept-anyway label block) too would exceed the budget
    free = keep.clone()
    free[tokens[mine], label_block[mine]] = False
    smallest = torch.where(free, mass, torch.inf).min(1, keepdim=True).values
    with_next = (mass * (mass <= smallest)).sum(1)
    has_free = free.any(1)
    assert (with_next[has_free] > want[has_free] * (1 - 1e-4) - slack).all()


def test_drop_budget_scales_with_the_mass_off_the_label():
    """filter_mass (1 - p_label) / ranks, in fp32, 0 where the label has all the mass (expm1, not 1 - exp), and
    never negative where rounding puts the label logit above the logsumexp."""
    from align_losses.ops.triton_filter import drop_budget

    lse = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    # 2 - 1e-4: 1 - exp(x) would be 2e-4 off in fp32 there, expm1 is exact to ~1e-8
    label = torch.tensor([2.0 - math.log(4.0), 2.0 - 1e-7, 2.0, 2.0 + 1e-6, -30.0, 2.0 - 1e-4])
    got = drop_budget(2.0**-8, label, lse, ranks=2)
    want = 2.0**-9 * -torch.expm1((label - lse).double().clamp(max=0))
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-5, atol=0)
    assert abs(float(got[5]) / 2.0**-9 - float(-torch.expm1((label[5] - lse[5]).double()))) < 1e-9
    assert got[0] == pytest.approx(2.0**-9 * 0.75) and got[1] > 0 and got[2] == 0 and got[3] == 0


@interp
@pytest.mark.parametrize("tau", [2.0**-8, 2.0**-4, 0.3])
@pytest.mark.parametrize("offset", [0, 400])
def test_interp_kept_blocks(tau, offset):
    check_kept_blocks(tau, offset, "cpu")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tau", [2.0**-8, 2.0**-4, 0.3])
@pytest.mark.parametrize("offset", [0, 400])
@pytest.mark.parametrize("m, v, block", [(37, 1001, 64), (1001, 151936, 256)])
def test_gpu_kept_blocks(tau, offset, m, v, block):
    check_kept_blocks(tau, offset, "cuda", m, v, block)


def test_slots_hold_each_blocks_kept_tokens_in_whole_tiles():
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(9, 23, generator=g) < torch.rand(9, 1, generator=g)
    keep[4] = False  # a block nobody needs
    bm = 4
    padded = sum(-(-int(k) // bm) * bm for k in keep.sum(1))
    assert Slots.of(keep, bm, max_slots=padded - 1) is None  # too many slots: the caller goes dense
    slots = Slots.of(keep, bm, max_slots=padded)
    assert slots.starts == slots.tile_start.tolist() and slots.rows.numel() == slots.starts[-1] * bm
    for b in range(keep.shape[0]):
        t0, t1 = slots.starts[b], slots.starts[b + 1]
        assert t1 - t0 == -(-int(keep[b].sum()) // bm)
        assert (slots.tile_block[t0:t1] == b).all()
        rows = slots.rows[t0 * bm : t1 * bm]
        assert torch.equal(rows[rows >= 0].long(), keep[b].nonzero()[:, 0])
        assert (rows[: int(keep[b].sum())] >= 0).all()  # padding only at the end
    for max_tiles in (1, 3, 100):
        chunks = list(slots.chunks(max_tiles))
        assert chunks[0][0] == 0 and chunks[-1][1] == keep.shape[0]
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(b1 - b0 == 1 or slots.starts[b1] - slots.starts[b0] <= max_tiles for b0, b1 in chunks)


def test_filter_mass_option():
    assert filter_mass(None) is None and filter_mass(False) is None
    assert filter_mass(True) == DEFAULT_FILTER_MASS == 2.0**-8
    assert filter_mass(0.01) == 0.01
    for bad in (0, 1, 1.5, -0.1, "auto"):
        with pytest.raises(ValueError, match="filter_mass must be"):
            filter_mass(bad)


# ------------------------------------------------------------------------------ kernels (both)


def make(m, d, v, dtype, device, std, with_bias, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(m, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (std / math.sqrt(d))
    bias = torch.randn(v, generator=g) * 0.5 if with_bias else None
    labels = torch.randint(0, v, (m,), generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)
    return cast(hidden), cast(weight), cast(bias), labels.to(device)


def small_tiles_kw(dtype, set_slot_config) -> dict:
    """Interpreter-sized tiles: the op's keyword arguments; ``set_slot_config(dtype, config)``
    installs the slot kernels' (monkeypatch.setitem on SLOT_CONFIGS, or plain assignment)."""
    from align_losses.ops import triton_filter, triton_head

    tiles = triton_head.KernelConfig(16, 32, 16, 2, 4, 2, persistent=True)
    set_slot_config(dtype, triton_filter.SlotConfig(16, 16, 16, 32, 4, 2, 2))
    return dict(fwd_config=tiles, bwd_config=tiles)


def run_filtered(hidden, weight, bias, labels, transform, tau, small_tiles, monkeypatch, outputs=("logsumexp",),
                 memory_budget=None):
    """The op's outputs and what it saw: ``keep`` (the mask ``[NB, M]``), ``block`` (its width) and,
    once a backward has run, ``filtered`` (False where the slots were too many and the dense backward ran)."""
    from align_losses.ops import triton_filter, triton_head

    seen = {}
    kept_blocks = triton_filter.kept_blocks
    filtered_backward = triton_filter.filtered_backward

    def spy(*args):
        seen["keep"] = kept_blocks(*args)
        seen["block"] = args[6]
        return seen["keep"]

    def spy_backward(*args, **kwargs):
        result = filtered_backward(*args, **kwargs)
        seen["filtered"] = result is not None
        return result

    monkeypatch.setattr(triton_filter, "kept_blocks", spy)
    monkeypatch.setattr(triton_filter, "filtered_backward", spy_backward)
    set_slot_config = lambda dtype, cfg: monkeypatch.setitem(triton_filter.SLOT_CONFIGS, dtype, cfg)
    kw = small_tiles_kw(hidden.dtype, set_slot_config) if small_tiles else {}
    problem = HeadProblem(hidden=hidden, weight=weight, bias=bias, labels=labels, transform=transform,
                          outputs=frozenset(("logprobs", *outputs)))
    got = triton_head.triton_head(problem, filter_mass=tau, memory_budget=memory_budget, **kw)
    return got, seen


def masked_reference(hidden, weight, bias, labels, transform, ups, keep, block):
    """float64 gradients of ``sum(ups[n] * out[n])`` with ``dL/da`` zero outside the kept pairs."""
    da = masked_dlda(hidden, weight, bias, labels, transform, ups, keep, block)
    h, w = hidden.detach().double(), weight.detach().double()
    return da @ w, da.t() @ h, da.sum(0)


def masked_dlda(hidden, weight, bias, labels, transform, ups, keep, block):
    """float64 ``dL/da`` ``[M, V]`` of ``sum(ups[n] * out[n])``, zero outside the kept pairs."""
    h, w = hidden.detach().double(), weight.detach().double()
    a = (h @ w.t() + (bias.detach().double() if bias is not None else 0)).requires_grad_(True)
    z = a * transform.logit_scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    z = z / transform.temperature
    loss = (torch.log_softmax(z, -1).gather(1, labels[:, None])[:, 0] * ups["logprobs"].double()).sum()
    if "logsumexp" in ups:
        loss = loss + (torch.logsumexp(z, -1) * ups["logsumexp"].double()).sum()
    (da,) = torch.autograd.grad(loss, a)
    return da * keep.t().repeat_interleave(block, 1)[:, : da.shape[1]]


def check_filtered(m, d, v, dtype, device, monkeypatch, transform=LogitTransform(), with_bias=False, std=8.0,
                   tau=2.0**-6, small_tiles=False, tol=1e-5, seed=0, memory_budget=None, frozen=()):
    """``frozen``: names among hidden / weight / bias that need no gradient."""
    hidden, weight, bias, labels = make(m, d, v, dtype, device, std, with_bias, seed)
    named = {"hidden": hidden, "weight": weight, "bias": bias}
    for name in frozen:
        named[name].requires_grad_(False)
    got, seen = run_filtered(hidden, weight, bias, labels, transform, tau, small_tiles, monkeypatch,
                             memory_budget=memory_budget)
    keep = seen["keep"]
    assert (~keep).float().mean() > 0.3  # the backward had pairs to skip
    g = torch.Generator().manual_seed(seed + 1)
    ups = {n: (torch.randn(m, generator=g) * (1 + 3 * torch.rand(m, generator=g))).to(device)
           for n in ("logprobs", "logsumexp")}
    trained = [n for n, t in named.items() if t is not None and n not in frozen]
    grads = torch.autograd.grad(sum((got[n] * ups[n]).sum() for n in ups), [named[n] for n in trained])
    assert seen["filtered"]  # not the dense backward, whose errors against this reference can be small too
    ref = dict(zip(("hidden", "weight", "bias"),
                   masked_reference(hidden, weight, bias, labels, transform, ups, keep.cpu().to(device), seen["block"])))
    errs = {}
    for name, gg in zip(trained, grads):
        rg = ref[name]
        assert gg.dtype == dtype and gg.shape == rg.shape
        errs[name] = rel(gg, rg)
        assert errs[name] < tol, (name, errs)
    return errs


TRANSFORMS = [LogitTransform(), LogitTransform(logit_scale=1.5, softcap=50.0, temperature=0.8)]


@interp
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_interp_fp32_filtered_grads_are_the_kept_pairs_exactly(transform, with_bias, monkeypatch):
    check_filtered(45, 40, 701, torch.float32, "cpu", monkeypatch, transform, with_bias, small_tiles=True)


@interp
@pytest.mark.parametrize("frozen", [("weight",), ("hidden",), ("weight", "bias")])
def test_interp_filtered_grads_of_what_needs_them(frozen, monkeypatch):
    check_filtered(45, 40, 701, torch.float32, "cpu", monkeypatch, with_bias=True, small_tiles=True, frozen=frozen)


@interp
def test_interp_filtered_grads_in_several_chunks(monkeypatch):
    # 4 KiB of chunk buffer: 2 tiles of 16 slots x 32 columns (fp32), so the blocks go in many chunks
    check_filtered(45, 40, 701, torch.float32, "cpu", monkeypatch, with_bias=True, small_tiles=True,
                   memory_budget=4096)


@interp
def test_interp_filtered_no_tokens(monkeypatch):
    from align_losses.ops import triton_head

    hidden, weight, _, labels = make(0, 40, 300, torch.float32, "cpu", 8.0, False, 0)
    problem = HeadProblem(hidden=hidden, weight=weight, bias=None, labels=labels, transform=LogitTransform(),
                          outputs=frozenset({"logprobs"}))
    got = triton_head.triton_head(problem, filter_mass=2.0**-6, **small_tiles_kw(
        torch.float32, lambda dtype, cfg: None))
    gh, gw = torch.autograd.grad(got["logprobs"].sum(), (hidden, weight))
    assert gh.shape == (0, 40) and torch.equal(gw, torch.zeros_like(weight))


@interp
def test_interp_bf16_filtered_grads(monkeypatch):
    # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): twice the rounding error
    check_filtered(45, 48, 701, torch.bfloat16, "cpu", monkeypatch, small_tiles=True, tol=8e-3)


def filtered_sequence_upstream_errors(device, monkeypatch, flip=None) -> tuple:
    """``(ours, naive)``: (grad_hidden, grad_weight) relative errors against the masked float64 reference
    when every token has the same log-prob upstream, of the op and of that reference's ``dL/da`` rounded
    to bf16 before its GEMMs (the label entries rounded into the operands make one error for all
    tokens); ``flip`` ``"hidden"`` or ``"weight"``: the op adds the label entries to that gradient with
    the wrong sign."""
    from align_losses.ops import triton_filter

    upstream = 1.0038  # just under a bf16 rounding tie: its label entries round 3.8e-3 off
    # On the GPU (128-token slot tiles) 300 tokens over 12 vocabulary blocks ran the dense backward.
    m, v = (300, 3001) if device == "cpu" else (2000, 40001)
    hidden, weight, _, labels = make(m, 64, v, torch.bfloat16, device, 8.0, False, 3)
    if flip == "hidden":
        real_h = triton_filter.hidden_grad
        monkeypatch.setattr(triton_filter, "hidden_grad", lambda acc, entry, *rest: real_h(acc, -entry, *rest))
    if flip == "weight":
        real_w = triton_filter.add_label_weight_rows
        monkeypatch.setattr(triton_filter, "add_label_weight_rows",
                            lambda gw, entry, *rest: real_w(gw, -entry, *rest))
    got, seen = run_filtered(hidden, weight, None, labels, LogitTransform(), 2.0**-6, device == "cpu", monkeypatch)
    assert (~seen["keep"]).float().mean() > 0.3
    gh, gw = torch.autograd.grad(got["logprobs"].sum() * upstream, (hidden, weight))
    assert seen["filtered"]  # the filtering backward ran, not the dense one
    ups = {"logprobs": torch.full((m,), upstream, device=device)}
    da = masked_dlda(hidden, weight, None, labels, LogitTransform(), ups, seen["keep"], seen["block"])
    h64, w64 = hidden.detach().double(), weight.detach().double()
    rounded = da.to(torch.bfloat16).double()
    ours = (rel(gh, da @ w64), rel(gw, da.t() @ h64))
    naive = (rel((rounded @ w64).to(torch.bfloat16), da @ w64), rel((rounded.t() @ h64).to(torch.bfloat16), da.t() @ h64))
    return ours, naive


def check_filtered_sequence_upstream(device, monkeypatch):
    ours, naive = filtered_sequence_upstream_errors(device, monkeypatch)
    flipped_h, _ = filtered_sequence_upstream_errors(device, monkeypatch, flip="hidden")
    monkeypatch.undo()
    flipped_w, _ = filtered_sequence_upstream_errors(device, monkeypatch, flip="weight")
    assert min(naive) > 3e-3, naive  # the test's own premise: rounding the label entries costs that much
    assert flipped_h[0] > 5e-3 and flipped_w[1] > 5e-3, (flipped_h, flipped_w)
    return ours, naive


@interp
def test_interp_filtered_sequence_upstream_label_entries(monkeypatch):
    ours, naive = check_filtered_sequence_upstream("cpu", monkeypatch)
    # The interpreter truncates to bf16 where a GPU rounds to nearest (the outputs alone are up to
    # 2^-8 off): the label entries rounded into the weight GEMM's operand gave 6.4e-3 here, now 4.6e-3.
    assert ours[0] < 3.5e-3 and ours[1] < 5.5e-3, (ours, naive)


@pytest.mark.gpu
@gpu
def test_gpu_filtered_sequence_upstream_label_entries(monkeypatch):
    ours, naive = check_filtered_sequence_upstream("cuda", monkeypatch)
    # rounding to nearest, both at the floor of the outputs' own rounding, well under the naive head's
    assert max(ours) < 3e-3 and ours[0] < 0.75 * naive[0] and ours[1] < 0.75 * naive[1], (ours, naive)


def check_op_budgets(device, monkeypatch, small_tiles, tau=2.0**-6):
    """Through the op: each token drops at most tau (1 - p_label) of its probability, half the tokens labelled
    with their most likely id (sure of it), so the budget the op hands `kept_blocks` is each token's own."""
    hidden, weight, bias, labels = make(45, 40, 701 if small_tiles else 3001, torch.float32, device, 24.0, False, 5)
    z = (hidden.detach().double() @ weight.detach().double().t())
    labels[::2] = z.argmax(1)[::2]
    p = torch.softmax(z, -1)
    off_label = 1 - p[torch.arange(45, device=device), labels]
    assert (off_label[::2] < tau / 4).sum() >= 5  # sure tokens, whose budget is far under tau
    got, seen = run_filtered(hidden, weight, bias, labels, LogitTransform(), tau, small_tiles, monkeypatch,
                             outputs=("logprobs",))
    keep_cols = seen["keep"].t().repeat_interleave(seen["block"], 1)[:, : weight.shape[0]]
    dropped = (p * ~keep_cols).sum(1)
    assert (~seen["keep"]).float().mean() > 0.2
    assert float((dropped / (tau * off_label)).max()) <= 1 + 1e-4


@interp
def test_interp_op_budgets_follow_each_tokens_label(monkeypatch):
    check_op_budgets("cpu", monkeypatch, True)


@pytest.mark.gpu
@gpu
def test_gpu_op_budgets_follow_each_tokens_label(monkeypatch):
    check_op_budgets("cuda", monkeypatch, False)


def check_refuses_entropy_gradient(device, monkeypatch, small_tiles):
    hidden, weight, bias, labels = make(20, 32, 300, torch.float32, device, 8.0, False, 0)
    got, _ = run_filtered(hidden, weight, bias, labels, LogitTransform(), 2.0**-6, small_tiles, monkeypatch,
                          outputs=("entropy",))
    with pytest.raises(ValueError, match="filter_mass.*entropy"):
        torch.autograd.grad(got["entropy"].sum(), (hidden,), retain_graph=True)
    (gh,) = torch.autograd.grad(got["logprobs"].sum(), (hidden,))  # entropy only as a metric: fine
    assert torch.isfinite(gh).all()


@interp
def test_interp_refuses_entropy_gradient(monkeypatch):
    check_refuses_entropy_gradient("cpu", monkeypatch, True)


def check_flat_runs_dense(device, monkeypatch, small_tiles):
    """Flat logits keep almost every pair: the dense backward runs, the same numbers as exact mode."""
    from align_losses.ops import triton_head

    hidden, weight, bias, labels = make(40, 32, 600, torch.float32, device, 0.5, False, 0)
    got, seen = run_filtered(hidden, weight, bias, labels, LogitTransform(), 2.0**-8, small_tiles, monkeypatch)
    assert seen["keep"].float().mean() > 0.9
    (gh,) = torch.autograd.grad(got["logprobs"].sum(), (hidden,))
    kw = small_tiles_kw(torch.float32, lambda dtype, cfg: None) if small_tiles else {}
    problem = HeadProblem(hidden=hidden, weight=weight, bias=None, labels=labels, transform=LogitTransform(),
                          outputs=frozenset({"logprobs", "logsumexp"}))
    (gh_exact,) = torch.autograd.grad(triton_head.triton_head(problem, **kw)["logprobs"].sum(), (hidden,))
    assert torch.equal(gh, gh_exact)


@interp
def test_interp_flat_logits_run_the_dense_backward(monkeypatch):
    check_flat_runs_dense("cpu", monkeypatch, True)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_fp32_filtered_grads_are_the_kept_pairs_exactly(transform, with_bias, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_filtered(1003, 200, 5001, torch.float32, "cuda", monkeypatch, transform, with_bias)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [1000, 2048])
def test_gpu_bf16_filtered_grads(d, monkeypatch):
    check_filtered(3001, d, 50001, torch.bfloat16, "cuda", monkeypatch, with_bias=True, tau=2.0**-8, tol=3e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("frozen", [("weight",), ("hidden",)])
def test_gpu_fp16_filtered_grads_of_what_needs_them(frozen, monkeypatch):
    check_filtered(2001, 512, 30001, torch.float16, "cuda", monkeypatch, with_bias=True, tau=2.0**-8, tol=3e-3,
                   frozen=frozen)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_filtered_grads_in_several_chunks(monkeypatch):
    # a 1 MiB buffer holds 16 tiles of 128 slots x 256 columns (bf16): the blocks go in many chunks
    check_filtered(2000, 64, 40001, torch.bfloat16, "cuda", monkeypatch, tau=2.0**-8, tol=3e-3,
                   memory_budget=2**20)


@pytest.mark.gpu
@gpu
def test_gpu_refuses_entropy_gradient(monkeypatch):
    check_refuses_entropy_gradient("cuda", monkeypatch, False)


@pytest.mark.gpu
@gpu
def test_gpu_flat_logits_run_the_dense_backward(monkeypatch):
    check_flat_runs_dense("cuda", monkeypatch, False)


@pytest.mark.gpu
@gpu
def test_gpu_filter_mass_through_core():
    import align_losses

    hidden, weight, _, labels = make(999, 256, 30001, torch.bfloat16, "cuda", 8.0, False, 4)
    exact = align_losses.linear_logprobs(hidden, weight, labels, impl="triton")
    filt = align_losses.linear_logprobs(hidden, weight, labels, impl="triton", backend_options={"filter_mass": True})
    assert torch.equal(exact, filt)  # the forward is the same
    ge = torch.autograd.grad(exact.sum(), (hidden, weight))
    gf = torch.autograd.grad(filt.sum(), (hidden, weight))
    assert all(rel(a, b) < 3e-3 for a, b in zip(gf, ge))
    with pytest.raises(ValueError, match="filter_mass must be"):
        align_losses.linear_logprobs(hidden, weight, labels, impl="triton", backend_options={"filter_mass": 2})


# ------------------------------------------------------------------- vocabulary-parallel (both)


def _sharded_filter_worker(rank, world, init_file, device, small_tiles, result_file):
    """Two ranks with half the vocabulary each: gradients against the masks of both ranks."""
    import torch.distributed as dist

    from align_losses.problem import VocabShard
    from align_losses.ops import triton_filter, triton_head

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # enough blocks per rank for a peaky token to leave most of them (GPU fp32 blocks: 128 columns)
        m, d, v, split = (45, 40, 400, 224) if small_tiles else (45, 40, 3000, 1536)
        hidden, weight, bias, labels = make(m, d, v, torch.float32, "cpu", 8.0, True, 3)
        lo, hi = [(0, split), (split, v)][rank]
        w_local = weight.detach()[lo:hi].clone().to(device).requires_grad_(True)
        b_local = bias.detach()[lo:hi].clone().to(device).requires_grad_(True)
        h = hidden.detach().clone().to(device).requires_grad_(True)
        seen = {}
        kept_blocks = triton_filter.kept_blocks

        def spy(*args):
            seen["keep"], seen["block"] = kept_blocks(*args), args[6]
            return seen["keep"]

        triton_filter.kept_blocks = spy
        triton_filter.DENSE_ABOVE = 1.0  # the filtered path on both ranks, however small their shards
        kw = small_tiles_kw(torch.float32, triton_filter.SLOT_CONFIGS.__setitem__) if small_tiles else {}
        problem = HeadProblem(hidden=h, weight=w_local, bias=b_local, labels=labels.to(device),
                              transform=LogitTransform(), outputs=frozenset({"logprobs"}),
                              shard=VocabShard(start=lo, size=v, group=dist.group.WORLD))
        got = triton_head.triton_head(problem, filter_mass=2.0**-6, **kw)
        ups = {"logprobs": torch.linspace(-2, 3, m)}
        gh, gw, gb = torch.autograd.grad((got["logprobs"] * ups["logprobs"].to(device)).sum(), (h, w_local, b_local))
        masks = [None] * world
        dist.all_gather_object(masks, seen["keep"].cpu())
        block = seen["block"]
        # the full vocabulary's mask: each rank's blocks start at its own first row
        keep_cols = torch.cat([mk.t().repeat_interleave(block, 1)[:, : b - a] for mk, (a, b) in
                               zip(masks, [(0, split), (split, v)])], 1)
        rgh, rgw, rgb = masked_reference(hidden, weight, bias, labels, LogitTransform(), ups, keep_cols.t(), 1)
        p = torch.softmax(hidden.double() @ weight.double().t() + bias.double(), -1)
        torch.save({"grad_hidden": rel(gh.cpu(), rgh), "grad_weight": rel(gw.cpu(), rgw[lo:hi]),
                    "grad_bias": rel(gb.cpu(), rgb[lo:hi]), "dropped": float((~seen["keep"]).float().mean()),
                    # each token's dropped mass over its budget 2^-6 (1 - p_label), over both ranks' blocks
                    "dropped_share": float(((p * ~keep_cols).sum(1) / (2.0**-6 * (1 - p[torch.arange(m), labels])))
                                           .max())}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def sharded_filter(device, small_tiles, tmp_path, world=2):
    import torch.multiprocessing as mp

    init_file, result = tmp_path / "init", tmp_path / "result"
    mp.spawn(_sharded_filter_worker, args=(world, str(init_file), device, small_tiles, str(result)), nprocs=world)
    for r in range(world):
        errs = torch.load(f"{result}.{r}")
        assert errs.pop("dropped") > 0.3, r
        assert errs.pop("dropped_share") <= 1 + 1e-4, r
        for name, e in errs.items():
            assert e < 1e-5, (r, name, e)


@interp
def test_interp_vocab_parallel_filtered(tmp_path):
    sharded_filter("cpu", True, tmp_path)


@pytest.mark.gpu
@gpu
def test_gpu_vocab_parallel_filtered(tmp_path):
    """Two ranks (gloo) on one GPU, each with a shard of the vocabulary."""
    sharded_filter("cuda", False, tmp_path)
