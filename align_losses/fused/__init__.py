"""Fused losses: from the final hidden states to an alignment loss and TRL's metrics in one call.

Each loss runs the core once (`align_losses.linear_token_stats`, never ``[tokens, V]`` logits),
asking only for the per-token outputs that the loss and, with ``compute_metrics=True``, its metrics
need, then reduces the per-token values per sequence and calls the functional loss of
`align_losses.losses`. The pieces are in `align_losses.fused.common`:

``head_pass`` (one core call, per-token values laid out ``[N, L]`` per sequence, padded or packed)
-> ``split_pairs`` (chosen rows first, then rejected) -> ``sequence_logps`` & co -> functional loss
-> metric helpers.

=================  ===================  ==========================================  ===============================
loss               functional loss      core outputs for the loss                   ... for the metrics
=================  ===================  ==========================================  ===============================
`FusedDPOLoss`     `dpo_loss`           log_sum_p2 (``use_weighting``)              entropy, mean_logit, argmax_hit
`FusedORPOLoss`    `orpo_loss`          -                                           mean_logit
`FusedCPOLoss`     `cpo_loss`           -                                           mean_logit
`FusedSimPOLoss`   `cpo_loss` (simpo)   -                                           mean_logit
`FusedKTOLoss`     `kto_loss`           -                                           entropy, mean_logit
`FusedSFTLoss`     `sft_loss`           logsumexp (smoothing or z-loss);            entropy, argmax_hit
                                        +mean_logit (smoothing)
=================  ===================  ==========================================  ===============================

Batch layouts (all losses): padded ``hidden [N, T, D]``, ``labels [N, T]`` (the input ids, with
``ignore_index`` on prompt and padding; shifted here unless ``shift=False``), or packed
``hidden [1, T_total, D]``, ``labels [1, T_total]`` with ``cu_seqlens [N + 1]`` (int, sequence
boundaries, ``cu_seqlens[-1] == T_total``). Paired losses take ``N = 2B``: the B chosen sequences
first, then the B rejected ones.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..losses import check_ld_alpha, ld_sequence_logps, sequence_logps
from .common import FusedLoss, FusedOutput, HeadOptions, TokenBatch, head_pass, pair_count, split_pairs
from .dpo import FusedDPOLoss
from .kto import FusedKTOLoss
from .paired import FusedCPOLoss, FusedORPOLoss, FusedSimPOLoss
from .sft import FusedSFTLoss


def fused_sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    average: bool = False,
    ld_alpha: Optional[float] = None,
    **head,
) -> Tensor:
    """Per-sequence log-probs from hidden states in one fused pass, e.g. for reference models or KTO's KL term.

    Args:
        hidden, weight, labels, bias, cu_seqlens: as the fused losses (padded ``[N, T, D]`` or packed).
        average: per-token mean instead of the sum (ORPO/SimPO style).
        ld_alpha: LD-DPO weighting of a paired batch (``N = 2B``, chosen first), as `FusedDPOLoss`.
        **head: `HeadOptions`.

    Returns:
        ``[N]`` float32, differentiable (wrap in ``torch.no_grad()`` for a reference).
    """
    if ld_alpha is not None:
        if average:
            raise ValueError("ld_alpha weights summed log-probs; it cannot be combined with average=True")
        check_ld_alpha(ld_alpha)
        pair_count(labels, cu_seqlens)
    tokens = head_pass(hidden, weight, labels, head=HeadOptions(**head), bias=bias, cu_seqlens=cu_seqlens)
    if ld_alpha is None:
        return sequence_logps(tokens.logps, tokens.completion, average=average)
    chosen, rejected = split_pairs(tokens)
    ld = ld_sequence_logps(chosen.logps, chosen.completion, rejected.logps, rejected.completion, ld_alpha=ld_alpha)
    return torch.cat(ld)


__all__ = [
    "FusedCPOLoss",
    "FusedDPOLoss",
    "FusedKTOLoss",
    "FusedLoss",
    "FusedORPOLoss",
    "FusedOutput",
    "FusedSFTLoss",
    "FusedSimPOLoss",
    "HeadOptions",
    "TokenBatch",
    "fused_sequence_logps",
    "head_pass",
    "split_pairs",
]
