"""CPO and its reference-free relatives (SimPO, AlphaPO), as TRL's CPOTrainer."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import PreferenceOutput, check_batch, check_coefficient, check_real, smoothed_sigmoid_loss, token_counts
from .sft import chosen_nll

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
#: CPO loss types that read per-token AVERAGE log-probs, as TRL's CPOTrainer feeds them; the others read sums
#: ("alphapo" is "simpo" with ``cpo_alpha = 0``).
AVERAGED_LOSS_TYPES = frozenset({"ipo", "simpo", "alphapo"})


@dataclass(frozen=True)
class CPOOutput(PreferenceOutput):
    """Result of `cpo_loss`; ``loss = mean(per-pair loss) + cpo_alpha * nll_loss``.

    Attributes (beyond `PreferenceOutput`, whose rewards are ``beta * r`` with ``r`` the (possibly
    averaged, possibly AlphaPO-shaped) policy log-prob):
        nll_loss: ``[]`` the NLL term (0 when ``cpo_alpha == 0``; TRL then skips it and logs 0).
        chosen_logps, rejected_logps: ``[B]`` the per-sequence policy log-probs the loss read, before
            AlphaPO shaping, detached: per-token averages for "ipo"/"simpo"/"alphapo", the given sums
            otherwise (TRL logs their means as ``logps/chosen`` and ``logps/rejected``).
    """

    nll_loss: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor


def alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO reward shaping ``(1 - p^(-alpha)) / alpha`` from ``logps = log p``; identity at ``alpha = 0``.

    Evaluated as ``-expm1(-alpha * log p) / alpha``, which stays finite where TRL's
    ``exp(log p) ** -alpha`` underflows to ``0 ** -alpha = inf`` (long summed completions).
    Elementwise; same shape and dtype.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def check_cpo_args(
    loss_type: str,
    *,
    beta: float | None = None,
    cpo_alpha: float | None = None,
    simpo_gamma: float | None = None,
    alpha: float | None = None,
) -> None:
    """Raise ValueError unless ``loss_type`` is one of `CPO_LOSS_TYPES` and the given ``beta`` and ``cpo_alpha``
    are finite numbers ``>= 0`` (``beta > 0`` for "ipo", which divides by it) and ``simpo_gamma`` and ``alpha``
    finite numbers; TypeError for a bool or a non-number."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}.")
    if beta is not None:
        ipo = loss_type == "ipo"
        check_coefficient(beta, "beta", positive=ipo, needed_by="loss_type 'ipo' divides by it" if ipo else "")
    if cpo_alpha is not None:
        check_coefficient(cpo_alpha, "cpo_alpha")
    for name, value in (("simpo_gamma", simpo_gamma), ("alpha", alpha)):
        if value is not None:
            check_real(value, name)
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number; got {value!r}.")


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    nll_loss: Tensor | None = None,
    chosen_token_logps: Tensor | None = None,
    chosen_token_mask: Tensor | None = None,
) -> CPOOutput:
    """CPO loss with TRL's ``CPOTrainer`` semantics.

    The log-probs come in as per-sequence SUMS; "ipo" and "simpo" divide them by the completion token
    counts (clamped to 1), as TRL's ``average_log_prob``. ``alpha != 0`` reshapes them with
    `alphapo_reward` for every loss type. With ``h = beta * (r_chosen - r_rejected)`` the per-pair
    losses are: "sigmoid" ``-(1-eps) log s(h) - eps log s(-h)``; "simpo" the same at
    ``h - simpo_gamma``; "hinge" ``relu(1 - h)``; "ipo" ``(h / beta - 1 / (2 beta))^2``.
    "alphapo" means "simpo" with ``cpo_alpha = 0`` (TRL's alias; it does not set ``alpha``).
    ``label_smoothing`` is ignored, with a warning, by "hinge" and "ipo", as TRL.

    Args:
        chosen_logps, rejected_logps: ``[B]`` float summed policy log-probs of the completions.
        beta: temperature (IPO's tau for "ipo").
        loss_type: one of `CPO_LOSS_TYPES`.
        label_smoothing: label-flip probability for "sigmoid"/"simpo".
        cpo_alpha: weight of the NLL (behaviour-cloning) term.
        simpo_gamma: SimPO target margin.
        alpha: AlphaPO shape parameter.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts; needed by "ipo"/"simpo"/"alphapo".
        nll_loss: ``[]`` precomputed NLL of the chosen completions; or
        chosen_token_logps, chosen_token_mask: ``[B, T]`` to compute it (needed when ``cpo_alpha != 0``).

    Returns:
        `CPOOutput`, with the (possibly averaged) log-probs it used.
    """
    check_cpo_args(loss_type, beta=beta, cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma, alpha=alpha)
    check_batch(("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps))
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    if label_smoothing > 0 and loss_type in ("hinge", "ipo"):
        warnings.warn(f"label_smoothing is ignored by CPO loss_type {loss_type!r}.", stacklevel=2)
    if loss_type in AVERAGED_LOSS_TYPES:
        chosen_logps, rejected_logps = _averaged(
            chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, loss_type
        )
    chosen_rewards, rejected_rewards = alphapo_reward(chosen_logps, alpha), alphapo_reward(rejected_logps, alpha)
    margin = chosen_rewards - rejected_rewards
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * margin, label_smoothing)
    elif loss_type == "simpo":
        losses = smoothed_sigmoid_loss(beta * margin - simpo_gamma, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:  # ipo
        losses = (margin - 1 / (2 * beta)) ** 2
    nll = (
        chosen_nll(nll_loss, chosen_token_logps, chosen_token_mask, needed_by="cpo_loss with cpo_alpha != 0")
        if cpo_alpha != 0
        else torch.zeros((), dtype=losses.dtype, device=losses.device)
    )
    return CPOOutput(
        loss=losses.mean() + cpo_alpha * nll,
        chosen_rewards=beta * chosen_rewards.detach(),
        rejected_rewards=beta * rejected_rewards.detach(),
        nll_loss=nll,
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
    )


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> CPOOutput:
    """SimPO as in the paper: `cpo_loss` with ``loss_type="simpo"`` and no NLL term (``cpo_alpha=0``).

    ``-log sigmoid(beta * (avg logp_chosen - avg logp_rejected) - simpo_gamma)``, averaged over pairs;
    inputs as in `cpo_loss` (summed ``[B]`` log-probs and ``[B]`` completion token counts).
    """
    return cpo_loss(
        chosen_logps,
        rejected_logps,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=0.0,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def _averaged(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    loss_type: str,
) -> tuple[Tensor, Tensor]:
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            f"CPO loss_type {loss_type!r} averages the log-probs per token and needs `chosen_lengths` and "
            "`rejected_lengths`: the completion token count of each sequence, shape [B]."
        )
    return (
        chosen_logps / token_counts(chosen_lengths, "chosen_lengths", chosen_logps),
        rejected_logps / token_counts(rejected_lengths, "rejected_lengths", rejected_logps),
    )
