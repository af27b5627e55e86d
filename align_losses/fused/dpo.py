"""DPO from per-token log-probs (`dpo_from_tokens`, shared with `trainers.FusedDPOTrainer`) and from hidden
states (`FusedDPOLoss`): TRL 1.16 DPO loss and metrics."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..losses import check_dpo_args, check_ld_alpha, dpo_loss, wpo_weights
from .common import (
    FusedLoss,
    FusedOutput,
    PairLoss,
    logits_metrics,
    per_sequence_input,
    preference_metrics,
    require_reference,
    token_mean,
)
from .layout import pair_count
from .tokens import TokenBatch, pair_sequence_logps, split_pairs

#: Core outputs DPO's metrics read (``entropy``, ``logits/*``, ``mean_token_accuracy``).
DPO_METRIC_OUTPUTS = ("entropy", "mean_logit", "argmax_hit")


def dpo_loss_outputs(use_weighting: bool) -> tuple[str, ...]:
    """Core outputs (beyond log-probs) DPO's loss reads: ``log_sum_p2`` for WPO weights."""
    return ("log_sum_p2",) if use_weighting else ()


def dpo_from_tokens(
    chosen: TokenBatch,
    rejected: TokenBatch,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    *,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    lengths: Optional[tuple[Tensor, Tensor]] = None,
    **loss_options,
) -> PairLoss:
    """Per-sequence reductions of the policy's per-token values, then `align_losses.losses.dpo_loss`.

    Args:
        chosen, rejected: the ``B`` chosen and ``B`` rejected sequences (`split_pairs`); ``log_sum_p2``
            is read with ``use_weighting``.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs (reduced the same
            way, e.g. with `pair_sequence_logps` and the same ``ld_alpha``), or None (reference-free).
        ld_alpha: LD-DPO weight of the tokens beyond the shorter completion of each pair (None: sums).
        use_weighting: WPO pair weights (`wpo_weights`).
        lengths: ``([B], [B])`` completion lengths for "ipo"/"sigmoid_norm"; default the completion
            token counts of ``chosen``/``rejected`` (TRL's trainer counts its unshifted completion mask).
        **loss_options: the rest of `dpo_loss`'s settings (``beta``, ``loss_type``, ``loss_weights``,
            ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``).

    Returns:
        `PairLoss`: the (LD-)summed ``[B]`` log-probs and the `PreferenceOutput`.
    """
    chosen_logps, rejected_logps = pair_sequence_logps(chosen, rejected, ld_alpha)
    weights = None
    if use_weighting:
        weights = wpo_weights(
            chosen.logprobs, chosen.log_sum_p2, chosen.completion,
            rejected.logprobs, rejected.log_sum_p2, rejected.completion,
        )
    chosen_lengths, rejected_lengths = lengths if lengths is not None else (chosen.lengths, rejected.lengths)
    result = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_token_logps=chosen.logprobs,
        chosen_token_mask=chosen.completion,
        wpo_weights=weights,
        **loss_options,
    )
    return PairLoss(chosen_logps, rejected_logps, result)


class FusedDPOLoss(FusedLoss):
    """DPO from the policy's final hidden states in one fused head pass (no ``[tokens, V]`` logits).

    Built as: `head_pass` -> `split_pairs` -> `dpo_from_tokens` -> metrics.

    Args:
        beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
            discopop_tau: as `align_losses.losses.dpo_loss` (``loss_type`` may be a list, weighted
            by ``loss_weights``).
        ld_alpha: LD-DPO weight of the tokens beyond the shorter completion of each pair (None: plain
            sums). The reference log-probs must then be LD-reduced the same way
            (`fused_sequence_logps(..., ld_alpha=...)`).
        use_weighting: WPO pair weights (asks the core for ``log_sum_p2``).
        reference_free: no reference model (reference log-probs taken as 0); by default the
            reference log-probs are required.
        compute_metrics: also ask the core for ``entropy``, ``mean_logit`` and ``argmax_hit`` and
            log ``entropy``, ``logits/*`` and ``mean_token_accuracy``. ``rewards/*`` and
            ``logps/*`` cost nothing and are always there.
        **head: `HeadOptions` (``impl``, ``ignore_index``, ``shift=True``, ``temperature``,
            ``softcap``, ``logit_scale``, ``backend_options``, ``process_group``).

    Call ``(hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
    cu_seqlens=None)``:
        hidden: ``[2B, T, D]`` padded rows, chosen rows first then rejected (TRL's
            ``DataCollatorForPreference``), or ``[1, T_total, D]`` packed with ``cu_seqlens``.
        weight: ``[V, D]``; bias: ``[V]`` or None.
        labels: int ``[2B, T]`` / ``[1, T_total]``: the input ids with ``ignore_index`` on the prompt
            and the padding (TRL: ``input_ids.masked_fill(completion_mask == 0, -100)``), unshifted.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs (sums over the same tokens).
        cu_seqlens: int ``[2B + 1]`` packed sequence boundaries; sequences ``0..B-1`` are chosen,
            ``B..2B-1`` rejected. Padded and packed forms of one batch give the same loss.

    Returns `FusedOutput`; ``metrics`` as TRL's DPOTrainer: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over
    the B pairs; logps are the (LD-)summed sequence log-probs), and with ``compute_metrics``
    ``logits/chosen``, ``logits/rejected`` (mean over completion tokens of the vocabulary-mean
    logit), ``entropy`` (mean over all completion tokens) and ``mean_token_accuracy`` (chosen
    completion tokens whose label is the argmax).

    Completion lengths for "ipo"/"sigmoid_norm" are the counts of scored tokens (TRL counts the
    unshifted completion mask; the two differ only when a completion starts at position 0).
    """

    metric_outputs = DPO_METRIC_OUTPUTS

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Optional[Sequence[float]] = None,
        label_smoothing: float = 0.0,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        ld_alpha: Optional[float] = None,
        use_weighting: bool = False,
        reference_free: bool = False,
        compute_metrics: bool = True,
        **head,
    ):
        super().__init__(compute_metrics=compute_metrics, **head)
        check_dpo_args(
            loss_type, loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
            use_weighting=use_weighting, beta=beta, discopop_tau=discopop_tau,
        )
        if ld_alpha is not None:
            check_ld_alpha(ld_alpha)
        self.beta, self.loss_type, self.loss_weights = beta, loss_type, loss_weights
        self.label_smoothing, self.f_divergence_type = label_smoothing, f_divergence_type
        self.f_alpha_divergence_coef, self.discopop_tau = f_alpha_divergence_coef, discopop_tau
        self.ld_alpha, self.use_weighting, self.reference_free = ld_alpha, use_weighting, reference_free

    def loss_outputs(self) -> tuple[str, ...]:
        return dpo_loss_outputs(self.use_weighting)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        ref_chosen_logps: Optional[Tensor] = None,
        ref_rejected_logps: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> FusedOutput:
        require_reference(
            ref_chosen_logps, ref_rejected_logps, reference_free=self.reference_free, loss="FusedDPOLoss"
        )
        pairs = pair_count(labels, cu_seqlens)
        ref_chosen_logps = per_sequence_input(ref_chosen_logps, "ref_chosen_logps", pairs, hidden.device)
        ref_rejected_logps = per_sequence_input(ref_rejected_logps, "ref_rejected_logps", pairs, hidden.device)
        tokens = self.head_pass(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
        chosen, rejected = split_pairs(tokens)
        pair = dpo_from_tokens(
            chosen, rejected, ref_chosen_logps, ref_rejected_logps, ld_alpha=self.ld_alpha,
            use_weighting=self.use_weighting, beta=self.beta, loss_type=self.loss_type,
            loss_weights=self.loss_weights, label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.discopop_tau,
        )
        metrics = preference_metrics(pair.result, pair.chosen_logps, pair.rejected_logps)
        if self.compute_metrics:
            metrics.update(logits_metrics(chosen, rejected))
            metrics["entropy"] = token_mean(tokens.entropy, tokens.completion)
            metrics["mean_token_accuracy"] = token_mean(chosen.argmax_hit, chosen.completion)
        return FusedOutput(loss=pair.result.loss, metrics=metrics, result=pair.result)
