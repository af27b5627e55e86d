"""Pieces shared by the preference losses: the output record and three small numeric helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceOutput:
    """Result of a paired preference loss (DPO; base of the CPO and ORPO outputs).

    Attributes:
        loss: ``[]`` scalar to back-propagate, in the dtype of the inputs' computation.
        chosen_rewards: ``[B]`` implicit reward of each chosen completion, detached.
        rejected_rewards: ``[B]`` implicit reward of each rejected completion, detached.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def reward_margins(self) -> Tensor:
        """``[B]`` chosen minus rejected reward (TRL logs its mean as ``rewards/margins``)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def reward_accuracies(self) -> Tensor:
        """``[B]`` float 1.0 where the chosen reward is strictly larger (``rewards/accuracies``)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """Logistic loss on ``logits`` with the preference label flipped with probability ``label_smoothing``.

    ``-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``, elementwise, same shape and dtype as ``logits``.
    """
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half-precision tensors to float32; float32 and float64 pass through unchanged.

    TRL evaluates a few exp/log-heavy terms in float32 whatever the model dtype; keeping float64 as is
    lets the float64 tests check the formula at full precision.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_counts(lengths: Tensor, name: str, like: Tensor) -> Tensor:
    """Validate ``[B]`` completion token counts against ``like`` ``[B]``; return them clamped to >= 1 in its dtype.

    The clamp gives an empty completion a count of 1, as TRL, so that averages stay finite.
    """
    if lengths.shape != like.shape:
        raise ValueError(
            f"`{name}` must have shape {tuple(like.shape)} like the log-probs; got {tuple(lengths.shape)}."
        )
    return lengths.to(like.dtype).clamp(min=1)
