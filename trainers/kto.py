"""`FusedKTOTrainer`: TRL's `KTOTrainer` with log-probs and metrics from one fused pass of `align_losses`.

Changes against `trl.KTOTrainer` (data preparation, KL completions, reference handling and logging
stay TRL's): every forward (policy, KL completions, reference) runs through
`trainers.fused_forward`; its per-token outputs become an `align_losses.fused.TokenBatch` and the loss
is `align_losses.fused.kto_from_tokens` (completion sums and `align_losses.losses.kto_loss`, as in
`align_losses.FusedKTOLoss`), in overridable steps
(`_policy_pass`, `_kl_logps`, `_reference_logps`, `_kto_loss`, `_log_metrics`); a LoRA adapter on
``lm_head`` is trained; bad input fails before TRL's ``__init__``; the reference forwards run before the
policy's (under FSDP the reference is gathered whole, and the policy's activations do not exist yet).

Metrics, under TRL's names: ``kl``, ``entropy``, ``num_tokens``, ``logits/chosen``,
``logits/rejected``, ``rewards/chosen``, ``logps/chosen``, ``rewards/rejected``, ``logps/rejected``,
``rewards/margins`` (and ``aux_loss`` for MoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import trl

from align_losses.fused import KTO_METRIC_OUTPUTS, KTOLoss, SequenceLayout, TokenBatch, kto_from_tokens
from align_losses.losses import sequence_logps

from ._common import ReferenceTrainerMixin, head_fields, outputs_with_logits, token_batch

_NON_MODEL_KEYS = frozenset({
    "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
    "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps",
})

UNPAIRED_COLUMNS = (
    ("prompt", "completion", "label"),
    ("chosen", "rejected"),  # paired data, unpaired by TRL
    ("prompt_ids", "completion_ids", "label"),
)


@dataclass
class KTOPolicyPass:
    """The policy's fused forward: ``outputs`` the raw fused output (``aux_loss`` for MoE), ``tokens`` its per-token
    values on the completions (``[B, T - 1]``, ``logprobs`` with gradient), and the model's inputs and labels."""

    outputs: Any
    tokens: TokenBatch
    model_kwargs: dict
    labels: torch.Tensor


class FusedKTOTrainer(ReferenceTrainerMixin, trl.KTOTrainer):
    """`trl.KTOTrainer` whose log-probs, loss and metrics come from one fused pass (see the module docstring).

    Takes the same arguments as `trl.KTOTrainer`; ``args`` may be a `FusedKTOConfig` or a plain `trl.KTOConfig`.
    """

    _tag_names = ["trl", "kto", "align-losses"]
    _fused_outputs = head_fields(KTO_METRIC_OUTPUTS)
    _dataset_columns = UNPAIRED_COLUMNS

    # ------------------------------------------------------------------------------------------------ forwards
    @staticmethod
    def _completion_tokens(out, completion_mask: torch.Tensor) -> TokenBatch:
        """The fused forward's per-token values on the completion tokens (``completion_mask [B, T]``), per example."""
        return token_batch(out, SequenceLayout.of(completion_mask), completion_mask[:, 1:])

    def _completion_logps(self, model, input_ids, attention_mask, completion_mask, extra=None) -> torch.Tensor:
        """``[B]`` summed log-probs of the completion tokens under ``model``, without extra statistics."""
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        kwargs = dict(extra or {})
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        out = model(**kwargs, labels=labels, fused_lm_head=True, fused_outputs=())
        tokens = self._completion_tokens(out, completion_mask)
        return sequence_logps(tokens.logprobs, tokens.completion)

    def _kl_logps(self, model, batch) -> Optional[torch.Tensor]:
        """``[B]`` log-probs of the mismatched (KL) completions under ``model``, without gradient."""
        if not self.calculate_KL:
            return None
        extra = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS and k not in ("input_ids", "attention_mask")}
        for key in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{key}" in batch:
                extra[key] = batch[f"KL_{key}"]
        with torch.no_grad():
            return self._completion_logps(
                model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"], extra
            )

    # TRL's name for the same step (its `_compute_loss` and precompute call it)
    def _compute_kl_logps(self, model, batch):
        return self._kl_logps(model, batch)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._install_fused_heads()  # TRL precomputes inside its __init__, before ours returns
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """Reference ``(completion [B], KL [B] or None)`` log-probs of one batch (precompute path)."""
        with self._precompute_context():
            logps = self._completion_logps(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            )
            kl = self._kl_logps(model, inputs)
        return logps, kl

    @staticmethod
    def _model_inputs(batch) -> tuple[dict, torch.Tensor]:
        """``(model kwargs, labels)``: the completion tokens labelled, the rest -100."""
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        return model_kwargs, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def _policy_pass(self, model, batch) -> KTOPolicyPass:
        model_kwargs, labels = self._model_inputs(batch)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        out = model(**model_kwargs, labels=labels, fused_lm_head=True)
        return KTOPolicyPass(
            outputs=out, tokens=self._completion_tokens(out, batch["completion_mask"]), model_kwargs=model_kwargs,
            labels=labels,
        )

    def _reference_logps(self, batch):
        """``(ref completion log-probs [B], ref KL log-probs [B] or None)``."""
        if self.precompute_ref_logps:
            return batch["ref_logps"], (batch["ref_KL_logps"] if self.calculate_KL else None)
        model_kwargs, labels = self._model_inputs(batch)
        with self._reference_model() as ref:
            ref_kl = self._kl_logps(ref, batch)
            out = ref(**model_kwargs, labels=labels, fused_lm_head=True, fused_outputs=())
        tokens = self._completion_tokens(out, batch["completion_mask"])
        return sequence_logps(tokens.logprobs, tokens.completion), ref_kl

    # ------------------------------------------------------------------------------------------------ loss
    def _kl_estimate(self, kl_logps, ref_kl_logps) -> Optional[torch.Tensor]:
        """The KL reference point: the global-batch mean of policy minus reference KL log-probs."""
        if not self.calculate_KL:
            return None
        kl = (kl_logps - ref_kl_logps).mean().detach()
        return self.accelerator.gather_for_metrics(kl).mean()

    def _kto_loss(self, tokens: TokenBatch, ref_logps, labels, kl) -> KTOLoss:
        """`align_losses.fused.kto_from_tokens` with this trainer's settings."""
        return kto_from_tokens(
            tokens,
            ref_logps,
            labels,
            kl if self.loss_type == "kto" else None,
            beta=self.beta,
            loss_type=self.loss_type,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        # The reference first: its forwards (under FSDP, a whole gathered model) then never meet the policy's activations
        ref_logps, ref_kl_logps = self._reference_logps(batch)
        kl_logps = self._kl_logps(model, batch)
        policy = self._policy_pass(model, batch)
        if policy.tokens.num_sequences != len(batch["label"]):
            raise ValueError("the batch has a different number of examples than of predicted sequences")
        device = policy.tokens.logprobs.device
        labels = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
        kl = self._kl_estimate(kl_logps, ref_kl_logps)
        logps, result = self._kto_loss(policy.tokens, ref_logps.to(device), labels, kl)
        loss = self._add_aux_loss(result.loss, policy.outputs, mode)
        self._log_metrics(mode, batch, policy, result, logps, labels, kl)
        if return_outputs:
            return loss, outputs_with_logits(model, policy.model_kwargs)
        return loss

    # ------------------------------------------------------------------------------------------------ metrics
    def _log_metrics(self, mode, batch, policy: KTOPolicyPass, result, logps, labels, kl) -> None:
        acc = self.accelerator
        metrics = self._metrics[mode]
        metrics["kl"].append(kl.clamp(min=0).item() if kl is not None else 0.0)

        tokens = policy.tokens
        self._log_entropy_and_tokens(mode, tokens.entropy, tokens.mask, batch["attention_mask"].sum())

        mean_logit = tokens.mean_logit.detach()
        for side, rows in (("chosen", labels), ("rejected", ~labels)):
            side_mask = tokens.mask[rows]
            total = acc.gather_for_metrics(mean_logit[rows][side_mask].sum()).sum().item()
            count = acc.gather_for_metrics(side_mask.sum()).sum().item()
            if count > 0:
                metrics[f"logits/{side}"].append(total / count)

        num_chosen = acc.gather_for_metrics(labels.sum()).sum().item()
        num_rejected = acc.gather_for_metrics((~labels).sum()).sum().item()
        detached = logps.detach()
        if num_chosen > 0:
            metrics["rewards/chosen"].append(acc.gather_for_metrics(result.chosen_rewards.nansum()).nansum().item() / num_chosen)
            metrics["logps/chosen"].append(acc.gather_for_metrics(detached[labels].nansum()).nansum().item() / num_chosen)
        if num_rejected > 0:
            metrics["rewards/rejected"].append(acc.gather_for_metrics(result.rejected_rewards.nansum()).nansum().item() / num_rejected)
            metrics["logps/rejected"].append(acc.gather_for_metrics(detached[~labels].nansum()).nansum().item() / num_rejected)
        if num_chosen > 0 and num_rejected > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
