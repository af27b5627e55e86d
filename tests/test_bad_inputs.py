"""Bad input and faults (issue #25): each case gives a clear error, raised before any work, whose message names
what was expected and what was given; or the right answer, checked against an independent reference.

The CLI's file handling and ``--resume`` are in tests/test_cli.py; the trainers' dataset checks are at the end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import align_losses
from align_losses import losses as L


def _pairs(b=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=dtype) * 20 + 1) for _ in range(4)]


# ---------------------------------------------------------------------------------------------------------------------
# Losses: exact shapes, [B] against [B]


@pytest.mark.parametrize(
    "mutate, given",
    [
        (lambda c, r, rc, rr: (c, r, rc[:, None], rr[:, None]), r"`ref_chosen_logps` must have shape \(4,\) like `chosen_logps`; got \(4, 1\)"),
        (lambda c, r, rc, rr: (c, r[:1], rc, rr), r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(1,\)"),
        (lambda c, r, rc, rr: (c, r[:3], rc, rr), r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(3,\)"),
        (lambda c, r, rc, rr: (c[:, None], r[:, None], rc, rr), r"`chosen_logps` must have shape \[B\].*got shape \(4, 1\)"),
        (lambda c, r, rc, rr: (c, r, rc, rr[:2]), r"`ref_rejected_logps` must have shape \(4,\).*got \(2,\)"),
    ],
)
def test_dpo_refuses_mismatched_shapes(mutate, given):
    with pytest.raises(ValueError, match=given):
        L.dpo_loss(*mutate(*_pairs()))


def test_dpo_with_exact_shapes_matches_a_float64_reference():
    c, r, rc, rr = _pairs()
    out = L.dpo_loss(c, r, rc, rr, beta=0.1)
    want = -F.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-15)
    assert out.chosen_rewards.shape == (4,)


@pytest.mark.parametrize("loss", ["cpo", "simpo", "orpo"])
def test_paired_losses_refuse_mismatched_shapes(loss):
    c, r, _, _ = _pairs()
    n = torch.ones(4)
    call = {
        "cpo": lambda c, r: L.cpo_loss(c, r, cpo_alpha=0.0),
        "simpo": lambda c, r: L.simpo_loss(c, r, n, n),
        "orpo": lambda c, r: L.orpo_loss(c / 30, r / 30, nll_loss=torch.tensor(1.0)),
    }[loss]
    with pytest.raises(ValueError, match=r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(1,\)"):
        call(c, r[:1])
    with pytest.raises(ValueError, match=r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(4, 1\)"):
        call(c, r[:, None])


def test_kto_refuses_mismatched_shapes():
    c, _, rc, _ = _pairs()
    labels = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"`ref_logps` must have shape \(4,\) like `logps`; got \(4, 1\)"):
        L.kto_loss(c, rc[:, None], labels, torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\) like `logps`; got \(3,\)"):
        L.kto_loss(c, rc, labels[:3], torch.tensor(0.0))


def test_sft_loss_mask_must_have_the_log_probs_shape():
    logps = -torch.rand(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `token_logps`, \(3, 6\); got \(1, 6\)"):
        L.sft_loss(logps, torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `token_logps`, \(3, 6\); got \(3, 5\)"):
        L.sequence_logps(logps, torch.ones(3, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0, 0]] * 3)
    assert L.sft_loss(logps, mask).loss.item() == pytest.approx(float(-logps[:, :2].sum() / 6), abs=1e-15)


@pytest.mark.parametrize("loss", ["dpo", "kto", "cpo", "orpo"])
def test_empty_batch_is_an_error_not_nan(loss):
    e = torch.zeros(0)
    call = {
        "dpo": lambda: L.dpo_loss(e, e, e, e),
        "kto": lambda: L.kto_loss(e, e, torch.zeros(0, dtype=torch.bool), torch.tensor(0.0)),
        "cpo": lambda: L.cpo_loss(e, e, cpo_alpha=0.0),
        "orpo": lambda: L.orpo_loss(e, e, nll_loss=torch.tensor(1.0)),
    }[loss]
    with pytest.raises(ValueError, match=r"is empty \(B = 0\).*expected B >= 1"):
        call()


# ---------------------------------------------------------------------------------------------------------------------
# Losses: coefficients and labels


@pytest.mark.parametrize("beta, error, message", [
    (-0.1, ValueError, r"`beta` must be a finite number >= 0; got -0.1"),
    (float("nan"), ValueError, r"`beta` must be a finite number >= 0; got nan"),
    (float("inf"), ValueError, r"`beta` must be a finite number >= 0; got inf"),
    (True, TypeError, r"`beta` must be a real number; got True \(bool\)"),
    ("0.1", TypeError, r"`beta` must be a real number; got '0.1' \(str\)"),
])
@pytest.mark.parametrize("loss", ["dpo", "kto", "cpo", "orpo"])
def test_bad_beta_is_refused(loss, beta, error, message):
    c, r, rc, rr = _pairs()
    call = {
        "dpo": lambda: L.dpo_loss(c, r, rc, rr, beta=beta),
        "kto": lambda: L.kto_loss(c, rc, torch.tensor([1, 0, 1, 0]), torch.tensor(0.0), beta=beta),
        "cpo": lambda: L.cpo_loss(c, r, cpo_alpha=0.0, beta=beta),
        "orpo": lambda: L.orpo_loss(c / 30, r / 30, nll_loss=torch.tensor(1.0), beta=beta),
    }[loss]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard"])
def test_beta_zero_with_a_loss_that_divides_by_it(loss_type):
    c, r, rc, rr = _pairs()
    n = torch.full((4,), 3.0)
    with pytest.raises(ValueError, match=rf"`beta` must be a finite number > 0 \(loss_type \['{loss_type}'\] divides by it\); got 0"):
        L.dpo_loss(c, r, rc, rr, beta=0, loss_type=loss_type, chosen_lengths=n, rejected_lengths=n)
    with pytest.raises(ValueError, match=r"got 0.0"):
        L.check_dpo_args(loss_type, beta=0.0)
    # beta = 0 is allowed where it does not divide: the sigmoid loss is then log 2 for every pair
    assert L.dpo_loss(c, r, rc, rr, beta=0.0).loss.item() == pytest.approx(math.log(2), abs=1e-15)


def test_cpo_ipo_beta_zero():
    c, r, _, _ = _pairs()
    n = torch.full((4,), 3.0)
    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0 \(loss_type 'ipo' divides by it\); got 0"):
        L.cpo_loss(c, r, beta=0, loss_type="ipo", cpo_alpha=0.0, chosen_lengths=n, rejected_lengths=n)


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_kto_labels_other_than_0_and_1(bad):
    c, _, rc, _ = _pairs()
    labels = torch.tensor([1, 0, bad, 0])
    with pytest.raises(ValueError, match=rf"`labels` must be True/False or 0/1.*found \[{bad}"):
        L.kto_loss(c, rc, labels, torch.tensor(0.0))


def test_kto_nan_log_prob_gives_a_nan_loss_as_float64():
    """TRL's nanmean hides a NaN log-prob: a finite loss whose gradient is NaN. A float64 evaluation of the
    formula gives NaN, and so does kto_loss."""
    c, _, rc, _ = _pairs()
    c = c.clone()
    c[2] = float("nan")
    labels = torch.tensor([True, False, True, False])
    out = L.kto_loss(c, rc, labels, torch.tensor(0.5, dtype=torch.float64), beta=0.1)
    z = 0.1 * 0.5
    r = 0.1 * (c - rc)
    reference = torch.where(labels, 1 - torch.sigmoid(r - z), 1 - torch.sigmoid(z - r)).mean()
    assert math.isnan(reference.item()) and math.isnan(out.loss.item())
    c[2] = -3.0  # and without the NaN the two agree
    out = L.kto_loss(c, rc, labels, torch.tensor(0.5, dtype=torch.float64), beta=0.1)
    r = 0.1 * (c - rc)
    reference = torch.where(labels, 1 - torch.sigmoid(r - z), 1 - torch.sigmoid(z - r)).mean()
    torch.testing.assert_close(out.loss, reference, rtol=0, atol=1e-15)
