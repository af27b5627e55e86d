"""`FusedORPOLoss`, `FusedCPOLoss` and `FusedSimPOLoss`: reference-free paired losses with an NLL term.

TRL's ORPO and CPO trainers build full ``[2B, T, V]`` logits; these run the same losses from the
hidden states through one fused head pass. Batches are laid out as for `FusedDPOLoss` (chosen rows
first, then rejected; padded, or packed with ``cu_seqlens [2B + 1]``).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..losses import check_cpo_args, cpo_loss, orpo_loss, sequence_logps
from .common import FusedLoss, FusedOutput, logits_metrics, mean, pair_count, preference_metrics, split_pairs


class FusedORPOLoss(FusedLoss):
    """ORPO (TRL's ORPOTrainer) from hidden states: ``NLL(chosen) - beta * mean(log sigmoid(log odds ratio))``.

    Built as: `head_pass` (with ``completion_mask``) -> `split_pairs` -> per-token-average
    completion log-probs (`sequence_logps(average=True)`) -> `orpo_loss`, whose NLL term is the
    token mean of ``-log p`` over every scored token of the chosen rows.

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

    metric_outputs = ("mean_logit",)

    def __init__(self, beta: float = 0.1, compute_metrics: bool = True, **head):
        super().__init__(compute_metrics=compute_metrics, **head)
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
        chosen_logps = sequence_logps(chosen.logps, chosen.completion, average=True)
        rejected_logps = sequence_logps(rejected.logps, rejected.completion, average=True)
        result = orpo_loss(
            chosen_logps, rejected_logps, beta=self.beta, chosen_token_logps=chosen.logps, chosen_token_mask=chosen.mask
        )
        metrics = preference_metrics(result, chosen_logps, rejected_logps)
        metrics["nll_loss"] = result.nll_loss.detach()
        metrics["log_odds_ratio"] = mean(result.log_odds_ratio)
        metrics["log_odds_chosen"] = mean(result.log_odds_chosen)
        if self.compute_metrics:
            metrics.update(logits_metrics(chosen, rejected))
        return FusedOutput(loss=result.loss, metrics=metrics, result=result)


class FusedCPOLoss(FusedLoss):
    """CPO (TRL's CPOTrainer; SimPO and AlphaPO by ``loss_type``/``alpha``) from hidden states.

    Built as: `head_pass` -> `split_pairs` -> completion sums and lengths -> `cpo_loss` (which
    averages per token for "ipo"/"simpo", as TRL), NLL term = token mean of ``-log p`` over the
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

    metric_outputs = ("mean_logit",)

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
        check_cpo_args(loss_type)
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
        chosen_sums = sequence_logps(chosen.logps, chosen.completion)
        rejected_sums = sequence_logps(rejected.logps, rejected.completion)
        result = cpo_loss(
            chosen_sums,
            rejected_sums,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            cpo_alpha=self.cpo_alpha,
            simpo_gamma=self.simpo_gamma,
            alpha=self.alpha,
            chosen_lengths=chosen.lengths,
            rejected_lengths=rejected.lengths,
            chosen_token_logps=chosen.logps,
            chosen_token_mask=chosen.mask,
        )
        metrics = preference_metrics(result, result.chosen_logps, result.rejected_logps)
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
