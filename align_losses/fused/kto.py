"""KTO from per-token log-probs (`kto_from_tokens`, shared with `trainers.FusedKTOTrainer`) and from hidden
states (`FusedKTOLoss`): unpaired, labelled completions -> TRL 1.16 KTO loss and metrics."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from ..losses import KTOOutput, check_kl_estimate, check_kto_args, check_kto_labels, kto_loss, sequence_logps
from .common import FusedLoss, FusedOutput, mean, per_sequence_input, require_reference, token_mean
from .layout import sequence_count
from .tokens import TokenBatch

#: Core outputs KTO's metrics read (``entropy``, ``logits/*``).
KTO_METRIC_OUTPUTS = ("entropy", "mean_logit")


class KTOLoss(NamedTuple):
    """What `kto_from_tokens` returns: ``logps`` ``[B]`` the policy's completion sums (with gradient), and
    ``result`` the `KTOOutput`."""

    logps: Tensor
    result: KTOOutput


def kto_from_tokens(
    tokens: TokenBatch,
    ref_logps: Optional[Tensor],
    desirable: Tensor,
    kl: Optional[Tensor],
    **loss_options,
) -> KTOLoss:
    """Completion sums of the policy's per-token log-probs, then `align_losses.losses.kto_loss`.

    Args:
        tokens: the ``B`` examples, desirable and undesirable mixed.
        ref_logps: ``[B]`` reference completion sums, or None (reference-free).
        desirable: ``[B]`` bool, True for desirable completions.
        kl: ``[]`` the KL reference point for "kto" (see `FusedKTOLoss`), None for "apo_zero_unpaired".
        **loss_options: the rest of `kto_loss`'s settings (``beta``, ``loss_type``, ``desirable_weight``,
            ``undesirable_weight``).
    """
    logps = sequence_logps(tokens.logprobs, tokens.completion)
    return KTOLoss(logps, kto_loss(logps, ref_logps, desirable, kl, **loss_options))


class FusedKTOLoss(FusedLoss):
    """KTO (or unpaired APO-zero) from the policy's hidden states in one fused head pass.

    Built as: `head_pass` -> `kto_from_tokens` -> metrics. Rows are examples,
    desirable and undesirable mixed, as TRL's ``DataCollatorForUnpairedPreference``.

    Args:
        beta, loss_type, desirable_weight, undesirable_weight: as `align_losses.losses.kto_loss`.
        reference_free: no reference model (reference log-probs taken as 0); by default ``ref_logps`` is required.
        compute_metrics: also ask the core for ``entropy`` and ``mean_logit`` (``entropy``, ``logits/*``).
        **head: `HeadOptions`.

    Call ``(hidden, weight, labels, desirable, *, bias=None, ref_logps=None, kl=None, cu_seqlens=None)``:
        hidden: ``[B, T, D]`` padded or ``[1, T_total, D]`` packed; labels: int, the input ids with
            ``ignore_index`` on prompt and padding, unshifted.
        desirable: ``[B]`` bool (or 0/1), True for desirable completions (TRL's ``label``).
        ref_logps: ``[B]`` reference sequence log-probs (sums over the same tokens).
        kl: ``[]`` KL estimate for "kto": the batch mean of policy minus reference summed log-probs
            of the mismatched KL completions, computed without gradient (e.g. with
            `fused_sequence_logps` on the policy and the reference), averaged across ranks; clamped
            at 0 by `kto_loss`. None for "apo_zero_unpaired".
        cu_seqlens: int ``[B + 1]`` packed sequence boundaries, in example order.

    Returns `FusedOutput`; metrics as TRL's KTOTrainer: ``kl``, ``rewards/chosen``,
    ``logps/chosen`` (present only when the batch has desirable examples), ``rewards/rejected``,
    ``logps/rejected`` (only with undesirable ones), ``rewards/margins`` (only with both), and with
    ``compute_metrics`` ``entropy`` (all completion tokens) and ``logits/chosen|rejected`` (completion
    tokens of each group, only when it has any). Means are over this batch; TRL gathers sums and
    counts across ranks first.
    """

    metric_outputs = KTO_METRIC_OUTPUTS

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference_free: bool = False,
        compute_metrics: bool = True,
        **head,
    ):
        super().__init__(compute_metrics=compute_metrics, **head)
        check_kto_args(
            loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
        )
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.reference_free = reference_free

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        desirable: Tensor,
        *,
        bias: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        kl: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> FusedOutput:
        require_reference(ref_logps, reference_free=self.reference_free, loss="FusedKTOLoss")
        n = sequence_count(labels, cu_seqlens)
        if not isinstance(desirable, Tensor) or tuple(desirable.shape) != (n,):
            shape = tuple(desirable.shape) if isinstance(desirable, Tensor) else type(desirable).__name__
            raise ValueError(f"`desirable` must be a [{n}] tensor, one flag per sequence; got {shape}")
        ref_logps = per_sequence_input(ref_logps, "ref_logps", n, hidden.device)
        check_kl_estimate(kl, self.loss_type)
        good = check_kto_labels(desirable.to(device=hidden.device))  # 2, -1 or 0.5 refused, not desirable
        tokens = self.head_pass(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
        logps, result = kto_from_tokens(
            tokens, ref_logps, good, kl, beta=self.beta, loss_type=self.loss_type,
            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
        )
        metrics = {"kl": result.kl.detach().float()}
        if self.compute_metrics:
            metrics["entropy"] = token_mean(tokens.entropy, tokens.completion)
            for name, group in (("chosen", good), ("rejected", ~good)):
                part = tokens.rows(group)
                if part.completion.any():
                    metrics[f"logits/{name}"] = token_mean(part.mean_logit, part.completion)
        groups = (("chosen", result.chosen_rewards, good), ("rejected", result.rejected_rewards, ~good))
        for name, rewards, group in groups:
            if rewards.numel():
                metrics[f"rewards/{name}"] = mean(rewards)
                metrics[f"logps/{name}"] = mean(logps[group])
        if result.chosen_rewards.numel() and result.rejected_rewards.numel():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return FusedOutput(loss=result.loss, metrics=metrics, result=result)
