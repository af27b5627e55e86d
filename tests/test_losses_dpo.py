"""DPO losses and sequence reductions against references written here from the formulas.

References work on Python floats with `math` (float64), pair by pair, so they share no code with the
implementation; float32 runs are compared against the same float64 references.
"""

from __future__ import annotations

import math

import pytest
import torch

from align_losses.losses import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    check_dpo_args,
    dpo_loss,
    ld_sequence_logps,
    sequence_logps,
    wpo_weights,
)

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-6, atol=1e-7), torch.float32: dict(rtol=1e-5, atol=1e-7)}
BETA, EPS, TAU = 0.2, 0.15, 0.05


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def smoothed(z: float) -> float:
    return -(1 - EPS) * logsig(z) - EPS * logsig(-z)


def f_score(logratio: float, kind: str, a: float) -> float:
    if kind == "reverse_kl" or (kind == "alpha_divergence" and a == 1.0):
        return logratio
    if kind == "forward_kl":
        return 1 - math.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2 * math.exp(logratio) / (math.exp(logratio) + 1))
    return (math.exp(logratio) ** (a - 1) - 1) / (a - 1)  # alpha_divergence


def reference_losses(kind: str, x: dict, f_divergence: str = "reverse_kl", a: float = 0.5) -> list[float]:
    """Per-pair DPO losses (TRL 1.16 definitions) for the batch ``x`` of Python floats."""
    c, r, rc, rr, lc, lr = x["c"], x["r"], x["rc"], x["rr"], x["lc"], x["lr"]
    n = len(c)
    cl = [c[i] - rc[i] for i in range(n)]
    rl = [r[i] - rr[i] for i in range(n)]
    sc = [f_score(v, f_divergence, a) for v in cl]
    sr = [f_score(v, f_divergence, a) for v in rl]
    d = [sc[i] - sr[i] for i in range(n)]
    dn = [sc[i] / lc[i] - sr[i] / lr[i] for i in range(n)]
    if kind == "aot":
        policy = sorted(c[i] - r[i] for i in range(n))
        reference = sorted(rc[i] - rr[i] for i in range(n))
        return [smoothed(BETA * (p - q)) for p, q in zip(policy, reference)]
    if kind == "aot_unpaired":
        return [smoothed(BETA * (p - q)) for p, q in zip(sorted(cl), sorted(rl))]
    per_pair = {
        "sigmoid": lambda i: -logsig(BETA * d[i]),
        "hinge": lambda i: max(0.0, 1 - BETA * d[i]),
        "ipo": lambda i: (dn[i] - 1 / (2 * BETA)) ** 2,
        "exo_pair": lambda i: sig(BETA * d[i]) * (logsig(BETA * d[i]) - math.log(1 - EPS))
        + sig(-BETA * d[i]) * (logsig(-BETA * d[i]) - math.log(EPS)),
        "nca_pair": lambda i: -logsig(BETA * cl[i]) - 0.5 * logsig(-BETA * cl[i]) - 0.5 * logsig(-BETA * rl[i]),
        "robust": lambda i: ((1 - EPS) * -logsig(BETA * d[i]) - EPS * -logsig(-BETA * d[i])) / (1 - 2 * EPS),
        "bco_pair": lambda i: -logsig(BETA * cl[i]) - logsig(-BETA * rl[i]),
        "sppo_hard": lambda i: (cl[i] - 1 / (2 * BETA)) ** 2 + (rl[i] + 1 / (2 * BETA)) ** 2,
        "apo_zero": lambda i: (1 - sig(BETA * cl[i])) + sig(BETA * rl[i]),
        "apo_down": lambda i: sig(BETA * cl[i]) + (1 - sig(BETA * (cl[i] - rl[i]))),
        "discopop": lambda i: -logsig(BETA * d[i]) * (1 - sig(BETA * d[i] / TAU))
        + math.exp(-BETA * d[i]) * sig(BETA * d[i] / TAU),
        "sft": lambda i: x["nll"],
        "sigmoid_norm": lambda i: -logsig(BETA * dn[i]),
    }[kind]
    return [per_pair(i) for i in range(n)]


def random_batch(seed: int, n: int = 7, reference: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    lc, lr = torch.randint(1, 40, (2, n), generator=g).tolist()
    c = [-(0.3 + torch.rand(1, generator=g).item()) * k for k in lc]
    r = [-(0.3 + torch.rand(1, generator=g).item()) * k for k in lr]
    noise = (torch.rand(2, n, generator=g, dtype=torch.float64) * 6 - 3).tolist()
    rc = [c[i] + noise[0][i] for i in range(n)] if reference else [0.0] * n
    rr = [r[i] + noise[1][i] for i in range(n)] if reference else [0.0] * n
    token_logps = -torch.rand(n, 9, generator=g, dtype=torch.float64) * 4
    token_mask = torch.rand(n, 9, generator=g) < 0.7
    kept = [v for v, m in zip(token_logps.flatten().tolist(), token_mask.flatten().tolist()) if m]
    nll = -sum(kept) / len(kept)
    return dict(c=c, r=r, rc=rc, rr=rr, lc=lc, lr=lr, token_logps=token_logps, token_mask=token_mask, nll=nll)


def rounded(x: dict, dtype: torch.dtype) -> dict:
    """``x`` with its float inputs rounded to ``dtype``, so that references see what the implementation sees."""
    keys = ("c", "r", "rc", "rr")
    out = {**x, **{k: torch.tensor(x[k], dtype=dtype).tolist() for k in keys}}
    out["token_logps"] = x["token_logps"].to(dtype).double()
    mask = x["token_mask"]
    out["nll"] = -out["token_logps"][mask].sum().item() / int(mask.sum())
    return out


def run_dpo(x: dict, dtype: torch.dtype, reference: bool = True, **kwargs):
    t = lambda key: torch.tensor(x[key], dtype=dtype)  # noqa: E731
    return dpo_loss(
        t("c"),
        t("r"),
        t("rc") if reference else None,
        t("rr") if reference else None,
        beta=BETA,
        label_smoothing=EPS,
        discopop_tau=TAU,
        chosen_lengths=torch.tensor(x["lc"]),
        rejected_lengths=torch.tensor(x["lr"]),
        chosen_token_logps=x["token_logps"].to(dtype),
        chosen_token_mask=x["token_mask"],
        **kwargs,
    )


def close(actual: torch.Tensor, expected, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=dtype), **TOL[dtype])


def test_sigmoid_by_hand():
    # log-ratios +1 and -1 at beta 0.5: z = 1, loss = log(1 + e^-1).
    out = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5
    )
    close(out.loss, 0.31326168751822286, torch.float32)
    close(out.chosen_rewards, [0.5], torch.float32)
    close(out.rejected_rewards, [-0.5], torch.float32)
    close(out.reward_margins, [1.0], torch.float32)
    close(out.reward_accuracies, [1.0], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reference", [True, False], ids=["ref", "ref_free"])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_each_loss_type(loss_type, reference, dtype):
    x = rounded(random_batch(seed=DPO_LOSS_TYPES.index(loss_type), reference=reference), dtype)
    out = run_dpo(x, dtype, reference=reference, loss_type=loss_type)
    expected = reference_losses(loss_type, x)
    close(out.loss, sum(expected) / len(expected), dtype)
    close(out.chosen_rewards, [BETA * (a - b) for a, b in zip(x["c"], x["rc"])], dtype)
    close(out.rejected_rewards, [BETA * (a - b) for a, b in zip(x["r"], x["rr"])], dtype)
    assert out.loss.dtype == dtype and out.loss.shape == ()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("f_divergence", "a"),
    [
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.5),
        ("alpha_divergence", 1.6),
        ("alpha_divergence", 1.0),
    ],
)
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergences(loss_type, f_divergence, a, dtype):
    x = rounded(random_batch(seed=11), dtype)
    out = run_dpo(x, dtype, loss_type=loss_type, f_divergence_type=f_divergence, f_alpha_divergence_coef=a)
    expected = reference_losses(loss_type, x, f_divergence, a)
    close(out.loss, sum(expected) / len(expected), dtype)
    # Rewards stay beta * log-ratio whatever the divergence.
    close(out.chosen_rewards, [BETA * (p - q) for p, q in zip(x["c"], x["rc"])], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_list_of_types_with_wpo(dtype):
    x = rounded(random_batch(seed=21), dtype)
    types, weights = ["sigmoid", "sft", "ipo", "apo_down"], [0.8, 0.2, 1.0, 0.05]
    w = (torch.rand(7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1).to(dtype).double()
    out = run_dpo(x, dtype, loss_type=types, loss_weights=weights, wpo_weights=w.to(dtype))
    expected = sum(
        weight * sum(loss * wi for loss, wi in zip(reference_losses(kind, x), w.tolist())) / 7
        for kind, weight in zip(types, weights)
    )
    close(out.loss, expected, dtype)


def test_list_without_weights_is_the_plain_sum():
    x = random_batch(seed=22)
    out = run_dpo(x, torch.float64, loss_type=["hinge", "bco_pair"])
    expected = sum(sum(reference_losses(kind, x)) / 7 for kind in ["hinge", "bco_pair"])
    close(out.loss, expected, torch.float64)


def test_discopop_stays_finite_at_large_negative_margin():
    # z = -400: the exponential part exp(400) * sigmoid(-8000) is 0 and the logistic part is 400.
    out = dpo_loss(torch.tensor([-400.0, -1.0]), torch.tensor([0.0, -2.0]), beta=1.0, loss_type="discopop")
    z = 1.0
    at_one = -logsig(z) * (1 - sig(z / 0.05)) + math.exp(-z) * sig(z / 0.05)
    close(out.loss, (400.0 + at_one) / 2, torch.float32)


def test_gradient_of_sigmoid_loss():
    x = random_batch(seed=3)
    chosen = torch.tensor(x["c"], dtype=torch.float64, requires_grad=True)
    out = dpo_loss(chosen, torch.tensor(x["r"], dtype=torch.float64), torch.tensor(x["rc"], dtype=torch.float64),
                   torch.tensor(x["rr"], dtype=torch.float64), beta=BETA)
    out.loss.backward()
    d = [(x["c"][i] - x["rc"][i]) - (x["r"][i] - x["rr"][i]) for i in range(7)]
    close(chosen.grad, [-BETA * sig(-BETA * v) / 7 for v in d], torch.float64)
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_logps_sum_and_mean(dtype):
    logps = torch.tensor([[-1.0, -2.0, -4.0, float("nan")], [-0.5, -0.25, -8.0, -1.0]], dtype=dtype)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    close(sequence_logps(logps, mask), [-6.0, -9.75], dtype)  # the NaN sits off the mask
    close(sequence_logps(logps, mask, average=True), [-3.0, -9.75 / 4], dtype)
    close(sequence_logps(logps, torch.zeros_like(mask), average=True), [0.0, 0.0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ld_sequence_logps_by_hand(dtype):
    # Pair 0: chosen 2 tokens, rejected 4 -> the rejected's last 2 count alpha. Pair 1: chosen 3, rejected 1.
    chosen = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0], [-1.0, -2.0, -3.0, 0.0, 0.0]], dtype=dtype)
    chosen_mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    rejected = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, 0.0, 0.0]], dtype=dtype)
    rejected_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]])
    c, r = ld_sequence_logps(chosen, chosen_mask, rejected, rejected_mask, ld_alpha=0.25)
    close(c, [-3.0, -1.0 + 0.25 * (-5.0)], dtype)
    close(r, [-3.0 + 0.25 * (-7.0), -6.0], dtype)
    c1, r1 = ld_sequence_logps(chosen, chosen_mask, rejected, rejected_mask, ld_alpha=1.0)
    close(c1, sequence_logps(chosen, chosen_mask), dtype)
    close(r1, sequence_logps(rejected, rejected_mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wpo_weights(dtype):
    g = torch.Generator().manual_seed(4)
    lp_c, lp_r = -torch.rand(2, 3, 6, generator=g, dtype=torch.float64) * 3
    p2_c, p2_r = -torch.rand(2, 3, 6, generator=g, dtype=torch.float64)
    m_c, m_r = torch.rand(2, 3, 6, generator=g) < 0.6
    m_c[0] = False  # an empty completion: mean over max(count, 1) = 0
    expected = []
    for i in range(3):
        def mean(lp, p2, m):
            vals = [a - b for a, b, k in zip(lp[i].tolist(), p2[i].tolist(), m[i].tolist()) if k]
            return sum(vals) / max(len(vals), 1)
        expected.append(math.exp(mean(lp_c, p2_c, m_c)) * math.exp(mean(lp_r, p2_r, m_r)))
    lp_c_grad = lp_c.to(dtype).requires_grad_()
    w = wpo_weights(lp_c_grad, p2_c.to(dtype), m_c, lp_r.to(dtype), p2_r.to(dtype), m_r)
    close(w, expected, dtype)
    assert not w.requires_grad


def lengths(n: int = 3) -> torch.Tensor:
    return torch.full((n,), 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="exo_pair"), "label_smoothing > 0"),
        (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "only supported for the loss types"),
        (dict(loss_type=["sigmoid", "aot"], f_divergence_type="forward_kl"), "only supported for the loss types"),
        (dict(loss_type="sigmoid", f_divergence_type="chi2"), "Unknown f_divergence_type"),
        (dict(loss_type="dpo"), "Unknown DPO loss_type"),
        (dict(loss_type=[]), "Unknown DPO loss_type"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "one weight per loss type"),
        (dict(loss_type="ipo"), "needs `chosen_lengths`"),
        (dict(loss_type="sigmoid_norm", chosen_lengths=lengths(), rejected_lengths=lengths(2)), "rejected_lengths"),
        (dict(loss_type="ipo", chosen_lengths=lengths().view(3, 1), rejected_lengths=lengths()), "shape"),
        (dict(loss_type="sft"), "needs `chosen_token_logps` and `chosen_token_mask`"),
        (dict(loss_type="aot_unpaired", wpo_weights=torch.ones(3)), "cannot be used with 'aot'"),
        (dict(loss_type="sigmoid", wpo_weights=torch.ones(4)), "wpo_weights must have shape"),
    ],
)
def test_dpo_errors(kwargs, message):
    logps = -torch.rand(3, generator=torch.Generator().manual_seed(0)) * 10
    with pytest.raises(ValueError, match=message):
        dpo_loss(logps, logps - 1, logps + 1, logps, **kwargs)


def test_check_dpo_args_alone():
    assert check_dpo_args(["sigmoid", "sft"]) == (["sigmoid", "sft"], [1.0, 1.0])
    assert check_dpo_args("ipo", [0.5]) == (["ipo"], [0.5])
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        check_dpo_args("exo_pair")
    with pytest.raises(ValueError, match="cannot be used with 'aot'"):
        check_dpo_args(["sigmoid", "aot"], use_weighting=True)
    with pytest.warns(UserWarning, match="'robust'"):
        check_dpo_args("robust", label_smoothing=0.6)


def test_dpo_needs_both_or_neither_reference():
    logps = torch.tensor([-3.0, -4.0])
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        dpo_loss(logps, logps, logps, None)


def test_ld_alpha_out_of_range():
    t, m = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\]"):
        ld_sequence_logps(t, m, t, m, ld_alpha=1.5)


def test_robust_outside_its_range_warns():
    logps = torch.tensor([-3.0, -4.0])
    with pytest.warns(UserWarning, match="'robust'"):
        dpo_loss(logps, logps - 1, loss_type="robust", label_smoothing=0.6)
