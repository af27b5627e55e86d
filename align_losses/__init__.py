"""align-losses: alignment losses on a fused linear + cross-entropy core that never builds logits.

Read in this order: `problem` (the call a backend receives), `core` (per-token log-probs and
statistics of a linear head: the checks, then one backend call), `backends` (the implementations
behind ``impl=``, and the one check of a call against them), `ops` (their autograd functions and
kernels), `losses` (DPO, ORPO, CPO, SimPO, KTO and SFT on per-sequence log-probs) and `fused` (from
per-token log-probs, or from hidden states, to a loss: the path the trainers share).
"""

from .core import TokenStats, linear_logprobs, linear_token_stats
from .losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    KTO_LOSS_TYPES,
    SFT_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    ld_sequence_logps,
    orpo_loss,
    sequence_logps,
    sft_loss,
    simpo_loss,
    wpo_weights,
)
from .fused import (
    FusedCPOLoss,
    FusedDPOLoss,
    FusedKTOLoss,
    FusedORPOLoss,
    FusedOutput,
    FusedSFTLoss,
    FusedSimPOLoss,
    fused_sequence_logps,
)
from .modules import LinearCrossEntropyLoss
from .ops.library import MAX_LABELLED, no_host_sync

__all__ = [
    "FusedCPOLoss",
    "FusedDPOLoss",
    "FusedKTOLoss",
    "FusedORPOLoss",
    "FusedOutput",
    "FusedSFTLoss",
    "FusedSimPOLoss",
    "LinearCrossEntropyLoss",
    "MAX_LABELLED",
    "fused_sequence_logps",
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "SFT_LOSS_TYPES",
    "TokenStats",
    "cpo_loss",
    "dpo_loss",
    "kto_loss",
    "ld_sequence_logps",
    "linear_logprobs",
    "linear_token_stats",
    "no_host_sync",
    "orpo_loss",
    "sequence_logps",
    "sft_loss",
    "simpo_loss",
    "wpo_weights",
]
