"""What `FusedGRPOTrainer` and `FusedRLOOTrainer` share: our fused head in place of TRL's on every
log-prob pass of an RL step, and the checks before TRL's ``__init__``.

TRL 1.16's GRPO and RLOO trainers compute every per-token log-prob through one method,
``_get_per_token_logps_and_entropies``, which calls ``model(..., labels=labels, fused_lm_head=True)``
(prompt and padding labels -100) and reads ``outputs.log_probs`` and ``outputs.entropy``. It runs for

* the policy pass of the loss (with gradient, ``compute_entropy=True``: the ``entropy`` metric,
  ``top_entropy_quantile``'s mask and the entropy bonus read it),
* the old-policy pass (``num_iterations > 1``, or generation and optimisation steps misaligned;
  every step for RLOO) and the reference pass (``beta > 0``: ``ref_model``, or the policy with its
  adapter disabled under PEFT), both under ``torch.no_grad()``.

`install_fused_head` puts our forward over the one TRL patched in (`trainers.fused_forward`), so all
three go through `align_losses.linear_token_stats`; calls without ``fused_lm_head`` (generation)
still reach the model's own forward. TRL's loss code then works on ``[B, C]`` per-token tensors
only, unchanged. Before each call the head's settings are set for it (`_set_call_settings`): the
trainer's current ``temperature`` (TRL divides the logits by the sampling temperature) and the
entropy only where TRL asks for it (the no-gradient passes skip it). Under ``torch.no_grad()`` the
core keeps nothing for a backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from .fused_forward import FusedHeadSettings, fused_settings, install_fused_head, unwrap_transformers_model
from ._common import FusedTrainerMixin, check_before_init, lm_head_adapter_allowed

#: Column sets a GRPO/RLOO dataset may have (TRL reads ``prompt``; the rest goes to the reward functions).
PROMPT_COLUMNS = (("prompt",),)


def check_rl_args(trainer: str, args, model, peft_config=None) -> None:
    """Fail before TRL's ``__init__`` on RL settings the fused head cannot honour, with the reason.

    * ``lce_filter_mass`` with an entropy bonus (``entropy_coef != 0`` or ``use_adaptive_entropy``): the
      bonus takes a gradient of the entropy, which the filtering backward does not compute.
    * ``beta > 0`` with a model instance whose ``config._name_or_path`` is empty, neither a PEFT model nor given a
      ``peft_config``: TRL builds the reference model by loading that path, which would fail later with a less
      clear message.
    """
    if args is None:
        return
    entropy_bonus = float(getattr(args, "entropy_coef", 0.0) or 0.0) != 0.0 or bool(getattr(args, "use_adaptive_entropy", False))
    if getattr(args, "lce_filter_mass", None) is not None and entropy_bonus:
        raise ValueError(
            f"{trainer}: `lce_filter_mass` cannot be combined with an entropy bonus (`entropy_coef` != 0 or "
            "`use_adaptive_entropy=True`): the bonus takes a gradient of the entropy, which the filtering backward "
            "does not compute. Use one of the two."
        )
    if float(getattr(args, "beta", 0.0) or 0.0) != 0.0 and peft_config is None and model is not None and not isinstance(model, str):
        is_peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
        if not is_peft and not getattr(model.config, "_name_or_path", ""):
            raise ValueError(
                f"{trainer}: `beta={args.beta}` needs a reference model, which TRL loads from the policy's "
                "`config._name_or_path`; this model instance has none (built from a config?). Save it with "
                "`save_pretrained` and pass the path (or set `config._name_or_path`), use a PEFT adapter, or set `beta=0.0`."
            )


class FusedRLMixin(FusedTrainerMixin):
    """Our fused head on the policy and reference model of a TRL RL trainer (see the module docstring).

    Put it before the TRL trainer among the bases. The subclass calls `_install_fused_heads` right after
    TRL's ``__init__`` (TRL's own head is installed by then; ours goes over it).
    """

    _fused_outputs: tuple = ("entropy",)

    def _init_around_trl(self, trl_init: Callable, model, args, train_dataset, eval_dataset, peft_config, **kwargs):
        """Our checks, TRL's ``__init__`` (``trl_init``, with a LoRA adapter on ``lm_head`` allowed), our heads."""
        name = type(self).__name__
        check_before_init(name, args, (model,), PROMPT_COLUMNS, train_dataset, eval_dataset, decoder_only=True)
        check_rl_args(name, args, model, peft_config)
        with lm_head_adapter_allowed(model, peft_config):
            trl_init(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
                     **kwargs)
        self._install_fused_heads()

    def _head_settings(self, outputs: Sequence[str], trained: bool = True) -> FusedHeadSettings:
        """`FusedTrainerMixin`'s settings with the sampling temperature and TRL's ``cast_lm_head_to_fp32``."""
        settings = super()._head_settings(outputs, trained)
        return dataclasses.replace(
            settings,
            temperature=float(self.temperature),
            fp32_head=bool(getattr(self.args, "cast_lm_head_to_fp32", False)),
        )

    def _set_call_settings(self, model, compute_entropy: bool) -> None:
        """Before one of TRL's fused calls on ``model``: the current temperature, and the entropy only if asked."""
        inner = unwrap_transformers_model(self.accelerator.unwrap_model(model))
        current: Optional[FusedHeadSettings] = fused_settings(inner)
        if current is None:
            raise RuntimeError(
                f"{type(self).__name__}: the fused head is not installed on {type(inner).__name__}; "
                "`_install_fused_heads` must run after TRL's __init__ (and on any model swapped in since)."
            )
        wanted = dataclasses.replace(
            current, temperature=float(self.temperature), outputs=("entropy",) if compute_entropy else ()
        )
        if wanted != current:
            install_fused_head(inner, wanted)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy: bool = False, *args: Any, **kwargs: Any):
        """TRL's method (batching, multimodal inputs, labels), with our head's settings set for the call.

        ``input_ids``/``attention_mask`` ``[B, T]``; returns TRL's ``(logps [B, C], entropies [B, C] or None,
        aux_loss or None)`` with ``C = logits_to_keep``.
        """
        self._set_call_settings(model, compute_entropy)
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs
        )
