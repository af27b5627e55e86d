"""Pieces shared by the losses: the output record, three small numeric helpers and the argument checks."""

from __future__ import annotations

import math
import numbers
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


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks shared by the losses: every loss runs them before it computes anything, so that a wrong shape
# is a ValueError naming both shapes rather than a broadcast that gives a wrong loss.


def check_batch(first: tuple[str, Tensor], *others: tuple[str, Tensor | None]) -> None:
    """Check ``[B]`` per-sequence tensors: ``first`` is a non-empty 1-D float tensor, each other one (None is
    skipped) has exactly its shape.

    Raises TypeError for a non-tensor and ValueError naming the expected and the given shape otherwise.
    """
    name, like = first
    if not isinstance(like, Tensor):
        raise TypeError(f"`{name}` must be a [B] tensor of per-sequence values; got {type(like).__name__}.")
    if like.dim() != 1:
        raise ValueError(f"`{name}` must have shape [B] (one value per sequence); got shape {tuple(like.shape)}.")
    if like.shape[0] == 0:
        raise ValueError(f"`{name}` is empty (B = 0): the loss of an empty batch is undefined; expected B >= 1.")
    if not like.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating tensor of log-probs; got {like.dtype}.")
    for other_name, other in others:
        if other is None:
            continue
        if not isinstance(other, Tensor):
            raise TypeError(
                f"`{other_name}` must be a tensor of shape {tuple(like.shape)} like `{name}`; got {type(other).__name__}."
            )
        if other.shape != like.shape:
            raise ValueError(
                f"`{other_name}` must have shape {tuple(like.shape)} like `{name}`; got {tuple(other.shape)}."
            )


def check_same_shape(first: tuple[str, Tensor], second: tuple[str, Tensor]) -> None:
    """Raise ValueError unless the two named tensors (e.g. per-token log-probs and their mask) have one shape."""
    (name_a, a), (name_b, b) = first, second
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        bad = name_a if not isinstance(a, Tensor) else name_b
        raise TypeError(f"`{bad}` must be a tensor; got {type(a if bad == name_a else b).__name__}.")
    if a.shape != b.shape:
        raise ValueError(f"`{name_b}` must have the shape of `{name_a}`, {tuple(a.shape)}; got {tuple(b.shape)}.")


def check_coefficient(value, name: str, *, positive: bool = False, needed_by: str = "") -> None:
    """Raise unless ``value`` is a finite real number ``>= 0`` (``> 0`` with ``positive``).

    A bool is refused (TypeError): ``True`` is not a coefficient. ``needed_by`` says why a positive
    value is needed (e.g. a loss type that divides by it).
    """
    check_real(value, name)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        why = f" ({needed_by})" if needed_by and positive else ""
        raise ValueError(f"`{name}` must be a finite number {bound}{why}; got {value!r}.")


def check_real(value, name: str) -> None:
    """Raise TypeError unless ``value`` is a real number; a bool is refused (``True`` is not a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number; got {value!r} ({type(value).__name__}).")
