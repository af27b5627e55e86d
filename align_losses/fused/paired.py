"""ORPO and CPO (SimPO, AlphaPO): reference-free paired losses with an NLL term.

`orpo_from_tokens` and `cpo_from_tokens` go from per-token log-probs to the loss; `trainers.FusedORPOTrainer`
and `trainers.FusedCPOTrainer` call them on their model's per-token outputs, and `FusedORPOLoss`,
`FusedCPOLoss` and `FusedSimPOLoss` on one fused head pass over the hidden states (TRL's ORPO and CPO
trainers build full ``[2B, T, V]`` logits instead). Batches are laid out as for `FusedDPOLoss`
(chosen rows first, then rejected; padded, or packed with ``cu_seqlens [2B + 1]``).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..losses import AVERAGED_LOSS_TYPES, check_cpo_args, check_orpo_args, cpo_loss, orpo_loss, sequence_logps
from .common import FusedLoss, FusedOutput, PairLoss, logits_metrics, mean, preference_metrics
from .layout import pair_count
from .tokens import TokenBatch, pair_sequence_logps, split_pairs

#: Core outputs the ORPO and CPO metrics read (``logits/*``).
PAIRED_METRIC_OUTPUTS = ("mean_logit",)


def orpo_from_tokens(chosen: TokenBatch, rejected: TokenBatch, *, beta: float) -> PairLoss:
    """Per-token average completion log-probs, then `align_losses.losses.orpo_loss`.

    The NLL term is the token mean of ``-log p`` over ``chosen.mask`` (every scored token of the
    chosen rows); the odds ratio reads averages over ``completion``. Returns the ``[B]`` averages.
    """
    chosen_logps = sequence_logps(chosen.logprobs, chosen.completion, average=True)
    rejected_logps = sequence_logps(rejected.logprobs, rejected.completion, average=True)
    result = orpo_loss(
        chosen_logps, rejected_logps, beta=beta, chosen_token_logps=chosen.logprobs, chosen_token_mask=chosen.mask
    )
    return PairLoss(chosen_logps, rejected_logps, result)


def cpo_from_tokens(
    chosen: TokenBatch, rejected: TokenBatch, *, loss_type: str = "sigmoid", **loss_options
) -> PairLoss:
    """Completion sums and lengths, then `align_losses.losses.cpo_loss`.

    The NLL term (``cpo_alpha != 0``) is the token mean of ``-log p`` over ``chosen.mask``.
    ``**loss_options``: the rest of `cpo_loss`'s settings (``beta``, ``label_smoothing``,
    ``cpo_alpha``, ``simpo_gamma``, ``alpha``). Returns the log-probs the loss read, with gradient:
    per-token averages for the `AVERAGED_LOSS_TYPES`, sums otherwise (TRL logs these).
    """
    chosen_sums, rejected_sums = pair_sequence_logps(chosen, rejected)
    chosen_lengths, rejected_lengths = chosen.lengths, rejected.lengths
    result = cpo_loss(
        chosen_sums,
        rejected_sums,
        loss_type=loss_type,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_token_logps=chosen.logprobs,
        chosen_token_mask=chosen.mask,
        **loss_options,
    )
    if loss_type in AVERAGED_LOSS_TYPES:  # the per-token averages the loss read
        return PairLoss(
            chosen_sums / chosen_lengths.clamp(min=1), rejected_sums / rejected_lengths.clamp(min=1), result
        )
    return PairLoss(chosen_sums, rejected_sums, result)


class FusedORPOLoss(FusedLoss):
    """ORPO (TRL's ORPOTrainer) from hidden states: ``NLL(chosen) - beta * mean(log sigmoid(log odds ratio))``.

    Built as: `head_pass` (with ``completion_mask``) -> `split_pairs` -> `orpo_from_tokens` (per-token
    average completion log-probs -> `orpo_loss`, whose NLL term is the token mean of ``-log p`` over
    every scored token of the chosen rows).

    Which tokens the NLL covers is set by ``labels``: TRL's ORPO takes it over the prompt AND the
    completion (every non-padding token of the chosen rows). For that, pass ``labels`` = the input
    ids with ``ignore_index`` only on padding (``where(attention_mask == 1, input_ids, -100)``; the
    rejected rows' prompts may be set to ``ignore_index`` to skip scoring them) and
    ``completion_mask`` (1 on completion tokens) so that the odds ratio averages over the
    completions only. Without ``completion_mask``, both terms cover the labelled tokens (labels
    with the prompt ignored give an NLL over the completion only, unlike TRL).

    Args:
        beta: weight of the odds-ratio term (the paper's lambda).
        compute_metrics: also ask the core for ``mean_logit`` to log ``logits/*``.
        **head: `HeadOptions`.

    Call ``(hidden, weight, labels, *, bias=None, completion_mask=None, cu_seqlens=None)`` with
    ``hidden [2B, T, D]`` / ``[1, T_total, D]``, ``labels`` int, ``completion_mask`` shaped like
    ``labels`` (any dtype, nonzero = completion, unshifted like the labels), ``cu_seqlens [2B + 1]``.

    Returns `FusedOutput`; metrics as TRL's ORPOTrainer: ``rewards/*`` (``beta`` x average
    log-prob), ``logps/chosen|rejected`` (average log-probs), ``nll_loss``, ``log_odds_ratio``
    (mean log sigmoid(log odds)), ``log_odds_chosen`` (mean log odds), and with ``compute_metrics``
    ``logits/chosen|rejected``: here the mean over completion tokens of the vocabulary-mean logit,
    as DPO; TRL's ORPO averages the full logits over every position, prompt and padding included,
    which a fused head never sees.
    """

    metric_outputs = PAIRED_METRIC_OUTPUTS

    def __init__(self, beta: float = 0.1, compute_metrics: bool = True, **head):
        super().__init__(compute_metrics=compute_metrics, **head)
        check_orpo_args(beta)
        self.beta = beta

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        completion_mask: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> FusedOutput:
        pair_count(labels, cu_seqlens)
        tokens = self.head_pass(
            hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, completion_mask=completion_mask
        )
        chosen, rejected = split_pairs(tokens)
        chosen_logps, rejected_logps, result = orpo_from_tokens(chosen, rejected, beta=self.beta)
        metrics = preference_metrics(result, chosen_logps, rejected_logps)
        metrics["nll_loss"] = result.nll_loss.detach()
        metrics["log_odds_ratio"] = mean(result.log_odds_ratio)
        metrics["log_odds_chosen"] = mean(result.log_odds_chosen)
        if self.compute_metrics:
            metrics.update(logits_metrics(chosen, rejected))
        return FusedOutput(loss=result.loss, metrics=metrics, result=result)


class FusedCPOLoss(FusedLoss):
    """CPO (TRL's CPOTrainer; SimPO and AlphaPO by ``loss_type``/``alpha``) from hidden states.

    Built as: `head_pass` -> `split_pairs` -> `cpo_from_tokens` (completion sums and lengths ->
    `cpo_loss`, which averages per token for the `AVERAGED_LOSS_TYPES`, as TRL),
    NLL term = token mean of ``-log p`` over the
    chosen completion tokens, times ``cpo_alpha`` (TRL's CPO NLL covers the completion only, so
    ``labels`` are the input ids with the prompt and padding ignored, as for DPO).

    Args:
        beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha: as `align_losses.losses.cpo_loss`.
        compute_metrics: also ask the core for ``mean_logit`` to log ``logits/*``.
        **head: `HeadOptions`.

    Call ``(hidden, weight, labels, *, bias=None, cu_seqlens=None)``, shapes as `FusedDPOLoss`.

    Returns `FusedOutput`; metrics as TRL's CPOTrainer: ``rewards/*`` (``beta`` x the possibly
    averaged, possibly AlphaPO-shaped log-prob), ``logps/chosen|rejected`` (per-token averages for
    "ipo"/"simpo"/"alphapo", sums otherwise), ``nll_loss``, and with ``compute_metrics``
    ``logits/chosen|rejected`` (mean over completion tokens of the vocabulary-mean logit; TRL
    averages its full logits over every position instead).
    """

    metric_outputs = PAIRED_METRIC_OUTPUTS

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        compute_metrics: bool = True,
        **head,
    ):
        super().__init__(compute_metrics=compute_metrics, **head)
        check_cpo_args(loss_type, beta=beta, cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma, alpha=alpha)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.cpo_alpha, self.simpo_gamma, self.alpha = cpo_alpha, simpo_gamma, alpha

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> FusedOutput:
        pair_count(labels, cu_seqlens)
        tokens = self.head_pass(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
        chosen, rejected = split_pairs(tokens)
        chosen_logps, rejected_logps, result = cpo_from_tokens(
            chosen, rejected, loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
            cpo_alpha=self.cpo_alpha, simpo_gamma=self.simpo_gamma, alpha=self.alpha,
        )
        metrics = preference_metrics(result, chosen_logps, rejected_logps)
        metrics["nll_loss"] = result.nll_loss.detach()
        if self.compute_metrics:
            metrics.update(logits_metrics(chosen, rejected))
        return FusedOutput(loss=result.loss, metrics=metrics, result=result)


class FusedSimPOLoss(FusedCPOLoss):
    """SimPO: `FusedCPOLoss` with ``loss_type="simpo"`` and, by default, no NLL term (``cpo_alpha=0``).

    ``-log sigmoid(beta * (avg logp_chosen - avg logp_rejected) - simpo_gamma)`` averaged over pairs
    (TRL's CPOTrainer with ``loss_type="simpo"``; defaults otherwise TRL's ``CPOConfig``'s).
    Call and metrics as `FusedCPOLoss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        simpo_gamma: float = 0.5,
        label_smoothing: float = 0.0,
        alpha: float = 0.0,
        cpo_alpha: float = 0.0,
        compute_metrics: bool = True,
        **head,
    ):
        super().__init__(
            beta=beta, loss_type="simpo", label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
            simpo_gamma=simpo_gamma, alpha=alpha, compute_metrics=compute_metrics, **head,
        )
