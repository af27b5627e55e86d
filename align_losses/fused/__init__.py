"""Fused losses: from per-token log-probs, or from the final hidden states, to an alignment loss and TRL's metrics.

Two entry points share every step after the head:

* the ``Fused*Loss`` modules start from hidden states: `head_pass` runs the core once
  (`align_losses.linear_token_stats`, never ``[tokens, V]`` logits), asking only for the per-token
  outputs that the loss and, with ``compute_metrics=True``, its metrics need;
* the trainers (`trainers.FusedDPOTrainer`, ...) start from their model's fused forward, which runs
  the same core inside the model (under its FSDP / ZeRO hooks), and build the same `TokenBatch`
  with `TokenBatch.of`.

From there: `SequenceLayout` (padded rows, or packed with ``cu_seqlens``) -> `TokenBatch` (``[N, L]``
per sequence, the core's names) -> `split_pairs` (chosen rows first, then rejected) -> the family's
"per-token log-probs -> loss" function -> the functional loss of `align_losses.losses`.

=================  ====================  ===================  ====================================  ============================
loss               from per-token        functional loss      core outputs for the loss             ... for the metrics
=================  ====================  ===================  ====================================  ============================
`FusedDPOLoss`     `dpo_from_tokens`     `dpo_loss`           log_sum_p2 (``use_weighting``)        entropy, mean_logit, argmax_hit
`FusedORPOLoss`    `orpo_from_tokens`    `orpo_loss`          -                                     mean_logit
`FusedCPOLoss`     `cpo_from_tokens`     `cpo_loss`           -                                     mean_logit
`FusedSimPOLoss`   `cpo_from_tokens`     `cpo_loss` (simpo)   -                                     mean_logit
`FusedKTOLoss`     `kto_from_tokens`     `kto_loss`           -                                     entropy, mean_logit
`FusedSFTLoss`     `sft_from_tokens`     `sft_loss`           `sft_outputs`: logsumexp (smoothing   entropy, argmax_hit
                                                              or z-loss); +mean_logit (smoothing)
=================  ====================  ===================  ====================================  ============================

Batch layouts (all losses): padded ``hidden [N, T, D]``, ``labels [N, T]`` (the input ids, with
``ignore_index`` on prompt and padding; shifted by the core unless ``shift=False``), or packed
``hidden [1, T_total, D]``, ``labels [1, T_total]`` with ``cu_seqlens [N + 1]`` (int, sequence
boundaries, ``cu_seqlens[-1] == T_total``). Paired losses take ``N = 2B``: the B chosen sequences
first, then the B rejected ones.
"""

from __future__ import annotations

from .common import FusedLoss, FusedOutput, PairLoss
from .dpo import DPO_METRIC_OUTPUTS, FusedDPOLoss, dpo_from_tokens, dpo_loss_outputs
from .kto import KTO_METRIC_OUTPUTS, FusedKTOLoss, KTOLoss, kto_from_tokens
from .layout import SequenceLayout, cu_seqlens_of
from .paired import (
    PAIRED_METRIC_OUTPUTS,
    FusedCPOLoss,
    FusedORPOLoss,
    FusedSimPOLoss,
    cpo_from_tokens,
    orpo_from_tokens,
)
from .sft import SFT_METRIC_OUTPUTS, FusedSFTLoss, sft_from_tokens
from .tokens import HeadOptions, TokenBatch, fused_sequence_logps, head_pass, pair_sequence_logps, split_pairs

__all__ = [
    "DPO_METRIC_OUTPUTS",
    "KTO_METRIC_OUTPUTS",
    "PAIRED_METRIC_OUTPUTS",
    "SFT_METRIC_OUTPUTS",
    "FusedCPOLoss",
    "FusedDPOLoss",
    "FusedKTOLoss",
    "FusedLoss",
    "FusedORPOLoss",
    "FusedOutput",
    "FusedSFTLoss",
    "FusedSimPOLoss",
    "HeadOptions",
    "KTOLoss",
    "PairLoss",
    "SequenceLayout",
    "TokenBatch",
    "cpo_from_tokens",
    "cu_seqlens_of",
    "dpo_from_tokens",
    "dpo_loss_outputs",
    "fused_sequence_logps",
    "head_pass",
    "kto_from_tokens",
    "orpo_from_tokens",
    "pair_sequence_logps",
    "sft_from_tokens",
    "split_pairs",
]
