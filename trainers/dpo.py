"""`FusedDPOTrainer`: TRL's `DPOTrainer` with the log-probs and metrics of one fused pass of `align_losses`.

What changes against `trl.DPOTrainer` (everything else, data preparation, reference handling,
precomputed reference log-probs, PEFT, callbacks and logging, is TRL's):

* the policy and reference forwards run through `trainers.fused_forward` (the core
  `align_losses.linear_token_stats`), never building ``[tokens, vocab]`` logits;
* the model's per-token outputs are laid out per sequence (`align_losses.fused.TokenBatch`, padded or
  packed by `align_losses.fused.SequenceLayout`) and go to `align_losses.fused.dpo_from_tokens` (the
  per-sequence reductions and `align_losses.losses.dpo_loss`, as in `align_losses.FusedDPOLoss`), in
  small overridable steps: `_policy_pass`, `_reference_logps`, `_preference_loss`, `_log_metrics`;
* ``padding_free=True`` packs the chosen and rejected sequences of a batch into one row
  (`DataCollatorForPackedPreference`), with ``position_ids`` and no attention mask, so transformers
  builds a block-diagonal causal mask; TRL 1.16 ignores the flag;
* a LoRA adapter on ``lm_head`` is trained (TRL refuses it);
* bad input (no LM head, missing columns, an unusable ``lce_impl``) fails before TRL's ``__init__``;
* the reference forward runs before the policy's, not after: under FSDP it gathers the whole reference
  model on every GPU, and the policy's activations do not exist yet (TRL's order holds both at once).

Metrics: the same names as TRL (``entropy``, ``num_tokens``, ``logits/chosen``, ``logits/rejected``,
``mean_token_accuracy``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``aux_loss`` for MoE), all from the same
fused pass: entropy, mean logit and top-1 hit come from the core's per-token statistics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import trl
from transformers.data.data_collator import DataCollatorMixin

from align_losses.fused import (
    DPO_METRIC_OUTPUTS,
    PairLoss,
    SequenceLayout,
    TokenBatch,
    cu_seqlens_of,
    dpo_from_tokens,
    dpo_loss_outputs,
    pair_sequence_logps,
    split_pairs,
)

from ._common import ReferenceTrainerMixin, head_fields, outputs_with_logits, token_batch

#: Batch keys that are not model inputs.
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "sequence_lengths"})

PREFERENCE_COLUMNS = (
    ("prompt", "chosen", "rejected"),
    ("chosen", "rejected"),  # implicit prompt (TRL extracts the common prefix)
    ("prompt_ids", "chosen_ids", "rejected_ids"),  # already tokenized
)


@dataclass
class DataCollatorForPackedPreference(DataCollatorMixin):
    """Packs a batch of preference pairs into one padding-free row.

    Row layout: ``prompt_1 + chosen_1, ..., prompt_B + chosen_B, prompt_1 + rejected_1, ...,
    prompt_B + rejected_B`` (the padded collator's order, chosen half first). Returns ``input_ids``,
    ``position_ids`` (restarting at 0 for each sequence) and ``completion_mask``, all ``[1, N]``,
    ``sequence_lengths`` ``[2B]``, and the precomputed reference columns when present. There is no
    ``attention_mask``: with ``position_ids`` and no mask, transformers masks attention block-diagonally.
    Truncation to ``max_length`` is per sequence, as in TRL's padded collator.
    """

    pad_token_id: int
    max_length: Optional[int] = None
    truncation_mode: str = "keep_start"
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for example in examples:
                ids = list(example["prompt_ids"]) + list(example[side])
                mask = [0] * len(example["prompt_ids"]) + [1] * len(example[side])
                if self.max_length is not None:
                    if self.truncation_mode == "keep_start":
                        ids, mask = ids[: self.max_length], mask[: self.max_length]
                    elif self.truncation_mode == "keep_end":
                        ids, mask = ids[-self.max_length :], mask[-self.max_length :]
                    else:
                        raise ValueError(f"Unsupported truncation mode {self.truncation_mode!r}")
                sequences.append(ids)
                masks.append(mask)
        lengths = [len(s) for s in sequences]
        output = {
            "input_ids": torch.tensor([sum(sequences, [])], dtype=torch.long),
            "position_ids": torch.tensor([[i for n in lengths for i in range(n)]], dtype=torch.long),
            "completion_mask": torch.tensor([sum(masks, [])], dtype=torch.long),
            "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                output[key] = torch.tensor([example[key] for example in examples])
        return output


@dataclass
class PolicyPass:
    """The policy's fused forward on a batch, per sequence (``2B`` sequences, chosen first).

    Attributes:
        outputs: the raw `trainers.fused_forward.FusedHeadOutput` (``aux_loss`` for MoE).
        tokens: the per-token values (`align_losses.fused.TokenBatch`, ``logprobs`` with gradient).
        lengths: ``([B], [B])`` completion lengths as TRL counts them (the unshifted completion mask).
        model_kwargs: the model's inputs (for ``return_outputs``).
        labels: the labels of the fused call.
        num_tokens: ``[]`` real (non-pad) tokens of the batch.
    """

    outputs: Any
    tokens: TokenBatch
    lengths: tuple
    model_kwargs: dict
    labels: torch.Tensor
    num_tokens: torch.Tensor


class FusedDPOTrainer(ReferenceTrainerMixin, trl.DPOTrainer):
    """`trl.DPOTrainer` whose log-probs, loss and metrics come from one fused pass (see the module docstring).

    Takes the same arguments as `trl.DPOTrainer`; ``args`` may be a `FusedDPOConfig` or a plain `trl.DPOConfig`.
    """

    _tag_names = ["trl", "dpo", "align-losses"]
    _dataset_columns = PREFERENCE_COLUMNS

    @contextlib.contextmanager
    def _around_trl_init(self, args, data_collator):
        """Picks the policy's fused outputs before TRL's ``__init__`` (which may precompute reference log-probs), and
        hides ``padding_free=True`` from it (TRL would warn that it ignores the flag): we honour it afterwards, with
        `DataCollatorForPackedPreference` unless a collator is given."""
        packed = bool(args is not None and args.padding_free)
        use_weighting = bool(args is not None and args.use_weighting)
        self._fused_outputs = head_fields(DPO_METRIC_OUTPUTS + dpo_loss_outputs(use_weighting))
        if packed:
            args.padding_free = False
        try:
            yield
        finally:
            if packed:
                args.padding_free = True
        self.padding_free = packed
        if packed and data_collator is None:
            self.data_collator = DataCollatorForPackedPreference(
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode,
            )

    # ------------------------------------------------------------------------------------------------ reference
    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._install_fused_heads()  # TRL precomputes inside its __init__, before ours returns
        from .extract import reference_columns  # the extraction loop of `align-losses logps`

        return reference_columns(self, dataset, name=name, batch_size=batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """Reference sequence log-probs ``(chosen [B], rejected [B])`` of one padded batch (precompute path)."""
        with self._precompute_context():
            tokens = self._reference_tokens(model, inputs)
        return self._sequence_logps(tokens)

    def _reference_tokens(self, model, inputs) -> TokenBatch:
        """The per-token log-probs of ``model`` on a batch, without extra statistics."""
        model_kwargs, labels, layout = self._model_inputs(inputs)
        out = model(**model_kwargs, labels=labels, fused_lm_head=True, fused_outputs=())
        return self._token_batch(out, inputs, layout)

    def _reference_logps(self, inputs):
        """Reference ``(chosen [B], rejected [B])``: precomputed columns, the ref model, or the adapter-free policy."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with self._reference_model() as ref:
            tokens = self._reference_tokens(ref, inputs)
        return self._sequence_logps(tokens)

    # ------------------------------------------------------------------------------------------------ policy
    def _model_inputs(self, inputs) -> tuple[dict, torch.Tensor, SequenceLayout]:
        """``(model kwargs, labels, layout)`` of a padded or packed batch (labels: the completion tokens, -100
        elsewhere and, packed, at each sequence's first token)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        lengths = inputs.get("sequence_lengths")
        if lengths is not None:
            model_kwargs.pop("attention_mask", None)  # block-diagonal masking needs attention_mask=None
        layout = SequenceLayout.of(labels, None if lengths is None else cu_seqlens_of(lengths))
        return model_kwargs, layout.without_sequence_starts(labels, -100), layout

    @staticmethod
    def _token_batch(out, inputs, layout: SequenceLayout) -> TokenBatch:
        """The fused forward's per-token values of a batch, per sequence, scored on the completion."""
        return token_batch(out, layout, inputs["completion_mask"][..., 1:])

    def _policy_pass(self, model, inputs) -> PolicyPass:
        """The policy's fused forward: per-token log-probs (with gradient) and the statistics the metrics use."""
        model_kwargs, labels, layout = self._model_inputs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        out = model(**model_kwargs, labels=labels, fused_lm_head=True)
        if layout.packed:
            num_tokens = inputs["sequence_lengths"].sum()
        else:
            num_tokens = inputs["attention_mask"].sum()
        return PolicyPass(
            outputs=out,
            tokens=self._token_batch(out, inputs, layout),
            lengths=layout.arrange(inputs["completion_mask"]).sum(dim=1).chunk(2),
            model_kwargs=model_kwargs,
            labels=labels,
            num_tokens=num_tokens,
        )

    def _sequence_logps(self, tokens: TokenBatch):
        """``(chosen [B], rejected [B])`` sums over the completion, LD-DPO weighted when ``ld_alpha`` is set."""
        return pair_sequence_logps(*split_pairs(tokens), ld_alpha=self.ld_alpha)

    # ------------------------------------------------------------------------------------------------ loss
    def _preference_loss(self, policy: PolicyPass, chosen: TokenBatch, rejected: TokenBatch, ref_chosen,
                         ref_rejected) -> PairLoss:
        """`align_losses.fused.dpo_from_tokens` with this trainer's settings."""
        device = policy.tokens.logprobs.device
        return dpo_from_tokens(
            chosen,
            rejected,
            ref_chosen.to(device),
            ref_rejected.to(device),
            ld_alpha=self.ld_alpha,
            use_weighting=self.use_weighting,
            lengths=policy.lengths,
            beta=self.beta,
            loss_type=self.loss_types,
            loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau,
        )

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        # The reference first: its forward (under FSDP, a whole gathered model) then never meets the policy's activations
        ref_chosen, ref_rejected = self._reference_logps(inputs)
        policy = self._policy_pass(model, inputs)
        chosen, rejected = split_pairs(policy.tokens)
        pair = self._preference_loss(policy, chosen, rejected, ref_chosen, ref_rejected)
        loss = self._add_aux_loss(pair.result.loss, policy.outputs, mode)
        self._log_metrics(mode, policy, chosen, rejected, pair)
        if return_outputs:
            return loss, outputs_with_logits(model, policy.model_kwargs)
        return loss

    # ------------------------------------------------------------------------------------------------ metrics
    def _log_metrics(self, mode, policy: PolicyPass, chosen: TokenBatch, rejected: TokenBatch, pair: PairLoss) -> None:
        """TRL's DPO metrics, under TRL's names, from the fused pass."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        self._log_entropy_and_tokens(mode, policy.tokens.entropy, policy.tokens.mask, policy.num_tokens)

        for side, part in (("chosen", chosen), ("rejected", rejected)):
            total = acc.gather_for_metrics(part.mean_logit.detach()[part.mask].sum()).sum().item()
            count = acc.gather_for_metrics(part.mask.sum()).sum().item()
            metrics[f"logits/{side}"].append(total / count if count > 0 else 0.0)

        correct = acc.gather_for_metrics((chosen.argmax_hit & chosen.mask).sum()).sum()
        count = acc.gather_for_metrics(chosen.mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        result = pair.result
        metrics["rewards/chosen"].append(acc.gather(result.chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(result.rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather(result.reward_accuracies).mean().item())
        metrics["rewards/margins"].append(acc.gather(result.reward_margins).mean().item())
        metrics["logps/chosen"].append(acc.gather(pair.chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(pair.rejected_logps.detach()).mean().item())
