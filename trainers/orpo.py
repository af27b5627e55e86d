"""`FusedORPOTrainer`: TRL's experimental `ORPOTrainer` on one fused pass of `align_losses`, without logits.

TRL 1.16's ORPO (and CPO) trainers call ``model(...).logits`` and work on the full ``[2B, T, V]``
logits: per-token log-probs, a cross-entropy NLL and the ``logits/*`` metrics. Here the policy forward
goes through the model's own ``forward``, patched by `trainers.fused_forward` after TRL's
``__init__``; called with ``fused_lm_head=True`` it runs the backbone and hands the hidden states
and the LM head's parameters to the core (`align_losses.linear_token_stats`), which returns per-token
log-probs of the labelled tokens only, tiled over the vocabulary. Nothing of size ``tokens x vocab``
is ever built, so the memory of a step is flat in the vocabulary and grows with the sequence only
as the backbone does.

What changes against `trl.experimental.orpo.ORPOTrainer` (tokenisation, collation, PEFT, logging,
evaluation are TRL's):

* `fused_paired_pass` replaces the full-logits forward. Its labels are, per row of the concatenated
  batch (chosen rows first): for the chosen rows every attended token (TRL's ORPO NLL covers the
  prompt AND the completion), for the rejected rows the completion tokens (all the odds ratio needs).
  One fused call gives both the NLL term and the per-completion average log-probs.
* The loss is `align_losses.losses.orpo_loss` (NLL token mean minus ``beta * mean log sigmoid(log odds)``).
* ``concatenated_forward`` returns TRL's tuple, except that the two "logits" slots hold the
  ``[B, T - 1]`` vocabulary-mean logits (whose ``.mean()`` is TRL's ``.mean()`` of the
  ``[B, T - 1, V]`` logits) instead of the logits.
* An empty completion (prompt alone fills ``max_length``) gets an average log-prob of 0, not TRL's NaN.
* Encoder-decoder models are refused (the fused head is for causal LMs).

Metrics, under TRL's names and from the same fused pass: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/rejected``, ``logps/chosen``,
``logits/rejected``, ``logits/chosen``, ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``
(``eval_``-prefixed in evaluation). ``logits/chosen``/``logits/rejected`` are, as in TRL, the mean of
the logits over every element of ``[B, T - 1, V]`` (all positions but the last, prompt and padding
included, the whole vocabulary). They come from the identity
``mean_v(h . W_v + b_v) = h . mean_v(W) + mean_v(b)`` at no projection cost. With a final soft-cap
(Gemma-2), the averaged quantity is still what TRL averages, the soft-capped logits
``c * tanh(a / c)``: the identity does not hold through the ``tanh``, so the labelled positions take
the exact vocabulary mean from the main pass and the other positions are run once more through the
core, without gradient, asking only for the mean logit (tiled, no ``[tokens, V]`` buffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from align_losses.losses import orpo_loss, sequence_logps

from ._common import FusedTrainerMixin, check_columns, check_impl_name, check_model
from .configs import _check_lce_numbers, _impl_field, _memory_budget_field, _token_chunk_field
from .fused_forward import fused_settings, install_fused_head, unwrap_transformers_model

#: Datasets TRL's ORPO/CPO tokenisation accepts (the prompt may be implicit, as the common prefix).
PAIRED_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


@dataclass
class FusedORPOConfig(ORPOConfig):
    """`trl.experimental.orpo.ORPOConfig` plus the fused head's options.

    Parameters beyond `ORPOConfig` (as `trainers.configs.FusedDPOConfig`):
        lce_impl (`str`, defaults to `"auto"`): backend of the fused head.
        lce_memory_budget (`int`, *optional*): bytes of tile temporaries of the `"torch"` backend.
        lce_token_chunk (`int`, *optional*): tokens per tile of the `"torch"` backend.
    """

    lce_impl: str = _impl_field()
    lce_memory_budget: Optional[int] = _memory_budget_field()
    lce_token_chunk: Optional[int] = _token_chunk_field()

    def __post_init__(self):
        super().__post_init__()
        _check_lce_numbers(self)


# ---------------------------------------------------------------------------------------------------------------------
# The fused forward over a concatenated chosen + rejected batch (shared with CPO / SimPO)


@dataclass
class PairedPass:
    """One fused forward over the concatenated batch ``[chosen rows; rejected rows]`` (``2B`` rows, width ``T``).

    Attributes:
        outputs: the raw `trainers.fused_forward.FusedHeadOutput` (``aux_loss`` for MoE).
        token_logps: ``[2B, T - 1]`` next-token log-probs, with gradient, 0 where not labelled.
        completion_mask: ``[2B, T - 1]`` bool, the completion tokens (TRL's ``concatenated_labels``, shifted).
        nll_mask: ``[B, T - 1]`` bool, the chosen tokens of the NLL term.
        mean_logits_all: ``[2B, T]`` detached mean logit over the vocabulary at every input position.
        batch_size: ``B``.
    """

    outputs: Any
    token_logps: torch.Tensor
    completion_mask: torch.Tensor
    nll_mask: torch.Tensor
    mean_logits_all: torch.Tensor
    batch_size: int

    def halves(self, x: torch.Tensor):
        """``(chosen rows, rejected rows)`` of a ``[2B, ...]`` tensor."""
        return x[: self.batch_size], x[self.batch_size :]


def fused_paired_pass(trainer, model, batch, *, padding_value: int, nll_over: Literal["sequence", "completion"]) -> PairedPass:
    """The policy's fused forward on a TRL ORPO/CPO batch (``chosen_*``/``rejected_*`` keys).

    ``nll_over="sequence"`` labels every attended token of the chosen rows (ORPO's NLL: prompt and
    completion); ``"completion"`` labels only completion tokens (CPO's NLL). Rejected rows always
    carry their completion labels only.
    """
    if trainer.is_encoder_decoder:
        raise ValueError(
            f"{type(trainer).__name__} supports decoder-only models only: the fused head has no encoder-decoder path."
        )
    cat = trainer.concatenated_inputs(
        batch, is_encoder_decoder=False, padding_value=padding_value, device=trainer.accelerator.device
    )
    num = batch["chosen_labels"].shape[0]
    input_ids = cat["concatenated_input_ids"]
    attention_mask = cat["concatenated_attention_mask"]
    completion_labels = cat["concatenated_labels"]
    if nll_over == "sequence":
        chosen_labels = input_ids[:num].masked_fill(attention_mask[:num] != 1, -100)
        labels = torch.cat([chosen_labels, completion_labels[num:]], dim=0)
    elif nll_over == "completion":
        labels = completion_labels
    else:
        raise ValueError(f"nll_over must be 'sequence' or 'completion'; got {nll_over!r}")
    kwargs = {"output_router_logits": True} if trainer.aux_loss_enabled else {}
    settings = fused_settings(unwrap_transformers_model(trainer.accelerator.unwrap_model(trainer.model)))
    # With a soft-cap, `mean_logits_all` takes the labelled positions' exact mean from the main pass, which must
    # then compute it (without it those positions would read 0); without one it is the free linear identity.
    fields = ("mean_logits",) if settings is not None and settings.quirks.softcap is not None else ()
    outputs = model(
        input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        labels=labels,
        fused_lm_head=True,
        fused_outputs=fields,
        mean_logits_all=True,
        **kwargs,
    )
    width = input_ids.shape[1]
    # Prompt-learning PEFT prepends virtual tokens: keep the real positions.
    token_logps = outputs.log_probs[:, -(width - 1) :]
    mean_all = outputs.mean_logits_all[:, -width:]
    shifted = labels[:, 1:] != -100
    return PairedPass(
        outputs=outputs,
        token_logps=token_logps,
        completion_mask=completion_labels[:, 1:] != -100,
        nll_mask=shifted[:num],
        mean_logits_all=mean_all,
        batch_size=num,
    )


class _PairedFusedMixin(FusedTrainerMixin):
    """What the ORPO and CPO trainers share on top of `FusedTrainerMixin`."""

    _fused_outputs: tuple = ()

    def call_model_init(self, trial=None):
        # With `model_init`, Trainer builds a fresh model at `train()`: give it the fused head too.
        model = super().call_model_init(trial)
        inner = unwrap_transformers_model(model)
        if fused_settings(inner) is None:
            install_fused_head(inner, self._head_settings(self._fused_outputs))
        return model

    def _metric(self, value: torch.Tensor) -> float:
        """TRL's ``gather_for_metrics(x).mean().item()``."""
        return self.accelerator.gather_for_metrics(value.detach()).mean().item()


def _check_before_init(trainer_name: str, model, args, train_dataset, eval_dataset) -> None:
    if args is not None:
        check_impl_name(args)
    check_model(model)
    if model is not None and not isinstance(model, str) and getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{trainer_name} supports decoder-only models only: the fused head has no encoder-decoder path.")
    check_columns(train_dataset, PAIRED_COLUMNS, trainer_name)
    check_columns(eval_dataset, PAIRED_COLUMNS, trainer_name, "eval")


# ---------------------------------------------------------------------------------------------------------------------
# ORPO


class FusedORPOTrainer(_PairedFusedMixin, ORPOTrainer):
    """`trl.experimental.orpo.ORPOTrainer` on the fused head (see the module docstring).

    Takes the same arguments as `ORPOTrainer`; ``args`` may be a `FusedORPOConfig` or a plain `ORPOConfig`.
    """

    _tag_names = ["trl", "orpo", "align-losses"]

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, compute_metrics=None):
        if args is None:
            args = FusedORPOConfig()
        _check_before_init(type(self).__name__, model, args, train_dataset, eval_dataset)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init, callbacks=callbacks,
            optimizers=optimizers, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config, compute_metrics=compute_metrics,
        )
        self._install_fused_heads()

    def _fused_pass(self, model, batch) -> PairedPass:
        return fused_paired_pass(self, model, batch, padding_value=self.padding_value, nll_over="sequence")

    def _orpo(self, fused: PairedPass):
        """``(chosen average log-probs [B], rejected [B], ORPOOutput)`` of a fused pass."""
        average = sequence_logps(fused.token_logps, fused.completion_mask, average=True)
        chosen_logps, rejected_logps = fused.halves(average)
        chosen_tokens, _ = fused.halves(fused.token_logps)
        result = orpo_loss(
            chosen_logps, rejected_logps, beta=self.beta, chosen_token_logps=chosen_tokens,
            chosen_token_mask=fused.nll_mask,
        )
        return chosen_logps, rejected_logps, result

    def concatenated_forward(self, model, batch):
        """TRL's tuple ``(chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss[, aux_loss])``
        from the fused pass; the "logits" are the ``[B, T - 1]`` vocabulary-mean logits, not ``[B, T - 1, V]``."""
        fused = self._fused_pass(model, batch)
        chosen_logps, rejected_logps, result = self._orpo(fused)
        chosen_ml, rejected_ml = fused.halves(fused.mean_logits_all[:, :-1])
        out = (chosen_logps, rejected_logps, chosen_ml, rejected_ml, result.nll_loss)
        return out + (fused.outputs.aux_loss,) if self.aux_loss_enabled else out

    def get_batch_loss_metrics(self, model, batch, train_eval: Literal["train", "eval"] = "train"):
        """The ORPO loss and TRL's metrics of a batch, from one fused pass."""
        fused = self._fused_pass(model, batch)
        chosen_logps, rejected_logps, result = self._orpo(fused)
        chosen_ml, rejected_ml = fused.halves(fused.mean_logits_all[:, :-1])
        prefix = "eval_" if train_eval == "eval" else ""
        m = self._metric
        metrics = {
            f"{prefix}rewards/chosen": m(result.chosen_rewards),
            f"{prefix}rewards/rejected": m(result.rejected_rewards),
            f"{prefix}rewards/accuracies": m(result.reward_accuracies),
            f"{prefix}rewards/margins": m(result.reward_margins),
            f"{prefix}logps/rejected": m(rejected_logps),
            f"{prefix}logps/chosen": m(chosen_logps),
            # TRL: gather the per-rank mean of the [B, T-1, V] logits, then average.
            f"{prefix}logits/rejected": m(rejected_ml.mean()),
            f"{prefix}logits/chosen": m(chosen_ml.mean()),
            f"{prefix}nll_loss": m(result.nll_loss),
            f"{prefix}log_odds_ratio": m(result.log_odds_ratio.mean()),
            f"{prefix}log_odds_chosen": m(result.log_odds_chosen.mean()),
        }
        loss = result.loss
        if self.aux_loss_enabled:
            loss = loss + self.aux_loss_coef * fused.outputs.aux_loss
        return loss, metrics
