"""`FusedDPOTrainer`: TRL's `DPOTrainer` with the log-probs and metrics of one fused pass of `align_losses`.

What changes against `trl.DPOTrainer` (everything else, data preparation, reference handling,
precomputed reference log-probs, PEFT, callbacks and logging, is TRL's):

* the policy and reference forwards run through `trainers.fused_forward` (the core
  `align_losses.linear_token_stats`), never building ``[tokens, vocab]`` logits;
* the loss is `align_losses.losses.dpo_loss` (with `sequence_logps`, `ld_sequence_logps`,
  `wpo_weights`), computed in small overridable steps: `_policy_pass`, `_reference_logps`,
  `_preference_loss`, `_log_metrics`;
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

from align_losses.losses import dpo_loss, ld_sequence_logps, sequence_logps, wpo_weights

from ._common import ReferenceTrainerMixin, outputs_with_logits

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


def packed_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Labels of a packed row: completion tokens, -100 elsewhere and at each sequence's first token."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    starts = torch.cumsum(lengths, 0) - lengths
    labels[0, starts] = -100  # the token before a sequence start belongs to another sequence
    return labels


def unpack_shifted(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[1, N - 1]`` next-token values of a packed row -> ``[S, max_len - 1]``, zero-padded (differentiable).

    Sequence ``s`` starting at ``o_s`` gets ``out[s, j] = values[0, o_s + j]`` for ``j < len_s - 1``:
    exactly the shifted layout the padded batch has.
    """
    num, width = lengths.numel(), int(lengths.max()) - 1
    starts = torch.cumsum(lengths, 0) - lengths
    keep = lengths - 1
    rows = torch.repeat_interleave(torch.arange(num, device=lengths.device), keep)
    cols = torch.arange(int(keep.sum()), device=lengths.device) - torch.repeat_interleave(torch.cumsum(keep, 0) - keep, keep)
    src = torch.repeat_interleave(starts, keep) + cols
    out = values.new_zeros((num, width))
    return out.index_put((rows, cols), values[0, src])


def unpack_mask(mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[1, N]`` per-token mask of a packed row -> ``[S, max_len]``, zero-padded."""
    num, width = lengths.numel(), int(lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths
    rows = torch.repeat_interleave(torch.arange(num, device=lengths.device), lengths)
    cols = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(starts, lengths)
    out = mask.new_zeros((num, width))
    out[rows, cols] = mask[0, : int(lengths.sum())]
    return out


@dataclass
class PolicyPass:
    """What the policy forward gives the loss and the metrics, in the padded ``[2B, T - 1]`` layout.

    ``token_logps`` carries gradients. ``outputs`` is the raw fused output (``aux_loss`` for MoE).
    """

    outputs: Any
    token_logps: torch.Tensor
    entropy: Optional[torch.Tensor]
    mean_logits: Optional[torch.Tensor]
    is_top1: Optional[torch.Tensor]
    log_sum_sq_probs: Optional[torch.Tensor]
    completion_mask: torch.Tensor  # [2B, T]
    shift_mask: torch.Tensor  # [2B, T - 1]
    model_kwargs: dict
    labels: torch.Tensor
    num_tokens: torch.Tensor  # real (non-pad) tokens of the batch

    def chosen_rejected(self, x: torch.Tensor):
        return x.chunk(2, dim=0)


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
        self._fused_outputs = ("entropy", "mean_logits", "is_top1")
        if args is not None and args.use_weighting:
            self._fused_outputs += ("log_sum_sq_probs",)
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
            token_logps, shift_mask = self._reference_token_logps(model, inputs)
        return self._sequence_logps(token_logps, shift_mask)

    def _reference_token_logps(self, model, inputs):
        """``([2B, T - 1] log-probs, shift mask)`` of ``model`` on a batch, without extra statistics."""
        model_kwargs, labels, lengths = self._model_inputs(inputs)
        out = model(**model_kwargs, labels=labels, fused_lm_head=True, fused_outputs=())
        return self._to_padded(out.log_probs, inputs, lengths)

    def _reference_logps(self, inputs):
        """Reference ``(chosen [B], rejected [B])``: precomputed columns, the ref model, or the adapter-free policy."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        model_kwargs, labels, lengths = self._model_inputs(inputs)
        with self._reference_model() as ref:
            out = ref(**model_kwargs, labels=labels, fused_lm_head=True, fused_outputs=())
        token_logps, shift_mask = self._to_padded(out.log_probs, inputs, lengths)
        return self._sequence_logps(token_logps, shift_mask)

    # ------------------------------------------------------------------------------------------------ policy
    def _model_inputs(self, inputs):
        """``(model kwargs, labels, sequence lengths or None)`` of a padded or packed batch."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        lengths = inputs.get("sequence_lengths")
        if lengths is not None:
            model_kwargs.pop("attention_mask", None)  # block-diagonal masking needs attention_mask=None
            labels = packed_labels(inputs["input_ids"], inputs["completion_mask"], lengths)
        else:
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return model_kwargs, labels, lengths

    def _to_padded(self, values, inputs, lengths):
        """Per-token fused values -> ``([2B, T - 1] values, shift mask)`` in the padded layout."""
        if lengths is None:
            shift_mask = inputs["completion_mask"][..., 1:]
            # Prompt-learning PEFT prepends virtual tokens; keep the real positions
            return values[:, -shift_mask.size(1):], shift_mask
        completion_mask = unpack_mask(inputs["completion_mask"], lengths)
        return unpack_shifted(values, lengths), completion_mask[:, 1:]

    def _policy_pass(self, model, inputs) -> PolicyPass:
        """The policy's fused forward: per-token log-probs (with gradient) and the statistics the metrics use."""
        model_kwargs, labels, lengths = self._model_inputs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        out = model(**model_kwargs, labels=labels, fused_lm_head=True)
        token_logps, shift_mask = self._to_padded(out.log_probs, inputs, lengths)

        def padded(x):
            return None if x is None else self._to_padded(x, inputs, lengths)[0]

        if lengths is None:
            completion_mask, num_tokens = inputs["completion_mask"], inputs["attention_mask"].sum()
        else:
            completion_mask, num_tokens = unpack_mask(inputs["completion_mask"], lengths), lengths.sum()
        return PolicyPass(
            outputs=out,
            token_logps=token_logps,
            entropy=padded(out.entropy),
            mean_logits=padded(out.mean_logits),
            is_top1=padded(out.is_top1),
            log_sum_sq_probs=padded(out.log_sum_sq_probs),
            completion_mask=completion_mask,
            shift_mask=shift_mask,
            model_kwargs=model_kwargs,
            labels=labels,
            num_tokens=num_tokens,
        )

    def _sequence_logps(self, token_logps, shift_mask):
        """``(chosen [B], rejected [B])`` sums over the completion, LD-DPO weighted when ``ld_alpha`` is set."""
        if self.ld_alpha is None:
            return sequence_logps(token_logps, shift_mask).chunk(2, dim=0)
        chosen_t, rejected_t = token_logps.chunk(2, dim=0)
        chosen_m, rejected_m = shift_mask.chunk(2, dim=0)
        return ld_sequence_logps(chosen_t, chosen_m, rejected_t, rejected_m, ld_alpha=self.ld_alpha)

    # ------------------------------------------------------------------------------------------------ loss
    def _preference_loss(self, policy: PolicyPass, chosen_logps, rejected_logps, ref_chosen, ref_rejected):
        """`align_losses.losses.dpo_loss` with this trainer's settings."""
        chosen_tokens, _ = policy.chosen_rejected(policy.token_logps)
        chosen_shift, rejected_shift = policy.chosen_rejected(policy.shift_mask)
        chosen_full, rejected_full = policy.chosen_rejected(policy.completion_mask)
        weights = None
        if self.use_weighting:
            c_lsp, r_lsp = policy.chosen_rejected(policy.log_sum_sq_probs)
            _, rejected_tokens = policy.chosen_rejected(policy.token_logps)
            weights = wpo_weights(chosen_tokens, c_lsp, chosen_shift, rejected_tokens, r_lsp, rejected_shift)
        return dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen.to(chosen_logps.device),
            ref_rejected.to(chosen_logps.device),
            beta=self.beta,
            loss_type=self.loss_types,
            loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau,
            chosen_lengths=chosen_full.sum(dim=1),
            rejected_lengths=rejected_full.sum(dim=1),
            chosen_token_logps=chosen_tokens,
            chosen_token_mask=chosen_shift,
            wpo_weights=weights,
        )

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        # The reference first: its forward (under FSDP, a whole gathered model) then never meets the policy's activations
        ref_chosen, ref_rejected = self._reference_logps(inputs)
        policy = self._policy_pass(model, inputs)
        chosen_logps, rejected_logps = self._sequence_logps(policy.token_logps, policy.shift_mask)
        result = self._preference_loss(policy, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        loss = self._add_aux_loss(result.loss, policy.outputs, mode)
        self._log_metrics(mode, policy, result, chosen_logps, rejected_logps)
        if return_outputs:
            return loss, outputs_with_logits(model, policy.model_kwargs)
        return loss

    # ------------------------------------------------------------------------------------------------ metrics
    def _log_metrics(self, mode, policy: PolicyPass, result, chosen_logps, rejected_logps) -> None:
        """TRL's DPO metrics, under TRL's names, from the fused pass."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        mask = policy.shift_mask
        self._log_entropy_and_tokens(mode, policy.entropy, mask, policy.num_tokens)

        chosen_mask, rejected_mask = (m.bool() for m in policy.chosen_rejected(mask))
        chosen_ml, rejected_ml = policy.chosen_rejected(policy.mean_logits.detach())
        for side, values, side_mask in (("chosen", chosen_ml, chosen_mask), ("rejected", rejected_ml, rejected_mask)):
            total = acc.gather_for_metrics(values[side_mask].sum()).sum().item()
            count = acc.gather_for_metrics(side_mask.sum()).sum().item()
            metrics[f"logits/{side}"].append(total / count if count > 0 else 0.0)

        chosen_top1, _ = policy.chosen_rejected(policy.is_top1)
        correct = acc.gather_for_metrics((chosen_top1 & chosen_mask).sum()).sum()
        count = acc.gather_for_metrics(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        metrics["rewards/chosen"].append(acc.gather(result.chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(result.rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather(result.reward_accuracies).mean().item())
        metrics["rewards/margins"].append(acc.gather(result.reward_margins).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
