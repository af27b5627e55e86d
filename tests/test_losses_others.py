"""ORPO, CPO/SimPO/AlphaPO, KTO and SFT against references written here from the formulas.

References use Python floats and `math` (float64) on the inputs as rounded to the tested dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align_losses.losses import check_cpo_args, check_kto_args, check_sft_args, cpo_loss, kto_loss, orpo_loss
from align_losses.losses import sft_loss, sft_outputs, sft_token_losses, simpo_loss

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-6, atol=1e-7), torch.float32: dict(rtol=1e-5, atol=1e-7)}


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def close(actual: torch.Tensor, expected, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=dtype), **TOL[dtype])


def uniform(seed: int, shape, low: float, high: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


def token_batch(seed: int, dtype: torch.dtype, shape=(4, 9)):
    logps = uniform(seed, shape, -5.0, -0.01, dtype)
    mask = uniform(seed + 1, shape, 0, 1, torch.float64) < 0.7
    kept = [v for v, m in zip(logps.flatten().tolist(), mask.flatten().tolist()) if m]
    return logps, mask, kept


# ---------------------------------------------------------------- ORPO


def test_orpo_by_hand():
    # p_c = 1/2 (odds 1), p_r = 1/4 (odds 1/3): log odds ratio log 3, log sigmoid(log 3) = log 3/4.
    out = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), beta=0.1, nll_loss=torch.tensor(2.0))
    close(out.or_loss, -0.1 * math.log(0.75), torch.float32)
    close(out.loss, 2.0 - 0.1 * math.log(0.75), torch.float32)
    close(out.log_odds_chosen, [math.log(3)], torch.float32)
    close(out.log_odds_ratio, [math.log(0.75)], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_with_token_nll(dtype):
    beta = 0.25
    chosen, rejected = uniform(1, 6, -3.0, -0.05, dtype), uniform(2, 6, -4.0, -0.6, dtype)
    logps, mask, kept = token_batch(3, dtype)
    out = orpo_loss(chosen, rejected, beta=beta, chosen_token_logps=logps, chosen_token_mask=mask)
    nll = -sum(kept) / len(kept)
    log_odds = [
        (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        for c, r in zip(chosen.tolist(), rejected.tolist())
    ]
    ratio = [logsig(v) for v in log_odds]
    close(out.nll_loss, nll, dtype)
    close(out.loss, nll - beta * sum(ratio) / 6, dtype)
    close(out.log_odds_chosen, log_odds, dtype)
    close(out.log_odds_ratio, ratio, dtype)
    close(out.chosen_rewards, [beta * c for c in chosen.tolist()], dtype)
    close(out.rejected_rewards, [beta * r for r in rejected.tolist()], dtype)


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_orpo_average_logp_of_zero_stays_finite(side):
    """A completion of confidently predicted tokens can average exactly 0 in float32 (TRL 1.16 then
    gives NaN gradients): the loss and the gradients stay finite, and the other pair is unaffected."""
    chosen = torch.tensor([0.0 if side == "chosen" else -0.3, -0.7], requires_grad=True)
    rejected = torch.tensor([0.0 if side == "rejected" else -0.9, -1.2], requires_grad=True)
    out = orpo_loss(chosen, rejected, beta=0.1, nll_loss=torch.tensor(0.0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    plain = orpo_loss(chosen[1:].detach(), rejected[1:].detach(), beta=0.1, nll_loss=torch.tensor(0.0))
    assert torch.allclose(out.log_odds_chosen[1], plain.log_odds_chosen[0])


def test_orpo_half_precision_is_computed_in_float32():
    out = orpo_loss(torch.tensor([-0.5], dtype=torch.bfloat16), torch.tensor([-1.5], dtype=torch.bfloat16),
                    nll_loss=torch.tensor(0.0))
    assert out.or_loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "exactly one of `nll_loss` or `chosen_token_logps`"),
        (dict(nll_loss=torch.tensor(1.0), chosen_token_logps=torch.zeros(2, 3)), "exactly one of"),
        (dict(chosen_token_logps=torch.zeros(2, 3)), "needs `chosen_token_mask`"),
    ],
)
def test_orpo_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        orpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), **kwargs)


# ---------------------------------------------------------------- CPO / SimPO / AlphaPO

CPO_BETA, GAMMA, EPS = 0.4, 0.6, 0.1


def cpo_reference(kind: str, c, r, lc, lr, alpha: float, label_smoothing: float) -> list[float]:
    if kind in ("ipo", "simpo", "alphapo"):
        c = [v / n for v, n in zip(c, lc)]
        r = [v / n for v, n in zip(r, lr)]
    if alpha != 0:
        c = [(1 - math.exp(v) ** -alpha) / alpha for v in c]
        r = [(1 - math.exp(v) ** -alpha) / alpha for v in r]
    out = []
    for rc, rr in zip(c, r):
        h = CPO_BETA * (rc - rr)
        if kind in ("simpo", "alphapo"):
            h -= GAMMA
        if kind == "hinge":
            out.append(max(0.0, 1 - h))
        elif kind == "ipo":
            out.append((rc - rr - 1 / (2 * CPO_BETA)) ** 2)
        else:
            out.append(-(1 - label_smoothing) * logsig(h) - label_smoothing * logsig(-h))
    return out, c, r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_cpo_each_type(loss_type, alpha, dtype):
    lc, lr = torch.randint(1, 12, (2, 6), generator=torch.Generator().manual_seed(5))
    chosen = uniform(6, 6, -1.5, -0.05, dtype) * lc
    rejected = uniform(7, 6, -1.8, -0.05, dtype) * lr
    logps, mask, kept = token_batch(8, dtype)
    label_smoothing = 0.0 if loss_type in ("hinge", "ipo") else EPS
    out = cpo_loss(
        chosen, rejected, beta=CPO_BETA, loss_type=loss_type, label_smoothing=label_smoothing, cpo_alpha=0.7,
        simpo_gamma=GAMMA, alpha=alpha, chosen_lengths=lc, rejected_lengths=lr,
        chosen_token_logps=logps, chosen_token_mask=mask,
    )
    losses, rc, rr = cpo_reference(
        loss_type, chosen.tolist(), rejected.tolist(), lc.tolist(), lr.tolist(), alpha, label_smoothing
    )
    nll = 0.0 if loss_type == "alphapo" else -sum(kept) / len(kept)  # "alphapo" forces cpo_alpha = 0
    close(out.nll_loss, nll, dtype)
    close(out.loss, sum(losses) / 6 + (0.0 if loss_type == "alphapo" else 0.7) * nll, dtype)
    close(out.chosen_rewards, [CPO_BETA * v for v in rc], dtype)
    close(out.rejected_rewards, [CPO_BETA * v for v in rr], dtype)
    # the log-probs the loss read: averaged for ipo/simpo/alphapo, before the AlphaPO shaping
    averaged = loss_type in ("ipo", "simpo", "alphapo")
    close(out.chosen_logps, chosen / lc if averaged else chosen, dtype)
    close(out.rejected_logps, rejected / lr if averaged else rejected, dtype)
    assert not out.chosen_logps.requires_grad


def test_simpo_by_hand():
    # Averages -1 and -3, beta 2, gamma 0.5: h = 2 * 2 - 0.5 = 3.5.
    out = simpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([4]), torch.tensor([2]), beta=2.0)
    close(out.loss, -logsig(3.5), torch.float32)
    close(out.nll_loss, 0.0, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simpo_is_cpo_simpo_without_nll(dtype):
    lc, lr = torch.tensor([3, 7, 1]), torch.tensor([5, 2, 9])
    chosen, rejected = uniform(9, 3, -10.0, -1.0, dtype), uniform(10, 3, -10.0, -1.0, dtype)
    out = simpo_loss(chosen, rejected, lc, lr, beta=CPO_BETA, simpo_gamma=GAMMA, label_smoothing=EPS)
    losses, _, _ = cpo_reference("simpo", chosen.tolist(), rejected.tolist(), lc.tolist(), lr.tolist(), 0.0, EPS)
    close(out.loss, sum(losses) / 3, dtype)


def test_alphapo_reward_stays_finite_on_long_sums():
    # p = exp(-200) underflows in float32, so exp(logp) ** -alpha would be inf; the reward is finite.
    out = cpo_loss(torch.tensor([-200.0]), torch.tensor([-210.0]), alpha=0.1, cpo_alpha=0.0, beta=1e-3)
    expected = (1 - math.exp(20.0)) / 0.1 - (1 - math.exp(21.0)) / 0.1
    close(out.loss, -logsig(1e-3 * expected), torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="kto_pair"), "Unknown CPO loss_type"),
        (dict(loss_type="simpo", cpo_alpha=0.0), "needs `chosen_lengths` and `rejected_lengths`"),
        (
            dict(
                loss_type="ipo",
                nll_loss=torch.tensor(1.0),
                chosen_lengths=torch.ones(2),
                rejected_lengths=torch.ones(3),
            ),
            "rejected_lengths",
        ),
        (dict(loss_type="sigmoid"), "cpo_loss with cpo_alpha != 0 needs exactly one of"),
    ],
)
def test_cpo_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), **kwargs)


def test_check_args_alone():
    check_cpo_args("alphapo")
    check_kto_args("apo_zero_unpaired")
    check_sft_args("dft", 0.0, 0.5)
    for check, match in ((lambda: check_cpo_args("dpo"), "Unknown CPO"), (lambda: check_kto_args("dpo"), "Unknown KTO"),
                         (lambda: check_sft_args("nll", -0.1), r"\[0, 1\]"), (lambda: check_sft_args("dft", 0.1), "only defined")):
        with pytest.raises(ValueError, match=match):
            check()


def test_cpo_label_smoothing_ignored_with_warning_for_hinge():
    args = (torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.5]))
    with pytest.warns(UserWarning, match="ignored"):
        smoothed = cpo_loss(*args, loss_type="hinge", label_smoothing=0.3, cpo_alpha=0.0)
    close(smoothed.loss, cpo_loss(*args, loss_type="hinge", cpo_alpha=0.0).loss, torch.float32)


# ---------------------------------------------------------------- KTO


def test_kto_by_hand():
    # Desirable with log-ratio 0 at KL 0: 1 - sigmoid(0) = 1/2, times desirable_weight 2.
    logps, labels = torch.tensor([-3.0]), torch.tensor([True])
    out = kto_loss(logps, logps, labels, torch.tensor(0.0), desirable_weight=2.0)
    close(out.loss, 1.0, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reference", [True, False], ids=["ref", "ref_free"])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_each_type(loss_type, reference, dtype):
    beta, dw, uw = 0.3, 1.4, 0.8
    logps = uniform(11, 7, -30.0, -5.0, dtype)
    ref = (logps.double() + uniform(12, 7, -4.0, 4.0, torch.float64)).to(dtype) if reference else None
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1])
    kl = torch.tensor(0.7, dtype=dtype) if loss_type == "kto" else None
    out = kto_loss(logps, ref, labels, kl, beta=beta, loss_type=loss_type, desirable_weight=dw, undesirable_weight=uw)
    ratios = [a - (b if reference else 0.0) for a, b in zip(logps.tolist(), ref.tolist() if reference else [0.0] * 7)]
    kl_value = 0.7 if loss_type == "kto" else 0.0
    kl_value = torch.tensor(kl_value, dtype=dtype).item()
    losses = [
        dw * (1 - sig(beta * (x - kl_value))) if y else uw * (1 - sig(beta * (kl_value - x)))
        for x, y in zip(ratios, labels.tolist())
    ]
    if loss_type == "apo_zero_unpaired":
        losses = [dw * (1 - sig(beta * x)) if y else uw * sig(beta * x) for x, y in zip(ratios, labels.tolist())]
    close(out.loss, sum(losses) / 7, dtype)
    close(out.chosen_rewards, [beta * x for x, y in zip(ratios, labels.tolist()) if y], dtype)
    close(out.rejected_rewards, [beta * x for x, y in zip(ratios, labels.tolist()) if not y], dtype)
    close(out.kl, kl_value, dtype)


def test_kto_negative_kl_is_clamped_and_detached():
    kl = torch.tensor(-2.0, requires_grad=True)
    out = kto_loss(torch.tensor([-1.0, -2.0]), None, torch.tensor([True, False]), kl)
    assert out.kl.item() == 0.0 and not out.kl.requires_grad
    expected = ((1 - sig(0.1 * -1.0)) + (1 - sig(-0.1 * -2.0))) / 2
    close(out.loss, expected, torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="bco"), "Unknown KTO loss_type"),
        (dict(loss_type="kto"), "'kto' needs `kl`"),
        (dict(loss_type="kto", kl=torch.zeros(2)), "'kto' needs `kl`"),
        (dict(loss_type="apo_zero_unpaired", kl=torch.tensor(0.1)), "does not use a KL"),
    ],
)
def test_kto_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kto_loss(torch.tensor([-1.0, -2.0]), None, torch.tensor([True, False]), **kwargs)


# ---------------------------------------------------------------- SFT


def logits_batch(dtype, seed=13, batch=3, seq=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    mask = labels != -100
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logits, labels, mask, token_logps


@pytest.mark.parametrize("dtype", DTYPES)
def test_sft_nll_and_dft(dtype):
    logps, mask, kept = token_batch(14, dtype)
    close(sft_loss(logps, mask).loss, -sum(kept) / len(kept), dtype)
    close(sft_loss(logps, mask, loss_type="dft").loss, -sum(v * math.exp(v) for v in kept) / len(kept), dtype)
    close(sft_loss(logps, mask, num_items_in_batch=50).loss, -sum(kept) / 50, dtype)


def test_dft_gradient_treats_the_probability_as_a_constant():
    logps, mask, kept = token_batch(15, torch.float64)
    logps.requires_grad_()
    sft_loss(logps, mask, loss_type="dft").loss.backward()
    expected = torch.where(mask, -logps.detach().exp() / len(kept), 0)
    close(logps.grad, expected, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.1, 0.35])
def test_label_smoothing_matches_cross_entropy(eps, dtype):
    logits, labels, mask, token_logps = logits_batch(dtype)
    out = sft_loss(
        token_logps, mask, label_smoothing=eps, mean_logit=logits.mean(-1), logsumexp=logits.logsumexp(-1)
    )
    torch_ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=eps, ignore_index=-100)
    close(out.loss, torch_ce, dtype)
    close(out.nll_loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_z_loss_and_smoothing_by_formula(dtype):
    logits, labels, mask, token_logps = logits_batch(dtype, seed=16)
    out = sft_loss(token_logps, mask, label_smoothing=0.2, z_loss=1e-3, mean_logit=logits.mean(-1),
                   logsumexp=logits.logsumexp(-1), num_items_in_batch=torch.tensor(20))
    total = 0.0
    for b, t in mask.nonzero().tolist():
        z = logits[b, t].double().tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        nll = lse - z[labels[b, t]]
        total += 0.8 * nll + 0.2 * (lse - sum(z) / len(z)) + 1e-3 * lse**2
    close(out.loss, total / 20, dtype)


def test_num_items_in_batch_makes_accumulation_exact():
    logps, mask, _ = token_batch(17, torch.float64, shape=(6, 8))
    whole = sft_loss(logps, mask).loss
    n = mask.sum()
    parts = sum(sft_loss(logps[i : i + 2], mask[i : i + 2], num_items_in_batch=n).loss for i in (0, 2, 4))
    close(parts, whole, torch.float64)


def test_sft_outputs_and_token_losses():
    assert sft_outputs() == ()
    assert sft_outputs(z_loss=0.1) == ("logsumexp",)
    assert sft_outputs(label_smoothing=0.1) == sft_outputs(0.1, 0.1) == ("mean_logit", "logsumexp")
    logits, labels, mask, token_logps = logits_batch(torch.float64, seed=18)
    stats = dict(mean_logit=logits.mean(-1), logsumexp=logits.logsumexp(-1))
    per_token = sft_token_losses(token_logps, label_smoothing=0.3, z_loss=1e-2, **stats)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.3, reduction="none").view(labels.shape)
    close(torch.where(mask, per_token, 0), ce + 1e-2 * stats["logsumexp"].square() * mask, torch.float64)
    whole = sft_loss(token_logps, mask, label_smoothing=0.3, z_loss=1e-2, **stats)
    close(whole.loss, torch.where(mask, per_token, 0).sum() / mask.sum(), torch.float64)
    assert whole.num_items.dtype == torch.int64


def test_empty_mask_gives_zero():
    assert sft_loss(torch.full((2, 3), -1.0), torch.zeros(2, 3)).loss.item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="ce"), "Unknown SFT loss_type"),
        (dict(label_smoothing=0.1), "needs the per-token `mean_logit` and `logsumexp`"),
        (dict(label_smoothing=0.1, loss_type="dft", mean_logit=torch.ones(2), logsumexp=torch.ones(2)), "only defined"),
        (dict(label_smoothing=1.5), r"must lie in \[0, 1\]"),
        (dict(z_loss=1e-4), "needs the per-token `logsumexp`"),
        (dict(z_loss=-1.0), "z_loss must be >= 0"),
    ],
)
def test_sft_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sft_loss(torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]), **kwargs)
