"""KTO and unpaired APO-zero on per-sequence log-probs of unpaired, labelled completions, as TRL's KTOTrainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import check_batch, check_coefficient

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOOutput:
    """Result of `kto_loss`.

    Attributes:
        loss: ``[]`` scalar to back-propagate.
        chosen_rewards: ``[N_desirable]`` ``beta * log-ratio`` of the desirable examples, in batch order, detached.
        rejected_rewards: ``[N_undesirable]`` same for the undesirable ones. TRL logs each one's mean
            (``rewards/chosen``, ``rewards/rejected``) and their difference (``rewards/margins``).
        kl: ``[]`` the KL reference point used: detached, clamped at 0; 0 for "apo_zero_unpaired".
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor


def check_kto_args(
    loss_type: str,
    *,
    beta: float | None = None,
    desirable_weight: float | None = None,
    undesirable_weight: float | None = None,
) -> None:
    """Raise ValueError unless ``loss_type`` is one of `KTO_LOSS_TYPES` and the given ``beta`` and class
    weights are finite numbers ``>= 0`` (TypeError for a bool or a non-number)."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}.")
    for name, value in (("beta", beta), ("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if value is not None:
            check_coefficient(value, name)


def check_kto_labels(labels: Tensor, like: Tensor | None = None) -> Tensor:
    """``labels`` as a bool tensor, after checking that it has the shape of ``like`` (when given) and holds only
    0 and 1 (True/False): a label of 2, -1 or 0.5 is refused rather than counted as desirable.

    A bool tensor needs no value check; any other dtype costs one host synchronisation.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a [B] bool (or 0/1) tensor; got {type(labels).__name__}.")
    if like is not None:
        check_batch(("logps", like), ("labels", labels))
    if labels.dtype == torch.bool:
        return labels
    valid = (labels == 0) | (labels == 1)
    if not bool(valid.all()):
        found = labels[~valid][:5].tolist()
        raise ValueError(f"`labels` must be True/False or 0/1 (desirable or not); found {found}.")
    return labels != 0


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor | None,
    labels: Tensor,
    kl: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO loss (KTO paper, eq. 7) or its unpaired APO-zero variant, with TRL 1.16 semantics.

    With ``r = beta * (logps - ref_logps)`` and ``z = beta * kl``, per example:
    "kto": desirable ``1 - sigmoid(r - z)``, undesirable ``1 - sigmoid(z - r)``;
    "apo_zero_unpaired": desirable ``1 - sigmoid(r)``, undesirable ``sigmoid(r)``.
    Each is multiplied by ``desirable_weight`` or ``undesirable_weight`` and the loss is their mean over
    the whole batch. TRL takes a NaN-ignoring mean; here a NaN log-prob gives a NaN loss, as a float64
    evaluation of the formula does, rather than a finite loss whose gradient is NaN.

    Args:
        logps: ``[B]`` float summed policy log-probs of the completions.
        ref_logps: ``[B]`` reference log-probs, or None for reference-free use (reference taken as 0).
        labels: ``[B]`` bool (or 0/1; other values are refused): True for desirable completions.
        kl: ``[]`` KL estimate for "kto": the mean over the global batch of ``policy - reference``
            summed log-probs of the mismatched (KL) completions. It is detached and clamped at 0
            here, as TRL does after gathering it across ranks. Must be None for "apo_zero_unpaired".
        beta: temperature.
        loss_type: one of `KTO_LOSS_TYPES`.
        desirable_weight, undesirable_weight: per-class loss weights.

    Returns:
        `KTOOutput`.
    """
    check_kto_args(loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    check_batch(("logps", logps), ("ref_logps", ref_logps))
    desirable = check_kto_labels(labels, logps)
    kl = _kl_reference_point(kl, loss_type, logps)
    rewards = beta * (logps if ref_logps is None else logps - ref_logps)
    # 1 - sigmoid(x) is written sigmoid(-x), which keeps its precision when small.
    if loss_type == "kto":
        desirable_loss, undesirable_loss = torch.sigmoid(beta * kl - rewards), torch.sigmoid(rewards - beta * kl)
    else:
        desirable_loss, undesirable_loss = torch.sigmoid(-rewards), torch.sigmoid(rewards)
    losses = torch.where(desirable, desirable_weight * desirable_loss, undesirable_weight * undesirable_loss)
    detached = rewards.detach()
    return KTOOutput(
        loss=losses.mean(),
        chosen_rewards=detached[desirable],
        rejected_rewards=detached[~desirable],
        kl=kl,
    )


def check_kl_estimate(kl: Tensor | None, loss_type: str) -> None:
    """Raise ValueError unless ``kl`` is what ``loss_type`` takes: a one-element tensor for "kto",
    None for "apo_zero_unpaired"."""
    check_kto_args(loss_type)
    if loss_type == "apo_zero_unpaired":
        if kl is not None:
            raise ValueError("loss_type 'apo_zero_unpaired' does not use a KL estimate; pass kl=None.")
    elif not isinstance(kl, Tensor) or kl.numel() != 1:
        raise ValueError(
            "loss_type 'kto' needs `kl`: a one-element tensor, the batch mean of policy minus reference "
            "log-probs of the KL (mismatched) completions."
        )


def _kl_reference_point(kl: Tensor | None, loss_type: str, like: Tensor) -> Tensor:
    check_kl_estimate(kl, loss_type)
    if kl is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return kl.detach().reshape(()).clamp(min=0)
