"""ORPO (odds-ratio preference optimisation) on per-token-average log-probs, as TRL's ORPOTrainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import PreferenceOutput, at_least_float32, check_batch, check_coefficient
from .sft import chosen_nll


@dataclass(frozen=True)
class ORPOOutput(PreferenceOutput):
    """Result of `orpo_loss`; ``loss = nll_loss + or_loss``.

    Attributes (beyond `PreferenceOutput`, whose rewards are ``beta * average log-prob``):
        nll_loss: ``[]`` the NLL term, as given or computed (differentiable).
        or_loss: ``[]`` the odds-ratio term ``-beta * mean(log sigmoid(log_odds))`` (differentiable).
        log_odds_ratio: ``[B]`` ``log sigmoid(log_odds)``, detached; TRL logs its mean as ``log_odds_ratio``.
        log_odds_chosen: ``[B]`` ``log_odds``, detached; TRL logs its mean as ``log_odds_chosen``.
    """

    nll_loss: Tensor
    or_loss: Tensor
    log_odds_ratio: Tensor
    log_odds_chosen: Tensor


#: Largest average log-prob `_log1mexp` takes: a completion of confidently predicted tokens can
#: average exactly 0 in float32, where ``log(1 - p)`` is -inf and its gradient NaN (TRL 1.16 gives NaN
#: gradients there). Clamped, such a pair keeps a finite loss and adds no ``log(1 - p)`` gradient.
_MAX_AVERAGE_LOGP = -1e-6


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` (``x`` clamped to `_MAX_AVERAGE_LOGP`), switching form at
    ``-log 2`` to avoid cancellation."""
    x = x.clamp(max=_MAX_AVERAGE_LOGP)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def check_orpo_args(beta: float) -> None:
    """Raise unless ``beta`` (the odds-ratio weight) is a finite number >= 0 (TypeError for a bool or a non-number)."""
    check_coefficient(beta, "beta")


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    nll_loss: Tensor | None = None,
    chosen_token_logps: Tensor | None = None,
    chosen_token_mask: Tensor | None = None,
) -> ORPOOutput:
    """ORPO loss: ``NLL(chosen) - beta * mean(log sigmoid(log odds(chosen) - log odds(rejected)))``.

    ``log odds(y) = log p - log(1 - p)`` with ``log p`` the per-token AVERAGE log-prob of the
    completion (`sequence_logps(..., average=True)`), as TRL's ORPOTrainer. The odds-ratio term is
    computed in at least float32 (TRL upcasts half precision to float32).

    The NLL term is either passed as ``nll_loss`` or computed here as the token mean of
    ``-chosen_token_logps`` over ``chosen_token_mask``. Note that TRL's ORPOTrainer takes this NLL over
    the prompt AND the completion tokens of the chosen sequences (its attention mask), unlike CPO.

    Args:
        chosen_logps, rejected_logps: ``[B]`` float per-token-average log-probs (< 0).
        beta: weight of the odds-ratio term (the paper's lambda).
        nll_loss: ``[]`` precomputed NLL term; or
        chosen_token_logps, chosen_token_mask: ``[B, T]`` per-token log-probs and their mask.

    Returns:
        `ORPOOutput`.
    """
    check_orpo_args(beta)
    check_batch(("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps))
    nll = chosen_nll(nll_loss, chosen_token_logps, chosen_token_mask, needed_by="orpo_loss")
    chosen, rejected = at_least_float32(chosen_logps), at_least_float32(rejected_logps)
    # log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)), from log-probs (ORPO eqs. 4 and 7)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    log_odds_ratio = F.logsigmoid(log_odds)
    or_loss = -beta * log_odds_ratio.mean()
    return ORPOOutput(
        loss=nll + or_loss,
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        nll_loss=nll,
        or_loss=or_loss,
        log_odds_ratio=log_odds_ratio.detach(),
        log_odds_chosen=log_odds.detach(),
    )
