"""DPO and its TRL 1.16 variants, on per-sequence log-probs.

The loss is built in three steps, as in TRL's ``DPOTrainer``:

1. log-ratios ``policy - reference`` for the chosen and the rejected completion;
2. f-divergence "scores" of the log-ratios (the identity for the default reverse KL);
3. for each requested loss type, a per-pair loss, optionally WPO-weighted, averaged over the
   batch; the averages are summed with ``loss_weights``.

Without a reference (``ref_*_logps=None``) the reference log-probs are taken as 0: the log-ratios
are the policy log-probs themselves (the reference-free DPO of older TRL releases; TRL 1.16 itself
always has a reference, a model, the PEFT base or precomputed log-probs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    PreferenceOutput,
    at_least_float32,
    check_batch,
    check_coefficient,
    smoothed_sigmoid_loss,
    token_counts,
)
from .sft import sft_loss

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a beta * log Z(x) term that only cancels in the chosen-minus-rejected
# score difference, so only the loss types built on that difference take another divergence.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# These sort the pairs, which would misalign per-pair WPO weights.
_SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# These divide by beta (CPO's "ipo" too).
_DIVIDING_LOSS_TYPES = frozenset({"ipo", "sppo_hard"})


def check_beta(beta, loss_types) -> None:
    """Refuse a ``beta`` that is not a finite number ``>= 0``, or not ``> 0`` where a loss type of
    ``loss_types`` (names) divides by it; the message names the value and those loss types."""
    dividing = sorted(_DIVIDING_LOSS_TYPES.intersection(loss_types))
    check_coefficient(beta, "beta", positive=bool(dividing), needed_by=f"loss_type {dividing} divides by it")


@dataclass(frozen=True)
class _Pairs:
    """What the per-type DPO losses read: ``[B]`` tensors and the scalar hyper-parameters."""

    beta: float
    label_smoothing: float
    discopop_tau: float
    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor  # policy - reference
    rejected_logratios: Tensor
    chosen_scores: Tensor  # f-divergence scores of the log-ratios
    rejected_scores: Tensor
    chosen_lengths: Tensor | None  # completion token counts, clamped to >= 1
    rejected_lengths: Tensor | None
    sft_nll: Tensor | None  # [] mean NLL over the chosen completion tokens of the batch

    @property
    def delta(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores

    @property
    def length_normalised_delta(self) -> Tensor:
        return self.chosen_scores / self.chosen_lengths - self.rejected_scores / self.rejected_lengths


def _sigmoid(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * p.delta)


def _hinge(p: _Pairs) -> Tensor:
    return torch.relu(1 - p.beta * p.delta)


def _ipo(p: _Pairs) -> Tensor:
    # IPO eq. 17 with beta as tau, on per-token average scores (TRL: agreed with the IPO authors).
    return (p.length_normalised_delta - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> Tensor:
    # EXO-pref (eq. 16): KL(softmax(beta * scores) || [1 - eps, eps]) over {chosen, rejected}.
    z, eps = p.beta * p.delta, p.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(p: _Pairs) -> Tensor:
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _Pairs) -> Tensor:
    # Unbiased under labels flipped with probability eps (rDPO), hence the minus and the 1 - 2 eps.
    z, eps = p.beta * p.delta, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


def _sppo_hard(p: _Pairs) -> Tensor:
    # SPPO with hard win probabilities: the winner's log-ratio targets +1/(2 beta), the loser's -1/(2 beta).
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> Tensor:
    # Optimal transport between the batch's policy and reference margin distributions: match sorted values.
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    reference = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return smoothed_sigmoid_loss(p.beta * (policy - reference), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> Tensor:
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return smoothed_sigmoid_loss(p.beta * (chosen - rejected), p.label_smoothing)


def _apo_zero(p: _Pairs) -> Tensor:
    # APO eq. 7: raise the chosen likelihood, lower the rejected one.
    return 1 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> Tensor:
    # APO eq. 8: lower both, the rejected more.
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - rejected)


def _discopop(p: _Pairs) -> Tensor:
    # DiscoPOP eq. 5: blend of logistic and exponential losses, mixed by sigmoid(z / tau). The exponential
    # part exp(-z) * sigmoid(z / tau) is evaluated as one exp so that it does not give inf * 0 = NaN at
    # large negative z (it tends to 0 there when tau < 1).
    z, tau = p.beta * p.delta, p.discopop_tau
    logistic = -F.logsigmoid(z) * torch.sigmoid(-z / tau)
    exponential = torch.exp(F.logsigmoid(z / tau) - z)
    return logistic + exponential


def _sft(p: _Pairs) -> Tensor:
    # A batch-level scalar, broadcast per pair so that it is weighted and averaged like the others.
    return p.sft_nll.expand_as(p.chosen_logps)


def _sigmoid_norm(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * p.length_normalised_delta)


_LOSSES: dict[str, Callable[[_Pairs], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
DPO_LOSS_TYPES = tuple(_LOSSES)
_NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"})


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f'(t) at ``t = pi / pi_ref`` (f-DPO), from ``logratios = log t``; elementwise, same shape and dtype.

    ``reverse_kl``: ``log t``; ``forward_kl``: ``1 - 1/t``; ``js_divergence``: ``log(2t / (t + 1))``;
    ``alpha_divergence``: ``(t^(a-1) - 1) / (a - 1)`` (``log t`` when ``a`` is within 1e-6 of 1), with
    the exponent ``(a-1) log t`` clamped at 80 (11 for float16) and evaluated in at least float32, as TRL.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:  # the limit a -> 1 is reverse KL
            return logratios
        # The clamp keeps exp() representable once cast back to the input dtype.
        exponent = at_least_float32((a - 1.0) * logratios).clamp(max=11.0 if logratios.dtype == torch.float16 else 80.0)
        return torch.expm1(exponent).to(logratios.dtype) / (a - 1.0)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}.")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_token_logps: Tensor | None = None,
    chosen_token_mask: Tensor | None = None,
    wpo_weights: Tensor | None = None,
) -> PreferenceOutput:
    """DPO loss with TRL 1.16 ``DPOTrainer`` semantics for every ``loss_type``.

    Args:
        chosen_logps, rejected_logps: ``[B]`` float policy sequence log-probs (sums over the
            completion; LD-DPO-weighted ones from `ld_sequence_logps` when using ``ld_alpha``).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs, reduced the same
            way; both None for reference-free use (reference taken as 0).
        beta: temperature (the IPO tau for "ipo").
        loss_type: one of `DPO_LOSS_TYPES` or a list of them.
        loss_weights: one weight per loss type (default all 1).
        label_smoothing: flip probability for "robust", eps for "exo_pair" (required > 0), smoothing
            for "aot"/"aot_unpaired"; unused by the others (including "sigmoid", as in TRL 1.16).
        f_divergence_type, f_alpha_divergence_coef: see `f_divergence_scores`; non-default values only
            for the types in `F_DIVERGENCE_LOSS_TYPES`.
        discopop_tau: DiscoPOP temperature.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (plain counts, also under
            LD-DPO; clamped to 1), needed by "ipo" and "sigmoid_norm".
        chosen_token_logps, chosen_token_mask: ``[B, T]`` policy per-token log-probs of the chosen
            completions and their mask, needed by "sft" (mean NLL over all masked tokens of the batch).
        wpo_weights: ``[B]`` per-pair WPO weights (see `wpo_weights`), multiplied into every per-pair
            loss; not allowed with "aot"/"aot_unpaired".

    Returns:
        `PreferenceOutput`: the scalar loss and ``beta * log-ratio`` rewards, ``[B]``, detached.
    """
    loss_types, weights = check_dpo_args(
        loss_type, loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        use_weighting=wpo_weights is not None, beta=beta, discopop_tau=discopop_tau,
    )
    check_batch(
        ("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
    )
    _check_wpo_weights(wpo_weights, chosen_logps)
    ref_chosen_logps, ref_rejected_logps = _reference(ref_chosen_logps, ref_rejected_logps, chosen_logps)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    pairs = _Pairs(
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef),
        rejected_scores=f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef),
        chosen_lengths=_lengths(chosen_lengths, "chosen_lengths", loss_types, chosen_logps),
        rejected_lengths=_lengths(rejected_lengths, "rejected_lengths", loss_types, chosen_logps),
        sft_nll=_sft_nll(chosen_token_logps, chosen_token_mask, loss_types),
    )
    loss = sum(
        weight * _weighted(_LOSSES[name](pairs), wpo_weights).mean() for name, weight in zip(loss_types, weights)
    )
    return PreferenceOutput(
        loss=loss,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def _weighted(per_pair_loss: Tensor, wpo_weights: Tensor | None) -> Tensor:
    return per_pair_loss if wpo_weights is None else per_pair_loss * wpo_weights


def _reference(ref_chosen: Tensor | None, ref_rejected: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("Pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free).")
    if ref_chosen is None:
        zero = torch.zeros_like(like)
        return zero, zero
    return ref_chosen, ref_rejected


def _lengths(lengths: Tensor | None, name: str, loss_types: list[str], like: Tensor) -> Tensor | None:
    needers = sorted(_NEEDS_LENGTHS.intersection(loss_types))
    if not needers:
        return None
    if lengths is None:
        raise ValueError(f"loss_type {needers} needs `{name}`: the completion token count of each sequence, shape [B].")
    return token_counts(lengths, name, like)


def _sft_nll(token_logps: Tensor | None, token_mask: Tensor | None, loss_types: list[str]) -> Tensor | None:
    if "sft" not in loss_types:
        return None
    if token_logps is None or token_mask is None:
        raise ValueError(
            "loss_type 'sft' needs `chosen_token_logps` and `chosen_token_mask` ([B, T] per-token log-probs of the "
            "chosen completions and their completion mask)."
        )
    return sft_loss(token_logps, token_mask).loss


def check_dpo_args(
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    *,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    use_weighting: bool = False,
    beta: float | None = None,
    discopop_tau: float | None = None,
) -> tuple[list[str], list[float]]:
    """Validate a DPO configuration as `dpo_loss` does; return ``(loss_types, loss_weights)`` as lists.

    Raises ValueError for unknown loss or f-divergence types, a wrong number of ``loss_weights``,
    a divergence other than reverse KL with loss types that do not take one, "exo_pair" without
    ``label_smoothing`` in ``(0, 1)``, and WPO weights (``use_weighting``) with the sorting "aot" types; warns
    when "robust" gets ``label_smoothing`` outside ``[0, 0.5)``. When given, ``beta`` must be a finite
    number ``>= 0`` (``> 0`` for "ipo" and "sppo_hard", which divide by it) and ``discopop_tau`` one ``> 0``
    for "discopop"; a bool or a non-number is a TypeError.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    unknown = [name for name in loss_types if name not in _LOSSES]
    if unknown or not loss_types:
        raise ValueError(f"Unknown DPO loss_type {unknown or loss_types}; expected one or more of {DPO_LOSS_TYPES}.")
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights must have one weight per loss type: got {len(weights)} weights for {loss_types}."
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}.")
    if f_divergence_type != "reverse_kl" and not F_DIVERGENCE_LOSS_TYPES.issuperset(loss_types):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for the loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {loss_types}. Use 'reverse_kl' with these."
        )
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss_type 'exo_pair' needs label_smoothing > 0 and < 1 (the EXO paper suggests 1e-3); got {label_smoothing}."
        )
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        # TRL only warns here; 0.5 itself divides by zero.
        warnings.warn(f"label_smoothing should lie in [0, 0.5) for 'robust'; got {label_smoothing}.", stacklevel=3)
    if use_weighting and _SORTING_LOSS_TYPES.intersection(loss_types):
        raise ValueError("wpo_weights cannot be used with 'aot' or 'aot_unpaired': they sort the pairs.")
    if beta is not None:
        check_beta(beta, loss_types)
    if discopop_tau is not None and "discopop" in loss_types:
        check_coefficient(discopop_tau, "discopop_tau", positive=True, needed_by="'discopop' divides by it")
    return loss_types, weights


def _check_wpo_weights(wpo_weights: Tensor | None, like: Tensor) -> None:
    if wpo_weights is not None and wpo_weights.shape != like.shape:
        raise ValueError(f"wpo_weights must have shape {tuple(like.shape)}; got {tuple(wpo_weights.shape)}.")
