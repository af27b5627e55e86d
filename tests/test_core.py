"""The core against float64 full-logits math: values and gradients, every option, odd sizes."""

from __future__ import annotations

import zlib

import pytest
import torch

import align_losses
from align_losses.core import STATS
from reference import bf16_ulps, full_logits, rel, token_stats

DIFFERENTIABLE = ("logprobs", "entropy", "mean_logit", "logsumexp")

# Tiles small enough that N and V split into several blocks that do not divide them.
SMALL_TILES = {"memory_budget": 16 * 7 * 19, "token_chunk": 7}

OPTION_CASES = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "temperature": {"temperature": 0.7},
    "logit_scale": {"logit_scale": 1.7},
    "all": {"bias": True, "softcap": 3.0, "temperature": 1.3, "logit_scale": 0.6},
}


def _inputs(shape, d, v, *, bias, seed, dtype=torch.float32, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=dtype)
    weight = (torch.randn(v, d, generator=g, dtype=dtype) / d**0.5 * 2.0)
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels


def _upstream(shape, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5 for name in DIFFERENTIABLE}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("shift", [False, True])
def test_values_and_gradients_match_float64(case, shift):
    opts = dict(OPTION_CASES[case])
    use_bias = opts.pop("bias", False)
    shape, d, v = (3, 13), 24, 101
    hidden, weight, bias, labels = _inputs(shape, d, v, bias=use_bias, seed=zlib.crc32(f"{case}{shift}".encode()) % 1000)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]

    stats = align_losses.linear_token_stats(
        hidden, weight, labels, outputs=STATS, bias=bias, shift=shift, backend_options=SMALL_TILES, **opts
    )
    ref = token_stats(full_logits(hidden, weight, bias, **opts), labels, shift=shift)
    for name in STATS + ("logprobs",):
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == labels.shape
        assert rel(got, ref[name]) < 1e-5, name

    up = _upstream(shape, 7)
    ours = torch.autograd.grad(sum((getattr(stats, n).double() * up[n]).sum() for n in DIFFERENTIABLE), leaves)
    theirs = torch.autograd.grad(sum((ref[n] * up[n]).sum() for n in DIFFERENTIABLE), leaves)
    for got, want in zip(ours, theirs):
        assert rel(got, want) < 1e-4


ROW_SCALED_CASES = {
    "logprobs": ("logprobs",),
    "logsumexp": ("logsumexp",),
    "both": ("logprobs", "logsumexp"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(ROW_SCALED_CASES))
def test_row_scaled_backward_matches_float64(case, dtype, monkeypatch):
    """The losses' backward (`tiled_head.row_scale`: upstream gradients on the log-probs and logsumexp only, no
    softcap, no bias gradient) against float64: a logit scale and a temperature, a bias that takes no gradient,
    tokens with a zero upstream gradient and ones whose two gradients cancel (``c = 0``), several vocabulary and
    token blocks, ignored labels; an entropy asked for as a metric (no gradient) keeps this path."""
    from align_losses.ops import tiled_head

    scales = []
    real = tiled_head.row_scale
    monkeypatch.setattr(tiled_head, "row_scale", lambda *a: scales.append(real(*a)) or scales[-1])
    shape, d, v = (3, 23), 19, 149
    hidden, weight, bias, labels = _inputs(shape, d, v, bias=True, seed=21, dtype=dtype)
    opts = {"logit_scale": 1.7, "temperature": 0.6}
    up = _upstream(shape, 21)
    up["logprobs"][0, :5] = 0.0
    up["logsumexp"][1, :4] = up["logprobs"][1, :4]  # c = 0 where both have one
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    stats = align_losses.linear_token_stats(h, w, labels, outputs=("logsumexp", "entropy"), bias=bias, impl="torch",
                                            backend_options=SMALL_TILES, **opts)
    metric = stats.entropy.detach().mean()  # a metric: no gradient through it
    names = ROW_SCALED_CASES[case]
    ours = torch.autograd.grad(sum((getattr(stats, n).double() * up[n]).sum() for n in names) + 0 * metric, (h, w))
    assert scales and all(s is not None for s in scales)  # the row-scaled path ran
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = token_stats(full_logits(hd, wd, bias.double(), **opts), labels)
    theirs = torch.autograd.grad(sum((ref[n] * up[n]).sum() for n in names), (hd, wd))
    for got, want in zip(ours, theirs):
        assert got.dtype == dtype
        assert rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", ["softcap", "bias_gradient"])
def test_losses_upstream_outside_the_row_scaled_form(case):
    """Log-prob and logsumexp gradients only, but a softcap (``dz/da`` is no constant) or a bias that takes a
    gradient: the general backward, against float64."""
    shape, d, v = (2, 31), 17, 131
    hidden, weight, bias, labels = _inputs(shape, d, v, bias=True, seed=23)
    opts = {"softcap": 3.0, "temperature": 0.8} if case == "softcap" else {"logit_scale": 1.4}
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if case == "bias_gradient"
                                                                   else [])
    stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=("logsumexp",), bias=bias, impl="torch",
                                            backend_options=SMALL_TILES, **opts)
    up = _upstream(shape, 23)
    ours = torch.autograd.grad(sum((getattr(stats, n).double() * up[n]).sum() for n in ("logprobs", "logsumexp")),
                               leaves)
    ref = token_stats(full_logits(hidden, weight, bias, **opts), labels)
    theirs = torch.autograd.grad(sum((ref[n] * up[n]).sum() for n in ("logprobs", "logsumexp")), leaves)
    for got, want in zip(ours, theirs):
        assert rel(got, want) < 1e-5


def test_label_entries_from_the_label_logits_match_float64():
    """The label entries of ``dL/da`` (`tiles.label_entries`, computed once per backward from the forward's label
    logits) against float64, for the losses' upstream gradients (``s (p c + g_logp)``, ``c`` of both signs, zero,
    magnitudes from 1e-6 to 1e3) and with entropy and mean-logit gradients and a softcap; 0 for labels outside
    the shard."""
    from align_losses.ops.tiles import Upstream, label_entries
    from align_losses.problem import LogitTransform

    g = torch.Generator().manual_seed(12)
    t, vocab = 41, 400
    z = torch.randn(t, vocab, generator=g, dtype=torch.float64) * 4
    lse = torch.logsumexp(z, 1)
    p = (z - lse[:, None]).exp()
    ez = (p * z).sum(1)
    labels = torch.randint(0, vocab, (t,), generator=g)
    inside = torch.rand(t, generator=g) < 0.8
    z_l = z.gather(1, labels[:, None]).squeeze(1)
    p_l = p.gather(1, labels[:, None]).squeeze(1)
    g_logp = torch.randn(t, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 4, (t,), generator=g)
    g_lse = torch.randn(t, generator=g, dtype=torch.float64)
    g_lse[:3] = g_logp[:3]  # c = 0
    g_ent, g_mean = torch.randn(t, generator=g, dtype=torch.float64), torch.randn(t, generator=g, dtype=torch.float64)
    for transform, general in ((LogitTransform(logit_scale=1.3, temperature=0.7), False),
                               (LogitTransform(softcap=30.0, temperature=0.7), True)):
        up = Upstream(g_logp.float(), g_lse.float(), g_ent.float() if general else None,
                      g_mean.float() if general else None)
        entry = label_entries(z_l.float(), lse.float(), ez.float() if general else None, up, transform, vocab, inside)
        dz = p_l * (g_lse - g_logp) + g_logp
        if general:
            dz = dz - g_ent * p_l * (z_l - ez) + g_mean / vocab
            dzda = (1 - (z_l * 0.7 / 30.0) ** 2) / 0.7
        else:
            dzda = torch.full_like(z_l, 1.3 / 0.7)
        want = torch.where(inside, dz * dzda, torch.zeros((), dtype=torch.float64))
        assert float(((entry.double() - want).abs() / want.abs().clamp_min(1e-12)).max()) < 1e-5


def test_cpu_bf16_gemms_are_fp32_gemms():
    """On the CPU, bf16 operands' GEMMs run on oneDNN's bf16 kernels (`gemm.cpu_bf16_kernels`) and give an fp32
    GEMM's result: against float64, within fp32 accumulation error; the setting is restored after each call, also
    after an error, and fp16 or fp32 operands leave it alone."""
    from align_losses.ops import gemm

    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    g = torch.Generator().manual_seed(31)
    a = torch.randn(67, 129, generator=g).bfloat16()
    b = torch.randn(129, 53, generator=g).bfloat16()
    want = a.double() @ b.double()
    got = gemm.matmul_fp32(a, b)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-6
    acc = torch.randn(67, 53, generator=g)
    start = acc.double()
    gemm.mm_into(acc, a, b, first=False)
    assert rel(acc, start + want) < 1e-6
    assert settings.fp32_precision == before
    with gemm.cpu_bf16_kernels(a, b):
        assert settings.fp32_precision == "bf16"
    for other in (a.half(), a.float()):
        with gemm.cpu_bf16_kernels(other, b):
            assert settings.fp32_precision == before
    with pytest.raises(RuntimeError):
        with gemm.cpu_bf16_kernels(a, b):
            raise RuntimeError("inside")
    assert settings.fp32_precision == before


@pytest.mark.parametrize("output", DIFFERENTIABLE)
def test_each_output_gradient_alone(output):
    """Each differentiable output's gradient on its own (the others' terms must not leak in)."""
    hidden, weight, bias, labels = _inputs((29,), 16, 67, bias=True, seed=3)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    outputs = tuple(n for n in (output,) if n != "logprobs")
    stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=outputs, bias=bias, softcap=4.0, backend_options=SMALL_TILES)
    ref = token_stats(full_logits(hidden, weight, bias, softcap=4.0), labels)
    up = _upstream((29,), 11)[output]
    ours = torch.autograd.grad((getattr(stats, output).double() * up).sum(), leaves)
    theirs = torch.autograd.grad((ref[output] * up).sum(), leaves)
    for got, want in zip(ours, theirs):
        assert rel(got, want) < 1e-4


@pytest.mark.parametrize("offset", [0.0, 500.0, -3000.0])
def test_entropy_under_a_common_logit_offset(offset):
    """A bias common to the whole vocabulary changes no probability. The entropy stays within the
    fp32 rounding of the logits themselves (ulp(3000) = 2.4e-4); summing ``e^(z - max) z`` instead of
    ``e^(z - max) (z - max)`` gave 8.0e-4 at -3000 and 1.4e-4 at 500 on these inputs."""
    hidden, weight, bias, labels = _inputs((41,), 24, 307, bias=True, seed=17, ignore_frac=0.0)
    bias = (bias * 0.5 + offset).requires_grad_()
    hidden.requires_grad_()
    stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=("entropy",), bias=bias,
                                            backend_options=SMALL_TILES)
    ref = token_stats(full_logits(hidden, weight, bias), labels)["entropy"]
    tol = 2e-6 + 6e-8 * abs(offset)
    assert float((stats.entropy.double() - ref).abs().max()) < tol
    up = _upstream((41,), 5)["entropy"]
    ours = torch.autograd.grad((stats.entropy.double() * up).sum(), hidden)[0]
    theirs = torch.autograd.grad((ref * up).sum(), hidden)[0]
    assert rel(ours, theirs) < 1e-5 + 6e-8 * abs(offset)


def test_a_vocabulary_tail_masked_by_a_minus_inf_bias():
    """Ids past ``keep`` get a bias of -inf (say, a padded embedding matrix): every output and gradient
    equals that of the head without those rows, and their rows get zero gradient. The small tiles put
    whole vocabulary blocks inside the masked tail (they once gave NaN)."""
    keep = 150
    hidden, weight, bias, labels = _inputs((31,), 24, 211, bias=True, seed=23, ignore_frac=0.0)
    labels = labels % keep
    with torch.no_grad():
        bias[keep:] = -float("inf")
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    outputs = ("entropy", "logsumexp", "argmax_hit", "log_sum_p2")
    stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=outputs, bias=bias,
                                            backend_options=SMALL_TILES)
    ref = token_stats(full_logits(hidden, weight[:keep], bias[:keep]), labels)
    for name in ("logprobs", *outputs):
        assert rel(getattr(stats, name), ref[name]) < 1e-5, name
    up = _upstream((31,), 9)
    names = ("logprobs", "entropy", "logsumexp")
    ours = torch.autograd.grad(sum((getattr(stats, n).double() * up[n]).sum() for n in names), leaves)
    theirs = torch.autograd.grad(sum((ref[n] * up[n]).sum() for n in names), leaves)
    for got, want in zip(ours, theirs):
        assert torch.count_nonzero(got[keep:]) == 0
        assert rel(got[:keep], want[:keep]) < 1e-4


def test_tile_sizes_do_not_change_the_result():
    hidden, weight, _, labels = _inputs((53,), 32, 211, bias=False, seed=5)
    outs = [
        align_losses.linear_token_stats(hidden, weight, labels, outputs=STATS, backend_options=opts)
        for opts in ({}, SMALL_TILES, {"memory_budget": 16 * 211}, {"token_chunk": 1})
    ]
    for other in outs[1:]:
        for name in STATS + ("logprobs",):
            torch.testing.assert_close(getattr(other, name), getattr(outs[0], name), rtol=1e-5, atol=1e-6)


def test_argmax_first_maximum_on_ties():
    weight = torch.zeros(10, 4)
    weight[3, 0] = weight[7, 0] = 1.0  # logits of ids 3 and 7 tie for the maximum
    hidden = torch.tensor([[2.0, 0, 0, 0]] * 3)
    labels = torch.tensor([3, 7, 0])
    stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=("argmax_hit",), backend_options={"memory_budget": 16 * 5})
    assert stats.argmax_hit.tolist() == [1.0, 0.0, 0.0]


def test_packed_rows_score_nothing_across_a_boundary():
    """Two sequences in one row: the first label of the second is ignored, so its shifted score is 0."""
    hidden, weight, _, _ = _inputs((1, 9), 8, 31, bias=False, seed=9)
    labels = torch.randint(0, 31, (1, 9))
    labels[0, 5] = -100  # first token of the second segment
    out = align_losses.linear_logprobs(hidden, weight, labels, shift=True)
    assert out[0, 4] == 0 and out[0, 8] == 0
    ref = token_stats(full_logits(hidden, weight), labels, shift=True)["logprobs"]
    assert rel(out, ref) < 1e-5


def test_all_ignored_gives_zeros_and_zero_gradients():
    hidden, weight, bias, labels = _inputs((2, 5), 8, 17, bias=True, seed=1)
    labels.fill_(-100)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    out = align_losses.linear_logprobs(hidden, weight, labels, bias=bias)
    assert torch.equal(out, torch.zeros(2, 5))
    grads = torch.autograd.grad(out.sum(), leaves)
    for g in grads:
        assert g is not None and torch.count_nonzero(g) == 0 and torch.isfinite(g).all()


def test_frozen_weight_gets_no_gradient_work(monkeypatch):
    """With the head frozen (or LoRA-adapted) the backward does only the hidden-state GEMMs."""
    from align_losses.ops import gemm

    hidden, weight, _, labels = _inputs((40,), 16, 90, bias=False, seed=2, ignore_frac=0.0)
    calls = []
    real, real_into, real_rounded = gemm.matmul_fp32, gemm.mm_into, gemm.mm_rounded
    monkeypatch.setattr(gemm, "matmul_fp32", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(gemm, "mm_into", lambda c, a, b, first: calls.append(1) or real_into(c, a, b, first))
    monkeypatch.setattr(gemm, "mm_rounded", lambda a, b, out: calls.append(1) or real_rounded(a, b, out))

    def backward_gemms(weight_requires_grad):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_requires_grad)
        out = align_losses.linear_logprobs(h, w, labels, backend_options={"memory_budget": 16 * 40 * 30})
        calls.clear()
        out.sum().backward()
        return len(calls), w.grad

    with_weight, w_grad = backward_gemms(True)
    frozen, frozen_grad = backward_gemms(False)
    assert w_grad is not None and frozen_grad is None
    # Per tile: one recompute GEMM, one for grad_hidden and, when wanted, one for grad_weight.
    assert frozen * 3 == with_weight * 2


def test_label_entries_reach_their_weight_rows_as_in_float64():
    """`LabelledRows` (the torch backend's labelled weight rows) against float64: a shard from id 40 in
    blocks of 17 ids (the last one short), labels before, inside (one of them repeated, one on every
    block edge) and after the shard; rows without a label left alone; the products made 7 tokens at a time."""
    from align_losses.ops.weight_rows import LabelledRows

    g = torch.Generator().manual_seed(5)
    m, d, offset, vocab, block = 61, 13, 40, 60, 17
    hidden = torch.randn(m, d, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 140, (m,), generator=g)
    labels[:10] = torch.tensor([offset - 1, offset, offset + 16, offset + 17, offset + 33, offset + 34,
                                offset + vocab - 1, offset + vocab, offset + 3, offset + 3])
    in_shard = (labels >= offset) & (labels < offset + vocab)
    entry = torch.where(in_shard, torch.randn(m, generator=g), 0.0)  # as label_entries gives them
    labelled = LabelledRows.of(labels, entry, hidden, offset, vocab, block, chunk=7)
    for index, first in enumerate(range(offset, offset + vocab, block)):
        width = min(block, offset + vocab - first)
        rows = torch.randn(width, d, generator=g)
        want = rows.double()
        inside = (labels >= first) & (labels < first + width)
        for t in torch.nonzero(inside).squeeze(1).tolist():
            want[labels[t] - first] += entry[t].double() * hidden[t].double()
        got = rows.clone()
        labelled.add_to_block(got, index, first)
        assert rel(got, want) < 1e-6
        untouched = torch.ones(width, dtype=torch.bool)
        untouched[labels[inside] - first] = False
        assert torch.equal(got[untouched], rows[untouched])
    assert len(labelled.bounds) == 5 and labelled.bounds[0] == 0
    assert labelled.bounds[-1] == len(set(labels[in_shard].tolist())) == labelled.rows.shape[0]  # a row per label


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["rows-in-place", "fp32-blocks"])
def test_label_sums_wait_until_the_first_block_has_queued_its_gemms(monkeypatch, dtype):
    """The backward's one wait for the device (for the labels' block bounds: `weight_rows.LabelledRows`) comes at
    the first use of those bounds, once the first vocabulary block's recompute and hidden-state GEMMs are queued,
    not when the labels are sorted: on CUDA the GPU then works through those GEMMs while the host waits and makes
    the label sums. The order of calls is the same on every device; here it is recorded on the CPU, for a block
    written in place (fp32) and an fp32 block (bf16 here)."""
    from align_losses.ops import gemm, weight_rows

    calls = []
    real_finish, real_matmul, real_into = weight_rows.LabelledRows._finish, gemm.matmul_fp32, gemm.mm_into
    monkeypatch.setattr(weight_rows.LabelledRows, "_finish", lambda self: calls.append("wait") or real_finish(self))
    monkeypatch.setattr(gemm, "matmul_fp32", lambda a, b: calls.append(("gemm", a.shape, b.shape)) or
                        real_matmul(a, b))
    monkeypatch.setattr(gemm, "mm_into", lambda acc, a, b, first: calls.append(("into", acc.shape)) or
                        real_into(acc, a, b, first))
    g = torch.Generator().manual_seed(23)
    m, d, v = 40, 16, 300
    hidden = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (m,), generator=g)
    options = {"memory_budget": 16 * m * 64, "token_chunk": m, "compile_tiles": False}  # 64-id blocks
    logps = align_losses.linear_logprobs(hidden, weight, labels, impl="torch", backend_options=options)
    calls.clear()
    (logps * torch.randn(m, generator=g)).sum().backward()
    assert calls.count("wait") == 1
    before = calls[: calls.index("wait")]
    assert ("gemm", (m, d), (d, 64)) in before  # the first block's recomputed logits
    assert ("into", (m, d)) in before  # and its hidden-state gradient


@pytest.mark.parametrize("too_many_labels", [False, True])
def test_weight_rows_written_in_place_in_half_precision(monkeypatch, too_many_labels):
    """All tokens in one block, bf16: each vocabulary block's weight-gradient GEMM writes its rows rounded (the path
    `weight_rows.rows_in_place` takes on CUDA, forced here on the CPU) and its labelled rows are made again in fp32
    with their label terms (`weight_rows.LabelledRows.redo_rows`), so the gradient is the fp32 block's, cast once:
    within one bf16 step of it everywhere. That includes rows whose product and label terms cancel: pairs of tokens
    with one hidden state and one upstream gradient, one labelled ``l`` and the other putting half its probability
    on ``l`` (adding the label term to the rounded product there would be many steps off). Where making the
    labelled rows again would not pay (`weight_rows.redo_pays`, with GEMMs made to look slow here), a block takes
    the fp32 path; blocks without a label still write in place."""
    from align_losses.ops import gemm, weight_rows

    g = torch.Generator().manual_seed(17)
    m, d, v, pairs = 48, 32, 300, 12
    hidden = torch.randn(m, d, generator=g)
    up = torch.randn(m, generator=g) * 2 + 0.5
    labels = torch.randperm(250, generator=g)[:m]  # distinct; ids 256-299 (the last block) get no label
    weight = torch.randn(v, d, generator=g) * 0.1
    hidden[pairs : 2 * pairs], up[pairs : 2 * pairs] = hidden[:pairs], up[:pairs]  # token i + pairs: token i again
    hidden[: 2 * pairs, d // 2 :] = 0  # the pairs in the first half of the dimensions, the other tokens in the second
    hidden[2 * pairs :, : d // 2] = 0
    hidden = hidden.bfloat16()
    weight[labels[: 2 * pairs]] = 2 * hidden[: 2 * pairs].float()  # a pair's two labels: logits ~32, p ~ 1/2 each
    weight = weight.bfloat16()
    options = {"memory_budget": 16 * m * 64, "token_chunk": m, "compile_tiles": False}  # 64-id blocks, 5 of them
    if too_many_labels:
        monkeypatch.setattr(weight_rows, "GEMM_FLOPS_PER_BYTE", 1e-3)

    def grads(in_place: bool):
        monkeypatch.setattr(gemm, "writes_bf16", lambda a: in_place)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logps = align_losses.linear_logprobs(h, w, labels, impl="torch", backend_options=options)
        (logps * up).sum().backward()
        return h.grad, w.grad

    redone, written = [], []
    real_redo, real_write = weight_rows.LabelledRows.redo_rows, weight_rows.write_rows
    monkeypatch.setattr(weight_rows.LabelledRows, "redo_rows", lambda self, out, *a: redone.append(out.shape[0]) or
                        real_redo(self, out, *a))
    monkeypatch.setattr(weight_rows, "write_rows", lambda out, *a: written.append(out.shape[0]) or real_write(out, *a))
    fp32_h, fp32_w = grads(False)
    assert not redone and not written
    ours_h, ours_w = grads(True)
    assert written == ([44] if too_many_labels else [64, 64, 64, 64, 44])  # ids 256-299: no label
    assert redone == written  # (a no-op for the block without a label)

    assert torch.equal(ours_h, fp32_h)  # the hidden-state gradient's path is unchanged
    assert bf16_ulps(ours_w, fp32_w).max() <= 1
    z = hidden.double() @ weight.double().t()
    p = torch.softmax(z, dim=1)
    assert p[:pairs, labels[:pairs]].diagonal().sub(0.5).abs().max() < 0.1
    grad_z = up.double()[:, None] * (torch.nn.functional.one_hot(labels, v).double() - p)
    want = grad_z.t() @ hidden.double()
    cancelled = labels[:pairs]
    assert want[cancelled].norm() < 0.05 * (up[:pairs, None].double() * hidden[:pairs].double()).norm()
    assert rel(ours_w, want) < 1e-2


def test_exact_reductions_restore_the_setting():
    """`gemm.mm_rounded`'s bf16 GEMMs run with reduced-precision reductions off, and PyTorch's setting comes back as
    it was, its split-K part included where torch has one (a bool assigned would set that part to True)."""
    from align_losses.ops import gemm

    matmul = torch.backends.cuda.matmul
    name = "allow_bf16_reduced_precision_reduction"
    read = getattr(torch._C, f"_get_cublas_{name}")  # the whole setting, a pair where torch has the split-K part
    before = read()
    settings = [(False, False), (False, True), (True, True)] if isinstance(before, tuple) else [False, True]
    try:
        for setting in settings:
            setattr(matmul, name, setting)
            with gemm._exact_reductions():
                assert getattr(matmul, name) is False
            assert read() == setting
    finally:
        setattr(matmul, name, before)


@pytest.mark.parametrize("leaf", ["hidden", "weight", "bias"])
def test_one_input_needs_a_gradient(leaf):
    """Only ``leaf`` requires grad (a frozen head and body, say, with a trained bias): its gradient
    still matches float64, label term included, over several tiles."""
    shape, d, v = (2, 37), 24, 301
    hidden, weight, bias, labels = _inputs(shape, d, v, bias=True, seed=41)
    named = {"hidden": hidden, "weight": weight, "bias": bias}
    named[leaf].requires_grad_()
    up = _upstream(shape, 3)
    stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=("entropy",), bias=bias,
                                            impl="torch", backend_options=SMALL_TILES)
    ref = token_stats(full_logits(hidden, weight, bias), labels)
    (got,) = torch.autograd.grad(sum((getattr(stats, n).double() * up[n]).sum() for n in ("logprobs", "entropy")),
                                 named[leaf])
    (want,) = torch.autograd.grad(sum((ref[n] * up[n]).sum() for n in ("logprobs", "entropy")), named[leaf])
    assert rel(got, want) < 1e-4


def test_weight_gradient_is_repeatable_with_one_label_everywhere():
    """Every token on one label: the torch backend sums that row's label entries in a fixed order, so
    the weight gradient comes out the same bit for bit (``index_put_(accumulate=True)`` on the CPU adds
    with atomics across threads from 32k elements: 16 different results in 20 runs, before)."""
    g = torch.Generator().manual_seed(8)
    m, d, v = 8192, 256, 512
    hidden = torch.randn(m, d, generator=g)
    weight = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
    labels = torch.full((m,), 7)
    up = torch.randn(m, generator=g)

    def grad_weight():
        logprobs = align_losses.linear_logprobs(hidden, weight, labels, impl="torch")
        return torch.autograd.grad((logprobs * up).sum(), weight)[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the suite runs on one thread (conftest), where no atomics race
    try:
        first = grad_weight()
        assert all(torch.equal(first, grad_weight()) for _ in range(4))
    finally:
        torch.set_num_threads(threads)


def test_reference_pass_saves_nothing_for_backward():
    hidden, weight, _, labels = _inputs((30,), 16, 50, bias=False, seed=4)
    hidden.requires_grad_()
    weight.requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = align_losses.linear_logprobs(hidden, weight, labels)
    assert out.grad_fn is None and packed == []


def test_autocast_fixes_the_compute_dtype_for_backward():
    hidden, weight, _, labels = _inputs((21,), 16, 40, bias=False, seed=6, ignore_frac=0.0)
    hidden.requires_grad_()
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = align_losses.linear_logprobs(hidden, weight, labels)
    out.sum().backward()  # backward outside autocast reuses the bf16 operands
    assert out.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ref = token_stats(full_logits(hidden.detach().bfloat16(), weight.detach().bfloat16()), labels)["logprobs"]
    assert rel(out, ref) < 1e-5  # the bf16 operands, multiplied with fp32 accumulation


@pytest.mark.parametrize("outputs", [(), ("entropy",)])
def test_backward_inside_autocast_is_the_fp32_backward(outputs):
    """A backward called inside an autocast region (a loop that keeps ``.backward()`` in it) runs its
    recomputed logits and GEMMs in fp32, as outside; it once rounded them to bf16 on the CPU. Both the
    losses' row-scaled backward (log-probs only) and the general one (with the entropy) are covered."""
    hidden, weight, _, labels = _inputs((3, 29), 24, 157, bias=False, seed=16)
    up = _upstream((3, 29), 16)

    def grads(inside: bool):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stats = align_losses.linear_token_stats(h, w, labels, outputs=outputs, impl="torch",
                                                    backend_options=SMALL_TILES)
            loss = sum((getattr(stats, n).double() * up[n]).sum() for n in ("logprobs", *outputs))
            if inside:
                return torch.autograd.grad(loss, (h, w))
        return torch.autograd.grad(loss, (h, w))

    for a, b in zip(grads(True), grads(False)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    hidden, weight, bias, labels = _inputs((2, 17), 32, 123, bias=True, seed=8, dtype=dtype)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    out = align_losses.linear_logprobs(hidden, weight, labels, bias=bias, backend_options=SMALL_TILES)
    ref = token_stats(full_logits(hidden, weight, bias), labels)["logprobs"]
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-5
    up = _upstream((2, 17), 3)["logprobs"]
    ours = torch.autograd.grad((out.double() * up).sum(), leaves)
    theirs = torch.autograd.grad((ref * up).sum(), leaves)
    for got, want, leaf in zip(ours, theirs, leaves):
        assert got.dtype == dtype and rel(got, want) < 1e-2  # one rounding of the result to the input dtype


def test_impl_pytorch_is_an_alias_and_env_var_overrides(monkeypatch, caplog):
    hidden, weight, _, labels = _inputs((11,), 8, 20, bias=False, seed=1)
    a = align_losses.linear_logprobs(hidden, weight, labels, impl="pytorch")
    monkeypatch.setenv("ALIGN_LOSSES_IMPL", "torch")
    b = align_losses.linear_logprobs(hidden, weight, labels)
    torch.testing.assert_close(a, b)
    monkeypatch.setenv("ALIGN_LOSSES_IMPL", "nope")
    with pytest.raises(ValueError, match="unknown impl 'nope'"):
        align_losses.linear_logprobs(hidden, weight, labels)


def test_auto_logs_its_choice_once(caplog, monkeypatch):
    from align_losses import backends

    monkeypatch.delenv("ALIGN_LOSSES_IMPL", raising=False)
    monkeypatch.setattr(backends, "_logged_choices", set())
    hidden, weight, _, labels = _inputs((11,), 8, 20, bias=False, seed=1)
    with caplog.at_level("INFO", logger="align_losses"):
        align_losses.linear_logprobs(hidden, weight, labels)
        align_losses.linear_logprobs(hidden, weight, labels)
    chosen = [r for r in caplog.records if "chose backend" in r.getMessage()]
    assert len(chosen) == 1 and "'torch'" in chosen[0].getMessage()


def _ops_per_pass(blocks: int, outputs: tuple) -> tuple[int, int]:
    """ATen ops that launch work (views left out) in the torch backend's forward and backward of a call over
    ``blocks`` vocabulary blocks of 256 ids, all 64 tokens in one token block, bf16; the log-probs and
    ``outputs`` differentiated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"slice", "unsqueeze", "squeeze", "t", "view", "expand", "select", "alias", "detach", "as_strided",
             "_unsafe_view", "transpose", "permute", "unbind", "split"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.__name__.split(".")[0] not in views
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(blocks)
    m, d = 64, 16
    hidden = torch.randn(m, d, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(blocks * 256, d, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, blocks * 256, (m,), generator=g)
    with Count() as fwd:
        stats = align_losses.linear_token_stats(hidden, weight, labels, outputs=outputs, impl="torch",
                                                backend_options={"memory_budget": 16 * m * 256})
    loss = sum((getattr(stats, name).float() * torch.randn(m, generator=g)).sum() for name in ("logprobs", *outputs))
    with Count() as bwd:
        loss.backward()
    return fwd.n, bwd.n


@pytest.mark.parametrize("outputs", [(), ("entropy",)])
def test_a_vocabulary_block_costs_few_launches(outputs):
    """On a GPU the torch backend's walk is host-bound when each block issues many small ops (28 blocks at a
    152k vocabulary: benchmarks/NOTES-torch.md). Per extra block, the forward and backward each launch at most
    ~25 ops here with eager tiles (on the CPU, 2 and 6 of them bf16 upcasts for its GEMMs), not the 28 and 43 of
    5752a65; with the entropy, about 35 each (39 and 44 at 5752a65)."""
    f2, b2 = _ops_per_pass(2, outputs)
    f5, b5 = _ops_per_pass(5, outputs)
    per_block_fwd, per_block_bwd = (f5 - f2) / 3, (b5 - b2) / 3
    # The tile functions are pure (`align_losses.ops.tiles`, so that they compile): eagerly, as here, their
    # results are new tensors copied into the stats, a few ops more than updating them in place would take.
    limit_fwd, limit_bwd = (28, 28) if not outputs else (38, 37)  # the entropy: its sums and the general backward
    assert per_block_fwd <= limit_fwd, per_block_fwd
    assert per_block_bwd <= limit_bwd, per_block_bwd
