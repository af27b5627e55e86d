"""Supervised fine-tuning loss on per-token log-probs: NLL or DFT, label smoothing, z-loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .common import check_real, check_same_shape

SFT_LOSS_TYPES = ("nll", "dft")


@dataclass(frozen=True)
class SFTOutput:
    """Result of `sft_loss`.

    Attributes:
        loss: ``[]`` scalar to back-propagate.
        nll_loss: ``[]`` plain NLL with the same normalisation, detached (for logging).
        num_items: ``[]`` the denominator used (token count or ``num_items_in_batch``, at least 1), an
            integer tensor for a token count or an int ``num_items_in_batch``.
    """

    loss: Tensor
    nll_loss: Tensor
    num_items: Tensor


def sft_outputs(label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[str, ...]:
    """The per-token core outputs (beyond log-probs) that `sft_token_losses` reads for these settings.

    ``("mean_logit", "logsumexp")`` with label smoothing, ``("logsumexp",)`` with z-loss alone, else ``()``.
    """
    if label_smoothing > 0:
        return ("mean_logit", "logsumexp")
    return ("logsumexp",) if z_loss > 0 else ()


def check_sft_args(loss_type: str = "nll", label_smoothing: float = 0.0, z_loss: float = 0.0) -> None:
    """Raise ValueError for an SFT configuration `sft_loss` refuses (unknown type, eps outside [0, 1], ...)."""
    if loss_type not in SFT_LOSS_TYPES:
        alias = " (TRL's deprecated alias of 'nll': pass 'nll')" if loss_type == "chunked_nll" else ""
        raise ValueError(f"Unknown SFT loss_type {loss_type!r}{alias}; expected one of {SFT_LOSS_TYPES}.")
    check_real(label_smoothing, "label_smoothing")
    check_real(z_loss, "z_loss")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing}.")
    if label_smoothing > 0 and loss_type == "dft":
        # TRL's SFTTrainer silently drops label smoothing under DFT; refuse rather than ignore it.
        raise ValueError("label_smoothing is only defined for loss_type='nll', not 'dft'.")
    if not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be >= 0 and finite; got {z_loss}.")


def sft_token_losses(
    token_logps: Tensor,
    *,
    loss_type: Literal["nll", "dft"] = "nll",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    mean_logit: Tensor | None = None,
    logsumexp: Tensor | None = None,
) -> Tensor:
    """Per-token SFT losses (the terms `sft_loss` sums), shaped and typed like ``token_logps``.

    ``nll = -log p(y)``; DFT multiplies it by the detached ``p(y)``; label smoothing mixes in
    ``logsumexp - mean_logit`` (the cross-entropy against the uniform distribution) with weight eps;
    z-loss adds ``z_loss * logsumexp**2``. No mask is applied: where the core ignored a token, its
    log-prob, ``mean_logit`` and ``logsumexp`` are 0 and so is the loss. Arguments as `sft_loss`;
    the outputs needed are `sft_outputs`.
    """
    check_sft_args(loss_type, label_smoothing, z_loss)
    missing = [name for name, value in (("mean_logit", mean_logit), ("logsumexp", logsumexp)) if value is None]
    if label_smoothing > 0 and missing:
        raise ValueError("label_smoothing > 0 needs the per-token `mean_logit` and `logsumexp`.")
    if z_loss > 0 and logsumexp is None:
        raise ValueError("z_loss > 0 needs the per-token `logsumexp`.")
    for name, value in (("mean_logit", mean_logit), ("logsumexp", logsumexp)):
        if value is not None:
            check_same_shape(("token_logps", token_logps), (name, value))
    nll = -token_logps
    per_token = nll * token_logps.detach().exp() if loss_type == "dft" else nll
    if label_smoothing > 0:
        uniform_ce = logsumexp - mean_logit
        per_token = (1 - label_smoothing) * per_token + label_smoothing * uniform_ce
    if z_loss > 0:
        per_token = per_token + z_loss * logsumexp.square()
    return per_token


def sft_loss(
    token_logps: Tensor,
    mask: Tensor,
    *,
    loss_type: Literal["nll", "dft"] = "nll",
    num_items_in_batch: int | Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    mean_logit: Tensor | None = None,
    logsumexp: Tensor | None = None,
) -> SFTOutput:
    """Token-level SFT loss, as TRL's SFTTrainer (``loss_type`` "nll" or "dft", ``label_smoothing_factor``).

    Per token (`sft_token_losses`): ``nll = -log p(y)``; DFT multiplies it by the detached ``p(y)``.
    Label smoothing mixes in the cross-entropy against the uniform distribution over the V classes,
    ``-(1/V) sum_v log p_v = logsumexp - mean_logit``, giving exactly ``F.cross_entropy(...,
    label_smoothing=eps)`` and transformers' ``LabelSmoother`` per token. z-loss adds
    ``z_loss * logsumexp**2``. The per-token losses are summed and divided by the number of
    masked tokens, or by ``num_items_in_batch`` when given (the token count of the whole
    accumulated batch, which makes gradient accumulation exact); the divisor is clamped to 1.

    Args:
        token_logps: ``[...]`` float per-token log-probs of the labels.
        mask: ``[...]`` same shape; tokens where it is nonzero count.
        loss_type: "nll" or "dft".
        num_items_in_batch: optional divisor (int or ``[]`` tensor).
        label_smoothing: eps in ``[0, 1]``; needs ``mean_logit`` and ``logsumexp``. Not defined for DFT.
        z_loss: coefficient of ``logsumexp**2``; needs ``logsumexp``.
        mean_logit: ``[...]`` float mean over the vocabulary of each token's logits.
        logsumexp: ``[...]`` float logsumexp of each token's logits.

    Returns:
        `SFTOutput`: ``loss`` and ``nll_loss`` scalars in the dtype of ``token_logps``; ``num_items``
        a ``[]`` tensor (int64 for the token count or an int ``num_items_in_batch``; a tensor
        ``num_items_in_batch`` keeps its dtype).
    """
    check_same_shape(("token_logps", token_logps), ("mask", mask))
    per_token = sft_token_losses(
        token_logps, loss_type=loss_type, label_smoothing=label_smoothing, z_loss=z_loss,
        mean_logit=mean_logit, logsumexp=logsumexp,
    )
    keep = mask != 0
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    num_items = torch.as_tensor(count, device=token_logps.device).clamp(min=1)
    return SFTOutput(
        loss=torch.where(keep, per_token, 0).sum() / num_items,
        nll_loss=torch.where(keep, -token_logps, 0).sum().detach() / num_items,
        num_items=num_items,
    )


def chosen_nll(
    nll_loss: Tensor | None, chosen_token_logps: Tensor | None, chosen_token_mask: Tensor | None, *, needed_by: str
) -> Tensor:
    """The NLL term of ORPO/CPO: ``nll_loss`` as given, or the token mean of ``-chosen_token_logps``.

    Exactly one of ``nll_loss`` (``[]``) and ``chosen_token_logps`` (``[B, T]``, with
    ``chosen_token_mask``) must be given; passing a precomputed NLL lets a caller reuse one it
    already has (e.g. from a fused head) or normalise it differently.
    """
    if (nll_loss is None) == (chosen_token_logps is None):
        raise ValueError(
            f"{needed_by} needs exactly one of `nll_loss` or `chosen_token_logps` (with `chosen_token_mask`)."
        )
    if nll_loss is not None:
        return nll_loss
    if chosen_token_mask is None:
        raise ValueError(f"{needed_by}: `chosen_token_logps` needs `chosen_token_mask`.")
    return sft_loss(chosen_token_logps, chosen_token_mask).loss
