"""The base of the fused losses (`FusedLoss`, `FusedOutput`), their input checks and metric helpers.

A fused loss is: `align_losses.fused.tokens.head_pass` (one core call, per-token values laid out per
sequence) -> the family's "per-token log-probs -> loss" function (``dpo_from_tokens``, ...; the
trainers call the same functions on their model's per-token outputs) -> the metric helpers here,
which turn the loss's output and the token statistics into TRL's metric names (batch-local means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..losses.common import PreferenceOutput
from .tokens import HeadOptions, TokenBatch, head_pass


@dataclass(frozen=True)
class FusedOutput:
    """What a fused loss returns.

    Attributes:
        loss: ``[]`` float32 scalar to back-propagate.
        metrics: TRL metric name -> detached ``[]`` float32 tensor (call ``.item()`` when logging).
        result: the functional loss's own output (`PreferenceOutput`, `ORPOOutput`, `CPOOutput`,
            `KTOOutput` or `SFTOutput`), e.g. for the per-pair rewards.
    """

    loss: Tensor
    metrics: dict
    result: Any


class PairLoss(NamedTuple):
    """What a paired family's "per-token log-probs -> loss" function returns.

    Attributes:
        chosen_logps, rejected_logps: ``[B]`` the policy's sequence log-probs as the loss read them (sums,
            LD-weighted sums or per-token averages, by family and settings), with gradient.
        result: the functional loss's output (`PreferenceOutput`, `ORPOOutput` or `CPOOutput`).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    result: Any


class FusedLoss(nn.Module):
    """Base of the fused losses: head options, which core outputs a call needs, and one `head_pass`.

    Subclasses set ``metric_outputs`` (core outputs only their metrics read), override
    `loss_outputs` when the loss itself needs more than log-probs, and write ``forward``.
    """

    metric_outputs: tuple[str, ...] = ()

    def __init__(self, *, compute_metrics: bool = True, **head):
        super().__init__()
        self.compute_metrics = compute_metrics
        self.head = HeadOptions(**head)

    def loss_outputs(self) -> tuple[str, ...]:
        """Core outputs (beyond log-probs) the loss needs."""
        return ()

    def outputs(self) -> tuple[str, ...]:
        """Core outputs one call asks for: the loss's, plus the metrics' when ``compute_metrics``."""
        wanted = self.loss_outputs() + (self.metric_outputs if self.compute_metrics else ())
        return tuple(dict.fromkeys(wanted))

    def head_pass(self, hidden, weight, labels, *, bias=None, cu_seqlens=None, completion_mask=None) -> TokenBatch:
        return head_pass(
            hidden, weight, labels, head=self.head, outputs=self.outputs(), bias=bias, cu_seqlens=cu_seqlens,
            completion_mask=completion_mask,
        )

    def extra_repr(self) -> str:
        return f"head={self.head}, compute_metrics={self.compute_metrics}"


# ----------------------------------------------------------------------------------------------- input checks


def per_sequence_input(value: Optional[Tensor], name: str, count: int, device: torch.device) -> Optional[Tensor]:
    """Check a caller's ``[count]`` per-sequence tensor (e.g. reference log-probs); cast it to float32 on ``device``.

    Float32 is the dtype of the head pass's sequence log-probs; called before the head pass.
    """
    if value is None:
        return None
    if not isinstance(value, Tensor) or tuple(value.shape) != (count,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a tensor of shape [{count}] (one value per sequence); got {shape}")
    return value.to(device=device, dtype=torch.float32)


def require_reference(*references: Optional[Tensor], reference_free: bool, loss: str) -> None:
    """Reference log-probs must all be given unless the loss was built ``reference_free=True`` (then none).

    ``references``: the reference tensors of one call, e.g. ``(ref_chosen, ref_rejected)`` or ``(ref_logps,)``.
    """
    given = [ref is not None for ref in references]
    if reference_free and any(given):
        raise ValueError(f"{loss} was built with reference_free=True; do not pass reference log-probs")
    if not reference_free and not all(given):
        raise ValueError(
            f"{loss} needs the reference log-probs of every sequence (per-sequence sums over the same tokens, "
            "from the reference model or precomputed), or reference_free=True"
        )


# ----------------------------------------------------------------------------------------------- metrics


def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached ``[]`` mean of ``values`` over the True positions of ``mask`` (0 when there are none)."""
    return torch.where(mask, values.detach(), 0).sum() / mask.sum().clamp(min=1)


def mean(values: Tensor) -> Tensor:
    """Detached ``[]`` float mean of a ``[n]`` tensor."""
    return values.detach().float().mean()


def preference_metrics(result: PreferenceOutput, chosen_logps: Tensor, rejected_logps: Tensor) -> dict[str, Tensor]:
    """TRL's ``rewards/*`` and ``logps/*`` of a paired loss: batch means of its ``[B]`` rewards and log-probs."""
    return {
        "rewards/chosen": mean(result.chosen_rewards),
        "rewards/rejected": mean(result.rejected_rewards),
        "rewards/accuracies": mean(result.reward_accuracies),
        "rewards/margins": mean(result.reward_margins),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }


def logits_metrics(chosen: TokenBatch, rejected: TokenBatch) -> dict[str, Tensor]:
    """TRL's ``logits/chosen``, ``logits/rejected``: the vocabulary-mean logit, averaged over completion tokens."""
    return {
        "logits/chosen": token_mean(chosen.mean_logit, chosen.completion),
        "logits/rejected": token_mean(rejected.mean_logit, rejected.completion),
    }
