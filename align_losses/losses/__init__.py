"""Alignment losses on per-sequence (and, where needed, per-token) log-probs, with TRL 1.16 semantics.

These functions never see logits: the fused core produces the per-token log-probs (and, on request,
``logsumexp``, ``mean_logit``, ``log_sum_p2``) and `sequence_logps` / `ld_sequence_logps` reduce them.
"""

from .common import PreferenceOutput
from .cpo import CPO_LOSS_TYPES, CPOOutput, alphapo_reward, cpo_loss, simpo_loss
from .dpo import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCE_TYPES, dpo_loss, f_divergence_scores
from .kto import KTO_LOSS_TYPES, KTOOutput, kto_loss
from .orpo import ORPOOutput, orpo_loss
from .sequence import ld_sequence_logps, sequence_logps, wpo_weights
from .sft import SFT_LOSS_TYPES, SFTOutput, sft_loss

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "SFT_LOSS_TYPES",
    "CPOOutput",
    "KTOOutput",
    "ORPOOutput",
    "PreferenceOutput",
    "SFTOutput",
    "alphapo_reward",
    "cpo_loss",
    "dpo_loss",
    "f_divergence_scores",
    "kto_loss",
    "ld_sequence_logps",
    "orpo_loss",
    "sequence_logps",
    "sft_loss",
    "simpo_loss",
    "wpo_weights",
]
