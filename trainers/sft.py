"""`FusedSFTTrainer`: TRL's `SFTTrainer` with the loss and metrics from one fused pass of `align_losses`.

Changes against `trl.SFTTrainer` (data preparation, packing, padding-free collation, completion-only
and assistant-only masks stay TRL's): the forward runs through `trainers.fused_forward`; its per-token
outputs become an `align_losses.fused.TokenBatch` and the loss is `align_losses.fused.sft_from_tokens`
(`align_losses.losses.sft_loss`, ``nll`` or ``dft``, as in `align_losses.FusedSFTLoss`) in overridable
steps (`_sft_forward`, `_sft_loss`, `_log_metrics`); ``label_smoothing_factor`` is computed by the fused head (``logsumexp - mean
logit`` per token, no extra full-logits forward as in TRL 1.16); an optional z-loss
(`FusedSFTConfig.lce_z_loss`); a LoRA adapter on ``lm_head`` is trained; bad input fails before
TRL's ``__init__``. A user ``compute_loss_func`` and DeepSpeed sequence parallelism keep TRL's paths.

Metrics, under TRL's names: ``entropy``, ``mean_token_accuracy``, ``num_tokens`` (and ``aux_loss``).
"""

from __future__ import annotations

import warnings

import torch
import trl
from packaging.version import Version

from align_losses.fused import SFT_METRIC_OUTPUTS, SequenceLayout, TokenBatch, sft_from_tokens
from align_losses.losses import sft_outputs

from ._common import (
    FusedTrainerMixin,
    check_before_init,
    check_prepared_datasets,
    head_fields,
    lm_head_adapter_allowed,
    outputs_with_logits,
    token_batch,
)


def _sft_columns(args):
    text = getattr(args, "dataset_text_field", "text") if args is not None else "text"
    return ((text,), ("messages",), ("conversations",), ("prompt", "completion"), ("input_ids",))


class FusedSFTTrainer(FusedTrainerMixin, trl.SFTTrainer):
    """`trl.SFTTrainer` whose loss and metrics come from one fused pass (see the module docstring).

    Takes the same arguments as `trl.SFTTrainer`; ``args`` may be a `FusedSFTConfig` or a plain `trl.SFTConfig`.
    """

    _tag_names = ["trl", "sft", "align-losses"]

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_loss_func=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 quantization_config=None, peft_config=None, formatting_func=None):
        skip_prepare = args is not None and (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset")
        columns = _sft_columns(args) if formatting_func is None and not skip_prepare else None
        check_before_init(type(self).__name__, args, (model,), columns, train_dataset, eval_dataset)
        if (getattr(args, "lce_filter_mass", None) is not None and getattr(args, "loss_type", "nll") == "nll"
                and float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0):
            raise ValueError(
                "`lce_filter_mass` cannot be combined with `label_smoothing_factor`: label smoothing takes a gradient "
                "of the mean logit, which spreads over the whole vocabulary and is not what the filtering backward "
                "may skip. Use one of the two.")
        with lm_head_adapter_allowed(model, peft_config), warnings.catch_warnings():
            # TRL warns that label smoothing costs an extra full-logits forward; here it does not.
            warnings.filterwarnings("ignore", message=".*label_smoothing_factor.*")
            super().__init__(
                model, args=args, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=processing_class, compute_loss_func=compute_loss_func,
                compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics, quantization_config=quantization_config,
                peft_config=peft_config, formatting_func=formatting_func,
            )
        check_prepared_datasets(self)
        self._fused_outputs = head_fields(SFT_METRIC_OUTPUTS + sft_outputs(self._label_smoothing, self._z_loss))
        self._install_fused_heads()

    @property
    def _label_smoothing(self) -> float:
        """Label smoothing of the NLL loss (TRL applies ``label_smoothing_factor`` to ``nll`` only)."""
        return float(self.args.label_smoothing_factor) if self.args.loss_type == "nll" else 0.0

    @property
    def _z_loss(self) -> float:
        return float(getattr(self.args, "lce_z_loss", 0.0) or 0.0)

    def _uses_trl_path(self) -> bool:
        """A user `compute_loss_func` or DeepSpeed sequence parallelism: TRL's own loss path."""
        if self.compute_loss_func is not None:
            return True
        import accelerate

        if Version(accelerate.__version__) < Version("1.12.0"):
            return False
        pc = self.accelerator.parallelism_config
        return pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled and self.model.training

    # ------------------------------------------------------------------------------------------------ steps
    def _sft_forward(self, model, inputs):
        """The fused forward of a batch (labels included): per-token log-probs and statistics."""
        return model(**inputs, fused_lm_head=True)

    @staticmethod
    def _token_batch(outputs) -> TokenBatch:
        """The fused forward's per-token values over its labelled tokens (one row per batch row)."""
        return token_batch(outputs, SequenceLayout.of(outputs.label_mask), outputs.label_mask)

    def _sft_loss(self, tokens: TokenBatch, num_items_in_batch):
        """`align_losses.fused.sft_from_tokens` on the fused outputs, with label smoothing and z-loss."""
        return sft_from_tokens(
            tokens,
            loss_type=self.args.loss_type,
            num_items_in_batch=num_items_in_batch,
            label_smoothing=self._label_smoothing,
            z_loss=self._z_loss,
        ).loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._uses_trl_path():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = self._sft_forward(model, inputs)
        tokens = self._token_batch(outputs)
        loss = self._sft_loss(tokens, num_items_in_batch)
        # As `Trainer.compute_loss`: `num_items_in_batch` counts every rank's tokens and DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            # A per-micro-batch mean; with `num_items_in_batch` the accumulation is left to the loss
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._log_metrics(mode, inputs, outputs, tokens)
        if return_outputs:
            return loss, outputs_with_logits(model, inputs, drop=("labels", "output_router_logits"))
        return loss

    # ------------------------------------------------------------------------------------------------ metrics
    def _log_metrics(self, mode, inputs, outputs, tokens: TokenBatch) -> None:
        acc = self.accelerator
        metrics = self._metrics[mode]
        valid = acc.gather_for_metrics(tokens.mask.sum()).sum()
        entropy_sum = acc.gather_for_metrics(tokens.entropy.detach().sum()).sum()
        correct = acc.gather_for_metrics(tokens.argmax_hit.sum()).sum()
        metrics["entropy"].append((entropy_sum / valid).item() if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                count = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                count = acc.gather_for_metrics(local).sum().item()
            else:
                raise ValueError("expected 'attention_mask' or 'position_ids' in the batch")
            self._total_train_tokens += count // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(acc.gather_for_metrics(outputs.aux_loss).mean().item())
