"""SFT from per-token values (`sft_from_tokens`, shared with `trainers.FusedSFTTrainer`) and from hidden states
(`FusedSFTLoss`): TRL 1.16 SFT loss (NLL or DFT, label smoothing, z-loss) and metrics."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..losses import SFTOutput, check_sft_args, sft_loss, sft_outputs
from .common import FusedLoss, FusedOutput, token_mean
from .tokens import TokenBatch

#: Core outputs SFT's metrics read (``entropy``, ``mean_token_accuracy``).
SFT_METRIC_OUTPUTS = ("entropy", "argmax_hit")


def sft_from_tokens(tokens: TokenBatch, **loss_options) -> SFTOutput:
    """`align_losses.losses.sft_loss` over the scored tokens (``tokens.mask``), reading ``mean_logit`` and
    ``logsumexp`` where label smoothing or z-loss need them (`sft_outputs`).

    ``**loss_options``: `sft_loss`'s settings (``loss_type``, ``num_items_in_batch``, ``label_smoothing``, ``z_loss``).
    """
    return sft_loss(
        tokens.logprobs, tokens.mask, mean_logit=tokens.mean_logit, logsumexp=tokens.logsumexp, **loss_options
    )


class FusedSFTLoss(FusedLoss):
    """SFT from hidden states in one fused head pass: `head_pass` -> `sft_from_tokens` -> metrics.

    Args:
        loss_type: "nll" or "dft".
        label_smoothing: eps of the uniform-target mixture (asks the core for ``mean_logit`` and
            ``logsumexp``); exactly ``F.cross_entropy(label_smoothing=eps)``.
        z_loss: coefficient of ``logsumexp**2`` per token (asks the core for ``logsumexp``).
        compute_metrics: also ask the core for ``entropy`` and ``argmax_hit``.
        **head: `HeadOptions` (``shift=True``: labels are TRL's unshifted ``labels`` column).

    Call ``(hidden, weight, labels, *, bias=None, num_items_in_batch=None, cu_seqlens=None)``:
        hidden: ``[B, T, D]`` padded or ``[1, T_total, D]`` padding-free; labels: int, same leading shape.
        num_items_in_batch: token count of the whole accumulated batch (int or ``[]`` tensor), the
            divisor of the summed per-token losses instead of this batch's token count (TRL/transformers).
        cu_seqlens: optional ``[N + 1]`` boundaries of packed sequences: each sequence's first label
            is then not scored from the previous sequence's last position (TRL's padding-free
            collator already sets it to -100; this makes it unnecessary).

    Returns `FusedOutput`; ``result`` is the `SFTOutput`; metrics as TRL's SFTTrainer with
    ``compute_metrics``: ``entropy`` and ``mean_token_accuracy``, over all scored tokens.
    """

    metric_outputs = SFT_METRIC_OUTPUTS

    def __init__(
        self,
        loss_type: str = "nll",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        compute_metrics: bool = True,
        **head,
    ):
        super().__init__(compute_metrics=compute_metrics, **head)
        check_sft_args(loss_type, label_smoothing, z_loss)
        self.loss_type, self.label_smoothing, self.z_loss = loss_type, label_smoothing, z_loss

    def loss_outputs(self) -> tuple[str, ...]:
        return sft_outputs(self.label_smoothing, self.z_loss)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        num_items_in_batch: Optional[int | Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> FusedOutput:
        tokens = self.head_pass(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
        result = sft_from_tokens(
            tokens, loss_type=self.loss_type, num_items_in_batch=num_items_in_batch,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
        )
        metrics = {}
        if self.compute_metrics:
            metrics["entropy"] = token_mean(tokens.entropy, tokens.mask)
            metrics["mean_token_accuracy"] = token_mean(tokens.argmax_hit, tokens.mask)
        return FusedOutput(loss=result.loss, metrics=metrics, result=result)
