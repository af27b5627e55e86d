"""The fused losses against "full float64 logits -> log_softmax -> the same loss", values, gradients and metrics.

The reference builds the ``[N, T, V]`` logits here (`reference.full_logits`), takes per-token
log-probs and statistics from them (`reference.token_stats`) and feeds the functional losses of
`align_losses.losses` (tested against their formulas elsewhere); SFT is checked against
``F.cross_entropy`` directly. Fused runs are float32; gradients must match within 1e-4 relative norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from align_losses.fused import (
    FusedCPOLoss,
    FusedDPOLoss,
    FusedKTOLoss,
    FusedORPOLoss,
    FusedSFTLoss,
    FusedSimPOLoss,
    fused_sequence_logps,
)
from align_losses.fused.layout import SequenceLayout
from align_losses.losses import cpo_loss, dpo_loss, kto_loss, ld_sequence_logps, orpo_loss, sequence_logps, wpo_weights
from reference import full_logits, rel, token_stats

B, T, D, V = 3, 11, 13, 37  # odd sizes; 2B = 6 rows
SMALL_TILES = {"memory_budget": 16 * 5 * 7, "token_chunk": 5}


@dataclass
class Batch:
    hidden: torch.Tensor  # [N, T, D] float32 leaf
    weight: torch.Tensor  # [V, D] float32 leaf
    bias: Optional[torch.Tensor]  # [V] leaf or None
    ids: torch.Tensor  # [N, T] input ids
    labels: torch.Tensor  # [N, T] ids, -100 on prompt and padding
    completion_mask: torch.Tensor  # [N, T] bool
    lengths: torch.Tensor  # [N] real (non-padding) length of each row

    def leaves(self):
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]


def make_batch(rows=2 * B, *, seed, bias=False, full_row=True) -> Batch:
    """Right-padded rows with prompts of 1-3 tokens; about half the labels are the argmax (nonzero accuracy)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 2 / D**0.5
    b = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(0, V, (rows, T), generator=g)
    with torch.no_grad():
        argmax = (hidden @ weight.T + (0 if b is None else b)).argmax(-1)
    hit = torch.rand(rows, T - 1, generator=g) < 0.5
    ids[:, 1:] = torch.where(hit, argmax[:, :-1], ids[:, 1:])
    lengths = torch.randint(T // 2 + 1, T + 1, (rows,), generator=g)
    if full_row:
        lengths[0] = T
    prompt = torch.randint(1, 4, (rows, 1), generator=g)
    pos = torch.arange(T)
    completion = (pos >= prompt) & (pos < lengths[:, None])
    for leaf in (hidden, weight, b):
        if leaf is not None:
            leaf.requires_grad_()
    return Batch(hidden, weight, b, ids, ids.masked_fill(~completion, -100), completion, lengths)


def reference_stats(batch: Batch, labels=None, **transform):
    """Float64 per-token stats from full logits (shifted) and the scored-token mask, each [N, T]."""
    labels = batch.labels if labels is None else labels
    stats = token_stats(full_logits(batch.hidden, batch.weight, batch.bias, **transform), labels, shift=True)
    mask = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) != -100
    return stats, mask


def halves(x):
    return x[: x.shape[0] // 2], x[x.shape[0] // 2 :]


def pack(x, lengths):
    """Padded [N, T, ...] -> packed [1, sum(lengths), ...] (the real tokens of each row, in order)."""
    return torch.cat([x[i, :n] for i, n in enumerate(lengths.tolist())])[None]


def cu_seqlens(lengths):
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def check_loss(got, want, leaves, tol=1e-4):
    assert got.dtype == torch.float32
    assert rel(got, want) < 1e-5, (got.item(), want.item())
    ours = torch.autograd.grad(got, leaves, retain_graph=True)
    theirs = torch.autograd.grad(want, leaves, retain_graph=True)
    for name, a, b in zip(("hidden", "weight", "bias"), ours, theirs):
        assert rel(a, b) < tol, name


def check_metrics(got: dict, want: dict):
    assert set(got) == set(want), set(got) ^ set(want)
    for key, value in want.items():
        assert not got[key].requires_grad and got[key].dim() == 0, key
        torch.testing.assert_close(got[key].double(), torch.as_tensor(value, dtype=torch.float64), rtol=1e-5, atol=1e-5, msg=key)


def reference_token_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def ref_logps(seed, n=B):
    g = torch.Generator().manual_seed(seed)
    return -20 + 5 * torch.randn(n, generator=g), -20 + 5 * torch.randn(n, generator=g)


# ----------------------------------------------------------------------------------------------- DPO

DPO_CASES = {
    "sigmoid_bias_transform": dict(loss=dict(loss_type="sigmoid", beta=0.2), bias=True, head=dict(softcap=3.0, temperature=0.8, logit_scale=1.3)),
    "weighted_list_with_sft": dict(loss=dict(loss_type=["sigmoid", "sft", "hinge"], loss_weights=[1.0, 0.5, 0.25])),
    "ipo_lengths": dict(loss=dict(loss_type="ipo", beta=0.3)),
    "sigmoid_norm_js": dict(loss=dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence")),
    "wpo_ld_robust": dict(loss=dict(loss_type="robust", label_smoothing=0.1, use_weighting=True, ld_alpha=0.4), bias=True),
}


def reference_dpo(batch, loss, ref_c, ref_r, transform):
    stats, mask = reference_stats(batch, **transform)
    (lp_c, lp_r), (m_c, m_r) = halves(stats["logprobs"]), halves(mask)
    options = dict(loss)
    ld_alpha, weighting = options.pop("ld_alpha", None), options.pop("use_weighting", False)
    if ld_alpha is None:
        chosen, rejected = sequence_logps(lp_c, m_c), sequence_logps(lp_r, m_r)
    else:
        chosen, rejected = ld_sequence_logps(lp_c, m_c, lp_r, m_r, ld_alpha=ld_alpha)
    weights = None
    if weighting:
        (p2_c, p2_r) = halves(stats["log_sum_p2"])
        weights = wpo_weights(lp_c, p2_c, m_c, lp_r, p2_r, m_r)
    result = dpo_loss(
        chosen, rejected, ref_c.double(), ref_r.double(), chosen_lengths=m_c.sum(-1), rejected_lengths=m_r.sum(-1),
        chosen_token_logps=lp_c, chosen_token_mask=m_c, wpo_weights=weights, **options,
    )
    (ml_c, ml_r), (hit_c, _) = halves(stats["mean_logit"]), halves(stats["argmax_hit"])
    metrics = {
        "rewards/chosen": result.chosen_rewards.mean(),
        "rewards/rejected": result.rejected_rewards.mean(),
        "rewards/accuracies": result.reward_accuracies.mean(),
        "rewards/margins": result.reward_margins.mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "logits/chosen": reference_token_mean(ml_c, m_c),
        "logits/rejected": reference_token_mean(ml_r, m_r),
        "entropy": reference_token_mean(stats["entropy"], mask),
        "mean_token_accuracy": reference_token_mean(hit_c, m_c),
    }
    return result.loss, metrics


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_matches_full_logits(case):
    spec = DPO_CASES[case]
    batch = make_batch(seed=len(case), bias=spec.get("bias", False))
    transform = spec.get("head", {})
    ref_c, ref_r = ref_logps(1)
    tiles = SMALL_TILES if transform else None  # odd tiles once; the core's own tests cover the rest
    fused = FusedDPOLoss(**spec["loss"], backend_options=tiles, **transform)
    out = fused(batch.hidden, batch.weight, batch.labels, bias=batch.bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    want, metrics = reference_dpo(batch, spec["loss"], ref_c, ref_r, transform)
    check_loss(out.loss, want, batch.leaves())
    check_metrics(out.metrics, metrics)


def test_dpo_packed_equals_padded():
    batch = make_batch(seed=5, bias=True)
    ref_c, ref_r = ref_logps(2)
    fused = FusedDPOLoss(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.3, 0.2], ld_alpha=0.5, use_weighting=True)
    padded = fused(batch.hidden, batch.weight, batch.labels, bias=batch.bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    hidden = pack(batch.hidden.detach(), batch.lengths).requires_grad_()
    packed = fused(
        hidden, batch.weight, pack(batch.labels, batch.lengths), bias=batch.bias,
        ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, cu_seqlens=cu_seqlens(batch.lengths),
    )
    assert rel(packed.loss, padded.loss) < 1e-6
    for key in padded.metrics:
        torch.testing.assert_close(packed.metrics[key], padded.metrics[key], rtol=1e-5, atol=1e-6)
    g_padded = torch.autograd.grad(padded.loss, [batch.hidden, batch.weight, batch.bias])
    g_packed = torch.autograd.grad(packed.loss, [hidden, batch.weight, batch.bias])
    assert rel(g_packed[0], pack(g_padded[0], batch.lengths)) < 1e-5
    assert rel(g_packed[1], g_padded[1]) < 1e-5 and rel(g_packed[2], g_padded[2]) < 1e-5


def test_packed_masks_each_sequences_first_label():
    """A packed sequence's first label is not scored from the previous sequence's last position."""
    batch = make_batch(seed=6)
    labels = batch.ids.masked_fill(torch.arange(T) >= batch.lengths[:, None], -100)  # no prompt mask at all
    fused = FusedDPOLoss(reference_free=True)
    padded = fused(batch.hidden, batch.weight, labels)
    packed = fused(pack(batch.hidden, batch.lengths), batch.weight, pack(labels, batch.lengths), cu_seqlens=cu_seqlens(batch.lengths))
    assert rel(packed.loss, padded.loss) < 1e-6
    torch.testing.assert_close(packed.metrics["logps/chosen"], padded.metrics["logps/chosen"])


def test_dpo_compute_metrics_false_asks_only_for_loss_outputs():
    assert FusedDPOLoss().outputs() == ("entropy", "mean_logit", "argmax_hit")
    assert FusedDPOLoss(compute_metrics=False).outputs() == ()
    assert FusedDPOLoss(use_weighting=True, compute_metrics=False).outputs() == ("log_sum_p2",)
    batch = make_batch(seed=7)
    ref_c, ref_r = ref_logps(3)
    out = FusedDPOLoss(compute_metrics=False)(batch.hidden, batch.weight, batch.labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    assert set(out.metrics) == {f"{k}/{s}" for k in ("rewards", "logps") for s in ("chosen", "rejected")} | {
        "rewards/accuracies", "rewards/margins"
    }


def test_fused_sequence_logps_matches_reference():
    batch = make_batch(seed=8)
    stats, mask = reference_stats(batch)
    torch.testing.assert_close(fused_sequence_logps(batch.hidden, batch.weight, batch.labels).double(), sequence_logps(stats["logprobs"], mask), rtol=1e-5, atol=1e-5)
    got = fused_sequence_logps(batch.hidden, batch.weight, batch.labels, ld_alpha=0.3)
    (lp_c, lp_r), (m_c, m_r) = halves(stats["logprobs"]), halves(mask)
    torch.testing.assert_close(got.double(), torch.cat(ld_sequence_logps(lp_c, m_c, lp_r, m_r, ld_alpha=0.3)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- errors


def test_paired_errors():
    batch = make_batch(seed=9)
    ref_c, ref_r = ref_logps(4)
    fused = FusedDPOLoss()
    refs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    with pytest.raises(ValueError, match="2B sequences"):
        fused(batch.hidden[:5], batch.weight, batch.labels[:5], **refs)
    with pytest.raises(ValueError, match="reference log-probs"):
        fused(batch.hidden, batch.weight, batch.labels, ref_chosen_logps=ref_c)
    with pytest.raises(ValueError, match="reference log-probs"):
        fused(batch.hidden, batch.weight, batch.labels)
    with pytest.raises(ValueError, match="reference_free=True"):
        FusedDPOLoss(reference_free=True)(batch.hidden, batch.weight, batch.labels, **refs)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        fused(batch.hidden, batch.weight, batch.labels, ref_chosen_logps=ref_c[:2], ref_rejected_logps=ref_r)
    with pytest.raises(ValueError, match="Unknown DPO loss_type"):
        FusedDPOLoss(loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="Unknown CPO loss_type"):
        FusedCPOLoss(loss_type="nope")
    with pytest.raises(TypeError):
        FusedDPOLoss(not_an_option=1)
    with pytest.raises(ValueError, match="2B sequences"):
        FusedORPOLoss()(batch.hidden[:3], batch.weight, batch.labels[:3])


def test_cu_seqlens_errors():
    batch = make_batch(seed=10)
    hidden, labels = pack(batch.hidden, batch.lengths), pack(batch.labels, batch.lengths)
    cu = cu_seqlens(batch.lengths)
    fused = FusedDPOLoss(reference_free=True)
    bad = {
        "end at T_total": torch.cat([cu[:-1], cu[-1:] - 1]),
        "start at 0": cu + 1,
        "non-decreasing": cu[[0, 2, 1, 3, 4, 5, 6]],
        "integer": cu.float(),
        "1-D": cu[None],
    }
    for match, value in bad.items():
        with pytest.raises(ValueError, match=match):
            fused(hidden, batch.weight, labels, cu_seqlens=value)
    with pytest.raises(ValueError, match=r"labels \[1, T_total\]"):
        fused(batch.hidden, batch.weight, batch.labels, cu_seqlens=cu)
    with pytest.raises(ValueError, match="2B sequences"):  # 5 packed sequences
        fused(hidden, batch.weight, labels, cu_seqlens=torch.cat([cu[:2], cu[3:]]))
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        fused(batch.hidden[0], batch.weight, batch.labels[0])


class HeadPassRan(Exception):
    """Raised by the stand-in core: the head pass was reached."""


@pytest.fixture
def no_head_pass(monkeypatch):
    """Replace the core entry that `head_pass` calls; a call that reaches it raises `HeadPassRan`."""

    def core(*args, **kwargs):
        raise HeadPassRan

    monkeypatch.setattr("align_losses.fused.tokens.linear_token_stats", core)


def test_configuration_errors_raise_at_construction():
    cases = [
        (lambda: FusedDPOLoss(loss_type="exo_pair"), "needs label_smoothing > 0"),
        (lambda: FusedDPOLoss(loss_type="exo_pair", label_smoothing=1.0), "and < 1"),
        (lambda: FusedDPOLoss(ld_alpha=1.5), r"ld_alpha must lie in \[0, 1\]"),
        (lambda: FusedDPOLoss(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "one weight per loss type"),
        (lambda: FusedDPOLoss(loss_type="aot", use_weighting=True), "sort the pairs"),
        (lambda: FusedDPOLoss(f_divergence_type="chi2"), "Unknown f_divergence_type"),
        (lambda: FusedDPOLoss(loss_type="bco_pair", f_divergence_type="js_divergence"), "only supported"),
        (lambda: FusedSFTLoss(label_smoothing=1.5), r"must lie in \[0, 1\]"),
        (lambda: FusedSFTLoss(loss_type="dft", label_smoothing=0.1), "only defined for loss_type='nll'"),
        (lambda: FusedSFTLoss(z_loss=-1.0), "z_loss must be >= 0"),
        (lambda: FusedSFTLoss(loss_type="ce"), "Unknown SFT loss_type"),
        (lambda: FusedSFTLoss(loss_type="chunked_nll"), "deprecated alias of 'nll'"),
        (lambda: FusedKTOLoss(loss_type="nope"), "Unknown KTO loss_type"),
        (lambda: FusedCPOLoss(loss_type="nope"), "Unknown CPO loss_type"),
    ]
    for build, match in cases:
        with pytest.raises(ValueError, match=match):
            build()


def test_bad_inputs_are_refused_before_the_head_pass(no_head_pass):
    batch = make_batch(seed=12)
    ref_c, ref_r = ref_logps(4)
    refs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    hidden, labels = pack(batch.hidden, batch.lengths), pack(batch.labels, batch.lengths)
    cu = cu_seqlens(batch.lengths)
    five = torch.cat([cu[:2], cu[3:]])  # 5 packed sequences
    dpo, free = FusedDPOLoss(), FusedDPOLoss(reference_free=True)
    kto, ref_kto = FusedKTOLoss(), ref_c.repeat(2)
    cases = [
        (lambda: dpo(batch.hidden[:5], batch.weight, batch.labels[:5], **refs), "2B sequences"),
        (lambda: free(hidden, batch.weight, labels, cu_seqlens=five), "2B sequences"),
        (lambda: dpo(batch.hidden, batch.weight, batch.labels, ref_chosen_logps=ref_c[:2], ref_rejected_logps=ref_r), r"shape \[3\]"),
        (lambda: dpo(hidden, batch.weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r[:2], cu_seqlens=cu), r"shape \[3\]"),
        (lambda: dpo(batch.hidden, batch.weight, batch.labels, ref_chosen_logps=ref_c), "reference log-probs"),
        (lambda: free(batch.hidden, batch.weight, batch.labels, **refs), "reference_free=True"),
        (lambda: free(batch.hidden, batch.weight, batch.labels, cu_seqlens=cu), r"labels \[1, T_total\]"),
        (lambda: free(hidden, batch.weight, labels, cu_seqlens=cu.float()), "integer"),
        (lambda: FusedORPOLoss()(batch.hidden[:3], batch.weight, batch.labels[:3]), "2B sequences"),
        (lambda: FusedCPOLoss()(hidden, batch.weight, labels, cu_seqlens=five), "2B sequences"),
        (lambda: FusedSimPOLoss()(batch.hidden[:5], batch.weight, batch.labels[:5]), "2B sequences"),
        (lambda: fused_sequence_logps(batch.hidden, batch.weight, batch.labels, ld_alpha=0.5, average=True), "average=True"),
        (lambda: fused_sequence_logps(batch.hidden[:5], batch.weight, batch.labels[:5], ld_alpha=0.5), "2B sequences"),
        (lambda: kto(batch.hidden, batch.weight, batch.labels, torch.ones(5), ref_logps=ref_kto), r"`desirable` must be a \[6\]"),
        (lambda: kto(hidden, batch.weight, labels, torch.ones(6, 1), ref_logps=ref_kto, cu_seqlens=cu), r"`desirable` must be a \[6\]"),
        (lambda: kto(batch.hidden, batch.weight, batch.labels, torch.ones(6), ref_logps=ref_c), r"`ref_logps` must be a tensor of shape \[6\]"),
        (lambda: kto(batch.hidden, batch.weight, batch.labels, torch.ones(6)), "reference log-probs"),
        (lambda: kto(batch.hidden, batch.weight, batch.labels, torch.ones(6), ref_logps=ref_kto), "needs `kl`"),
        (lambda: FusedKTOLoss(loss_type="apo_zero_unpaired")(batch.hidden, batch.weight, batch.labels, torch.ones(6),
                                                           ref_logps=ref_kto, kl=torch.tensor(0.1)), "pass kl=None"),
        (lambda: fused_sequence_logps(batch.hidden, batch.weight, batch.labels, ld_alpha=-0.5), r"\[0, 1\]"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # the stand-in is in place: valid calls do reach it
    with pytest.raises(HeadPassRan):
        dpo(hidden, batch.weight, labels, cu_seqlens=cu, **refs)
    with pytest.raises(HeadPassRan):
        kto(batch.hidden, batch.weight, batch.labels, torch.ones(6), ref_logps=ref_kto, kl=torch.tensor(0.1))


def test_packed_layout_reads_the_boundaries_once(monkeypatch):
    """The longest sequence and the sequence starts come from the host-side bounds (no further sync)."""
    labels = torch.arange(7)[None]
    cu = torch.tensor([0, 3, 3, 6, 7, 7])  # empty sequences in the middle and at the end
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    for name in ("item", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("device sync"))
    layout = SequenceLayout.of(labels, cu)
    monkeypatch.undo()
    assert reads == [1]
    assert (layout.num_sequences, layout.length) == (5, 3)
    assert layout.without_sequence_starts(labels, -1).tolist() == [[-1, 1, 2, -1, 4, 5, -1]]
    assert layout.arrange(labels).tolist() == [[0, 1, 2], [0, 0, 0], [3, 4, 5], [6, 0, 0], [0, 0, 0]]


# ----------------------------------------------------------------------------------------------- ORPO / CPO / SimPO


def test_orpo_matches_full_logits_with_prompt_nll():
    """TRL's layout: labels cover prompt + completion (NLL), completion_mask picks the odds-ratio tokens."""
    batch = make_batch(seed=11, bias=True)
    attention = torch.arange(T) < batch.lengths[:, None]
    labels = batch.ids.masked_fill(~attention, -100)
    out = FusedORPOLoss(beta=0.25)(
        batch.hidden, batch.weight, labels, bias=batch.bias, completion_mask=batch.completion_mask.long()
    )
    stats, mask = reference_stats(batch, labels)
    completion = mask & torch.cat([batch.completion_mask[:, 1:], torch.zeros(2 * B, 1, dtype=torch.bool)], 1)
    (lp_c, lp_r), (m_c, _), (c_c, c_r) = halves(stats["logprobs"]), halves(mask), halves(completion)
    chosen, rejected = sequence_logps(lp_c, c_c, average=True), sequence_logps(lp_r, c_r, average=True)
    nll = -(lp_c * m_c).sum() / m_c.sum()  # token mean over prompt and completion of the chosen rows
    want = orpo_loss(chosen, rejected, beta=0.25, nll_loss=nll)
    check_loss(out.loss, want.loss, batch.leaves())
    ml_c, ml_r = halves(stats["mean_logit"])
    check_metrics(out.metrics, {
        "rewards/chosen": 0.25 * chosen.mean(), "rewards/rejected": 0.25 * rejected.mean(),
        "rewards/accuracies": (chosen > rejected).double().mean(), "rewards/margins": 0.25 * (chosen - rejected).mean(),
        "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": nll,
        "log_odds_ratio": want.log_odds_ratio.mean(), "log_odds_chosen": want.log_odds_chosen.mean(),
        "logits/chosen": reference_token_mean(ml_c, c_c), "logits/rejected": reference_token_mean(ml_r, c_r),
    })


def test_orpo_packed_equals_padded():
    batch = make_batch(seed=12)
    padded = FusedORPOLoss()(batch.hidden, batch.weight, batch.labels)
    packed = FusedORPOLoss()(pack(batch.hidden, batch.lengths), batch.weight, pack(batch.labels, batch.lengths), cu_seqlens=cu_seqlens(batch.lengths))
    assert rel(packed.loss, padded.loss) < 1e-6


CPO_CASES = {
    "sigmoid_nll": dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.1),
    "ipo_average": dict(loss_type="ipo", cpo_alpha=0.5),
    "simpo_alphapo_shape": dict(loss_type="simpo", cpo_alpha=0.3, alpha=0.2, simpo_gamma=0.7),
    "hinge_no_nll": dict(loss_type="hinge", cpo_alpha=0.0),
}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_matches_full_logits(case):
    opts = CPO_CASES[case]
    batch = make_batch(seed=20 + len(case), bias=True)
    out = FusedCPOLoss(beta=0.3, **opts)(batch.hidden, batch.weight, batch.labels, bias=batch.bias)
    stats, mask = reference_stats(batch)
    (lp_c, lp_r), (m_c, m_r) = halves(stats["logprobs"]), halves(mask)
    chosen, rejected = sequence_logps(lp_c, m_c), sequence_logps(lp_r, m_r)
    want = cpo_loss(chosen, rejected, beta=0.3, chosen_lengths=m_c.sum(-1), rejected_lengths=m_r.sum(-1),
                    chosen_token_logps=lp_c, chosen_token_mask=m_c, **opts)
    check_loss(out.loss, want.loss, batch.leaves())
    if opts["loss_type"] in ("ipo", "simpo"):
        chosen, rejected = sequence_logps(lp_c, m_c, average=True), sequence_logps(lp_r, m_r, average=True)
    ml_c, ml_r = halves(stats["mean_logit"])
    check_metrics(out.metrics, {
        "rewards/chosen": want.chosen_rewards.mean(), "rewards/rejected": want.rejected_rewards.mean(),
        "rewards/accuracies": want.reward_accuracies.mean(), "rewards/margins": want.reward_margins.mean(),
        "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": want.nll_loss,
        "logits/chosen": reference_token_mean(ml_c, m_c), "logits/rejected": reference_token_mean(ml_r, m_r),
    })


def test_simpo_is_cpo_simpo_without_nll_and_packs():
    batch = make_batch(seed=30)
    simpo = FusedSimPOLoss(beta=2.0, simpo_gamma=0.4)
    out = simpo(batch.hidden, batch.weight, batch.labels)
    stats, mask = reference_stats(batch)
    (lp_c, lp_r), (m_c, m_r) = halves(stats["logprobs"]), halves(mask)
    want = cpo_loss(sequence_logps(lp_c, m_c), sequence_logps(lp_r, m_r), beta=2.0, loss_type="simpo", simpo_gamma=0.4,
                    cpo_alpha=0.0, chosen_lengths=m_c.sum(-1), rejected_lengths=m_r.sum(-1))
    check_loss(out.loss, want.loss, batch.leaves())
    assert out.metrics["nll_loss"] == 0
    packed = simpo(pack(batch.hidden, batch.lengths), batch.weight, pack(batch.labels, batch.lengths), cu_seqlens=cu_seqlens(batch.lengths))
    assert rel(packed.loss, out.loss) < 1e-6


# ----------------------------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_full_logits(loss_type):
    rows = 5
    batch = make_batch(rows, seed=40, bias=True)
    desirable = torch.tensor([True, False, True, True, False])
    ref, _ = ref_logps(5, rows)
    kl = torch.tensor(0.7) if loss_type == "kto" else None
    fused = FusedKTOLoss(beta=0.2, loss_type=loss_type, desirable_weight=1.5, undesirable_weight=0.8)
    out = fused(batch.hidden, batch.weight, batch.labels, desirable, bias=batch.bias, ref_logps=ref, kl=kl)
    stats, mask = reference_stats(batch)
    logps = sequence_logps(stats["logprobs"], mask)
    want = kto_loss(logps, ref.double(), desirable, None if kl is None else kl.double(), beta=0.2, loss_type=loss_type,
                    desirable_weight=1.5, undesirable_weight=0.8)
    check_loss(out.loss, want.loss, batch.leaves())
    ml, good = stats["mean_logit"], desirable[:, None]
    check_metrics(out.metrics, {
        "kl": want.kl, "entropy": reference_token_mean(stats["entropy"], mask),
        "logits/chosen": reference_token_mean(ml, mask & good), "logits/rejected": reference_token_mean(ml, mask & ~good),
        "rewards/chosen": want.chosen_rewards.mean(), "logps/chosen": logps[desirable].mean(),
        "rewards/rejected": want.rejected_rewards.mean(), "logps/rejected": logps[~desirable].mean(),
        "rewards/margins": want.chosen_rewards.mean() - want.rejected_rewards.mean(),
    })
    packed = fused(pack(batch.hidden, batch.lengths), batch.weight, pack(batch.labels, batch.lengths), desirable,
                   bias=batch.bias, ref_logps=ref, kl=kl, cu_seqlens=cu_seqlens(batch.lengths))
    assert rel(packed.loss, out.loss) < 1e-6


def test_kto_one_sided_batch_and_errors():
    batch = make_batch(4, seed=41)
    ref, _ = ref_logps(6, 4)
    fused = FusedKTOLoss()
    out = fused(batch.hidden, batch.weight, batch.labels, torch.ones(4, dtype=torch.bool), ref_logps=ref, kl=torch.tensor(0.1))
    assert "rewards/chosen" in out.metrics and "logits/chosen" in out.metrics
    assert not {"rewards/rejected", "logps/rejected", "logits/rejected", "rewards/margins"} & set(out.metrics)
    with pytest.raises(ValueError, match="needs `kl`"):
        fused(batch.hidden, batch.weight, batch.labels, torch.ones(4), ref_logps=ref)
    with pytest.raises(ValueError, match="reference log-probs"):
        fused(batch.hidden, batch.weight, batch.labels, torch.ones(4), kl=torch.tensor(0.1))
    with pytest.raises(ValueError, match="`desirable` must be a \\[4\\]"):
        fused(batch.hidden, batch.weight, batch.labels, torch.ones(3), ref_logps=ref, kl=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"`ref_logps` must be a tensor of shape \[4\]"):
        fused(batch.hidden, batch.weight, batch.labels, torch.ones(4), ref_logps=ref[:3], kl=torch.tensor(0.1))


# ----------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize(
    "opts", [dict(), dict(label_smoothing=0.15, z_loss=1e-2), dict(loss_type="dft"), dict(z_loss=0.1, num_items=40)],
    ids=["nll", "smoothing_zloss", "dft", "zloss_num_items"],
)
def test_sft_matches_cross_entropy(opts):
    opts = dict(opts)
    num_items = opts.pop("num_items", None)
    batch = make_batch(4, seed=50, bias=True)
    fused = FusedSFTLoss(softcap=4.0, **opts)
    out = fused(batch.hidden, batch.weight, batch.labels, bias=batch.bias, num_items_in_batch=num_items)
    z = full_logits(batch.hidden, batch.weight, batch.bias, softcap=4.0)[:, :-1].reshape(-1, V)
    target = batch.labels[:, 1:].reshape(-1)
    keep = target != -100
    divisor = keep.sum() if num_items is None else num_items
    if opts.get("loss_type") == "dft":
        logp = -F.cross_entropy(z, target, reduction="none")
        want = -(logp * logp.detach().exp()).sum() / divisor
    else:
        want = F.cross_entropy(z, target, reduction="sum", label_smoothing=opts.get("label_smoothing", 0.0)) / divisor
    want = want + opts.get("z_loss", 0.0) * (torch.logsumexp(z, -1).square() * keep).sum() / divisor
    check_loss(out.loss, want, batch.leaves())
    stats, mask = reference_stats(batch, softcap=4.0)
    check_metrics(out.metrics, {
        "entropy": reference_token_mean(stats["entropy"], mask),
        "mean_token_accuracy": reference_token_mean(stats["argmax_hit"], mask),
    })


def test_sft_outputs_and_packed_boundaries():
    assert FusedSFTLoss(compute_metrics=False).outputs() == ()
    assert FusedSFTLoss(label_smoothing=0.1, z_loss=1.0, compute_metrics=False).outputs() == ("mean_logit", "logsumexp")
    assert FusedSFTLoss(z_loss=1.0).outputs() == ("logsumexp", "entropy", "argmax_hit")
    batch = make_batch(4, seed=51)
    labels = batch.ids.masked_fill(torch.arange(T) >= batch.lengths[:, None], -100)  # first labels not masked
    fused = FusedSFTLoss(label_smoothing=0.1)
    padded = fused(batch.hidden, batch.weight, labels)
    packed = fused(pack(batch.hidden, batch.lengths), batch.weight, pack(labels, batch.lengths), cu_seqlens=cu_seqlens(batch.lengths))
    assert rel(packed.loss, padded.loss) < 1e-6
    assert packed.result.num_items == padded.result.num_items
