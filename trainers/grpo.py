"""`FusedGRPOTrainer`: TRL's `GRPOTrainer` whose per-token log-probs and entropies come from our fused head.

Every log-prob pass of a GRPO step (the policy's, with gradient; the old policy's and the reference's,
without) runs through `align_losses.linear_token_stats` instead of TRL's chunked head (see
`trainers._rl`); TRL's generation, rewards, advantages, every ``loss_type`` and
``importance_sampling_level``, the KL term, ``top_entropy_quantile``, the entropy bonus,
``mask_truncated_completions`` and the vLLM paths stay TRL's. The logits are divided by the sampling
``temperature`` (read on every call), as in TRL. Metrics keep TRL's names.

    from trainers import FusedGRPOConfig, FusedGRPOTrainer

    trainer = FusedGRPOTrainer(model, reward_funcs=reward, args=FusedGRPOConfig(...), train_dataset=prompts)
"""

from __future__ import annotations

from dataclasses import dataclass

import trl

from ._rl import FusedRLMixin
from .configs import LCEOptionsMixin


@dataclass
class FusedGRPOConfig(LCEOptionsMixin, trl.GRPOConfig):
    """`trl.GRPOConfig` plus the fused head's options (`LCEOptionsMixin`: ``lce_impl``, ``lce_memory_budget``,
    ``lce_token_chunk``, ``lce_filter_mass``).

    ``lce_filter_mass`` cannot be combined with an entropy bonus (``entropy_coef != 0`` or
    ``use_adaptive_entropy``), whose gradient flows through the entropy.
    """


class FusedGRPOTrainer(FusedRLMixin, trl.GRPOTrainer):
    """`trl.GRPOTrainer` with our fused head on every log-prob pass (see the module docstring).

    Takes the arguments of `trl.GRPOTrainer`; ``args`` may be a `FusedGRPOConfig` or a plain `trl.GRPOConfig`.
    A LoRA adapter on ``lm_head``, which TRL refuses, is trained.
    """

    _tag_names = ["trl", "grpo", "align-losses"]

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        self._init_around_trl(
            super().__init__, model, args, train_dataset, eval_dataset, peft_config, reward_funcs=reward_funcs,
            processing_class=processing_class, reward_processing_classes=reward_processing_classes, callbacks=callbacks,
            optimizers=optimizers, quantization_config=quantization_config, tools=tools, rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
