"""Per-sequence reductions of per-token quantities: sequence log-probs, LD-DPO and WPO weights.

All token tensors are ``[B, T]`` (float for log-probs, any dtype for masks; a mask is read as
``mask != 0``). Values at masked-out positions are ignored, whatever they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_same_shape


def sequence_logps(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """Sum (or mean) of the token log-probs over the completion mask.

    Args:
        token_logps: ``[B, T]`` float per-token log-probs.
        mask: ``[B, T]`` completion mask.
        average: divide by the number of completion tokens (clamped to at least 1, so an empty
            completion gives 0 rather than TRL's 0/0).

    Returns:
        ``[B]`` in the dtype of ``token_logps``.
    """
    check_same_shape(("token_logps", token_logps), ("mask", mask))
    keep = mask != 0
    total = torch.where(keep, token_logps, 0).sum(dim=-1)
    if not average:
        return total
    return total / keep.sum(dim=-1).clamp(min=1)


def check_ld_alpha(ld_alpha: float) -> None:
    """Raise ValueError unless the LD-DPO weight ``ld_alpha`` lies in ``[0, 1]``."""
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1]; got {ld_alpha}.")


def ld_sequence_logps(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    *,
    ld_alpha: float,
) -> tuple[Tensor, Tensor]:
    """Length-desensitised (LD-DPO) sequence log-probs of a chosen/rejected pair, as TRL's DPOTrainer.

    Within each pair, the first ``min(len_chosen, len_rejected)`` completion tokens of both
    completions count fully and the later ("verbose") tokens of the longer one count ``ld_alpha``
    times. Lengths are completion-mask counts; the order is the order of the mask's set positions.
    Call it again with the reference model's token log-probs and the same masks for the reference.

    Args:
        chosen_token_logps, rejected_token_logps: ``[B, T_c]``, ``[B, T_r]`` float per-token log-probs.
        chosen_mask, rejected_mask: matching completion masks.
        ld_alpha: weight of the verbose tokens, in ``[0, 1]`` (1 gives plain sums, 0 drops them).

    Returns:
        ``([B], [B])`` chosen and rejected log-probs, dtype of the token log-probs.
    """
    check_ld_alpha(ld_alpha)
    check_same_shape(("chosen_token_logps", chosen_token_logps), ("chosen_mask", chosen_mask))
    check_same_shape(("rejected_token_logps", rejected_token_logps), ("rejected_mask", rejected_mask))
    chosen_keep, rejected_keep = chosen_mask != 0, rejected_mask != 0
    shared = torch.minimum(chosen_keep.sum(dim=-1), rejected_keep.sum(dim=-1)).unsqueeze(-1)

    def weighted_sum(token_logps: Tensor, keep: Tensor) -> Tensor:
        # A token's rank within its completion is the running count of completion tokens up to it.
        in_shared = keep.cumsum(dim=-1) <= shared
        shared_part = sequence_logps(token_logps, keep & in_shared)
        verbose_part = sequence_logps(token_logps, keep & ~in_shared)
        return shared_part + ld_alpha * verbose_part

    return weighted_sum(chosen_token_logps, chosen_keep), weighted_sum(rejected_token_logps, rejected_keep)


@torch.no_grad()
def wpo_weights(
    chosen_token_logps: Tensor,
    chosen_log_sum_p2: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_log_sum_p2: Tensor,
    rejected_mask: Tensor,
) -> Tensor:
    """WPO pair weights (WPO paper, eq. 2), without gradient, as TRL's DPOTrainer ``use_weighting``.

    Each completion's weight is ``exp(mean over its tokens of (log p(y_t) - log sum_v p_v^2))``: its
    length-normalised probability measured against the policy's own sampling distribution
    (``sum_v p_v^2`` is the probability that the policy would sample the token it assigns). The pair
    weight is the product of the chosen and the rejected weights. Token counts are clamped to 1.

    Args:
        chosen_token_logps, rejected_token_logps: ``[B, T]`` float policy per-token log-probs
            (plain, without LD-DPO weighting).
        chosen_log_sum_p2, rejected_log_sum_p2: ``[B, T]`` float per-token ``log(sum_v p_v^2)``.
        chosen_mask, rejected_mask: ``[B, T]`` completion masks.

    Returns:
        ``[B]`` positive detached weights, dtype of the token log-probs.
    """
    check_same_shape(("chosen_token_logps", chosen_token_logps), ("chosen_log_sum_p2", chosen_log_sum_p2))
    check_same_shape(("rejected_token_logps", rejected_token_logps), ("rejected_log_sum_p2", rejected_log_sum_p2))
    chosen = sequence_logps(chosen_token_logps - chosen_log_sum_p2, chosen_mask, average=True)
    rejected = sequence_logps(rejected_token_logps - rejected_log_sum_p2, rejected_mask, average=True)
    return torch.exp(chosen) * torch.exp(rejected)
