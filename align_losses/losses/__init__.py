"""Alignment losses on per-sequence (and, where needed, per-token) log-probs, with TRL 1.16 semantics.

These functions never see logits: the fused core produces the per-token log-probs (and, on request,
``logsumexp``, ``mean_logit``, ``log_sum_p2``) and `sequence_logps` / `ld_sequence_logps` reduce them.
The ``check_*_args`` functions run a loss's configuration checks on their own, so that a caller
(e.g. a fused loss's constructor) can refuse a bad configuration before any forward pass.
"""

from .common import PreferenceOutput
from .cpo import AVERAGED_LOSS_TYPES, CPO_LOSS_TYPES, CPOOutput, alphapo_reward, check_cpo_args, cpo_loss, simpo_loss
from .dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    check_dpo_args,
    dpo_loss,
    f_divergence_scores,
)
from .kto import KTO_LOSS_TYPES, KTOOutput, check_kl_estimate, check_kto_args, check_kto_labels, kto_loss
from .orpo import ORPOOutput, check_orpo_args, orpo_loss
from .sequence import check_ld_alpha, ld_sequence_logps, sequence_logps, wpo_weights
from .sft import SFT_LOSS_TYPES, SFTOutput, check_sft_args, sft_loss, sft_outputs, sft_token_losses

__all__ = [
    "AVERAGED_LOSS_TYPES",
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
    "check_cpo_args",
    "check_dpo_args",
    "check_kl_estimate",
    "check_kto_args",
    "check_kto_labels",
    "check_ld_alpha",
    "check_orpo_args",
    "check_sft_args",
    "cpo_loss",
    "dpo_loss",
    "f_divergence_scores",
    "kto_loss",
    "ld_sequence_logps",
    "orpo_loss",
    "sequence_logps",
    "sft_loss",
    "sft_outputs",
    "sft_token_losses",
    "simpo_loss",
    "wpo_weights",
]
