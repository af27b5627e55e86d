"""`FusedRLOOTrainer`: TRL's `RLOOTrainer` whose per-token log-probs and entropies come from our fused head.

The policy pass (with gradient), the old-policy pass and the reference pass (``beta > 0``, the default
0.05; both without gradient) run through `align_losses.linear_token_stats` instead of TRL's chunked
head (see `trainers._rl`); generation, rewards, the leave-one-out baseline, the sequence-level
clipped loss, the KL-in-reward and the vLLM paths stay TRL's. The logits are divided by the sampling
``temperature`` (read on every call), as in TRL. Metrics keep TRL's names.

    from trainers import FusedRLOOConfig, FusedRLOOTrainer
"""

from __future__ import annotations

from dataclasses import dataclass

import trl

from ._rl import FusedRLMixin
from .configs import LCEOptionsMixin


@dataclass
class FusedRLOOConfig(LCEOptionsMixin, trl.RLOOConfig):
    """`trl.RLOOConfig` plus the fused head's options (`LCEOptionsMixin`: ``lce_impl``, ``lce_memory_budget``,
    ``lce_token_chunk``, ``lce_filter_mass``)."""


class FusedRLOOTrainer(FusedRLMixin, trl.RLOOTrainer):
    """`trl.RLOOTrainer` with our fused head on every log-prob pass (see the module docstring).

    Takes the arguments of `trl.RLOOTrainer`; ``args`` may be a `FusedRLOOConfig` or a plain `trl.RLOOConfig`.
    A LoRA adapter on ``lm_head``, which TRL refuses, is trained.
    """

    _tag_names = ["trl", "rloo", "align-losses"]

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None):
        self._init_around_trl(
            super().__init__, model, args, train_dataset, eval_dataset, peft_config, reward_funcs=reward_funcs,
            processing_class=processing_class, reward_processing_classes=reward_processing_classes, callbacks=callbacks,
            optimizers=optimizers, quantization_config=quantization_config,
        )
