"""What the fused trainers share: checks before TRL's ``__init__`` runs, installing the fused heads, the model's
per-token outputs as an `align_losses.fused.TokenBatch`, the reference model (DPO, KTO) and the fused pass over a
concatenated chosen + rejected batch (ORPO, CPO)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
from accelerate.utils import is_peft_model

from align_losses import backends
from align_losses.ops.gemm import tf32_matmuls
from align_losses.fused import SequenceLayout, TokenBatch

from .configs import check_lce_numbers, lce_options
from .dataset_checks import check_not_empty, check_rows
from .fused_forward import (
    FIELD_TO_STAT,
    FusedHeadOutput,
    FusedHeadSettings,
    allow_lm_head_adapter,
    check_impl,
    fused_settings,
    install_fused_head,
    keep_fused_outputs_fp32,
    output_head,
    unwrap_transformers_model,
)

#: Datasets TRL's ORPO/CPO tokenisation accepts (the prompt may be implicit, as the common prefix).
PAIRED_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


# ---------------------------------------------------------------------------------------------------------------------
# Checks before TRL's __init__


def check_impl_name(args) -> None:
    """Fail now on an ``lce_impl`` that is unknown or cannot run in this environment."""
    impl = lce_options(args)["impl"]
    try:
        backends.check(impl)  # without a call: the name and this environment ("auto" always passes)
    except backends.BackendError as e:
        if e.kind == "unknown":
            raise ValueError(f"lce_impl={impl!r} is not a known backend: {e.reason}") from e
        raise ValueError(f"lce_impl={impl!r} cannot run here: {e.reason}. Use lce_impl='auto' or another backend.") from e


def check_model(model) -> None:
    """Fail now on a model instance without a linear LM head (a string is checked once it is loaded)."""
    if model is None or isinstance(model, str):
        return
    output_head(unwrap_transformers_model(model))


def dataset_columns(dataset) -> Optional[set]:
    if dataset is None:
        return None
    names = getattr(dataset, "column_names", None)
    if names is None:  # IterableDataset of unknown features
        try:
            names = list(next(iter(dataset)).keys())
        except StopIteration:
            raise ValueError("the dataset is empty") from None
    return set(names)


def check_columns(dataset, alternatives: Sequence[Iterable[str]], trainer: str, split: str = "train") -> None:
    """Fail unless ``dataset`` holds one of the column sets in ``alternatives``, has rows, and (a
    `datasets.Dataset`) holds no null value in those columns and only True/False or 0/1 in a ``label`` column
    (`trainers.dataset_checks`)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            check_columns(part, alternatives, trainer, f"{split}[{name!r}]")
        return
    check_not_empty(dataset, f"{trainer}: the {split} dataset")
    columns = dataset_columns(dataset)
    if columns is None:
        return
    for option in alternatives:
        if set(option) <= columns:
            check_rows(dataset, option, f"{trainer}: the {split} dataset")
            return
    wanted = " or ".join("{" + ", ".join(repr(c) for c in option) + "}" for option in alternatives)
    raise ValueError(
        f"{trainer}: the {split} dataset has columns {sorted(columns)}, but it needs {wanted}."
    )


def check_before_init(
    trainer: str,
    args,
    models: Sequence[Any],
    columns: Optional[Sequence[Iterable[str]]],
    train_dataset,
    eval_dataset,
    *,
    decoder_only: bool = False,
) -> None:
    """The checks every fused trainer runs before TRL's ``__init__``, in this order: the config's numbers
    (`trainers.configs.check_lce_numbers`: also a plain TRL config's ``beta`` and KTO weights, which the loss
    would otherwise refuse only at the first step), ``args.lce_impl`` (`check_impl_name`), each model's LM head (`check_model`), with ``decoder_only`` the first model's
    architecture, then the datasets' columns (`check_columns`; ``columns=None`` skips them)."""
    if args is not None:
        check_lce_numbers(args)
        check_impl_name(args)
    for model in models:
        check_model(model)
    model = models[0] if models else None
    if decoder_only and model is not None and not isinstance(model, str):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{trainer} supports decoder-only models only: the fused head has no encoder-decoder path.")
    if columns is not None:
        check_columns(train_dataset, columns, trainer)
        check_columns(eval_dataset, columns, trainer, "eval")


def check_prepared_datasets(trainer) -> None:
    """After TRL's ``__init__``: fail when tokenisation and truncation left a given dataset without rows.

    TRL drops the rows whose prompt fills ``max_length``; with every row dropped, DPO and SFT would fail in
    the sampler (``num_samples=0``) and KTO would train 0 steps and report success.
    """
    name = type(trainer).__name__
    max_length = getattr(trainer.args, "max_length", None)
    parts = [("train", trainer.train_dataset)]
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):
        parts += [(f"eval[{key!r}]", part) for key, part in eval_dataset.items()]
    else:
        parts.append(("eval", eval_dataset))
    for split, dataset in parts:
        if dataset is None:
            continue
        try:
            size = len(dataset)
        except TypeError:  # an IterableDataset has no length
            continue
        if size == 0:
            raise ValueError(
                f"{name}: no row of the {split} dataset is left after tokenisation and truncation to "
                f"max_length={max_length}: expected at least one row whose prompt is shorter than max_length "
                f"(TRL drops the others). Raise max_length or shorten the prompts."
            )


@contextlib.contextmanager
def lm_head_adapter_allowed(model, peft_config):
    """Around TRL's ``__init__``: let a LoRA adapter on ``lm_head`` through its refusal (we train it)."""
    if model is None or isinstance(model, str):
        yield
        return
    with allow_lm_head_adapter(model):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# TRL's fused-head names at the boundary: the core's names inside


def head_fields(stats: Iterable[str]) -> tuple[str, ...]:
    """The fused forward's field names (TRL's: ``mean_logits``, ``is_top1``, ...) of core statistics
    (``mean_logit``, ``argmax_hit``, ...), for `FusedHeadSettings.outputs` and ``fused_outputs=``."""
    field_of = {stat: name for name, stat in FIELD_TO_STAT.items()}
    return tuple(dict.fromkeys(field_of[stat] for stat in stats))


def token_batch(out: FusedHeadOutput, layout: SequenceLayout, mask: torch.Tensor,
                completion: Optional[torch.Tensor] = None) -> TokenBatch:
    """The per-token outputs of a fused forward, per sequence and under the core's names.

    Args:
        out: the model's `FusedHeadOutput`: next-token values ``[rows, W]`` under TRL's field names.
        layout: the batch's layout (padded, or packed into one row).
        mask: ``[rows, W']`` the scored tokens (nonzero), next-token aligned; ``W' <= W``: prompt-learning
            PEFT prepends virtual tokens, and only the last ``W'`` positions are the batch's.
        completion: the tokens the sequence log-probs cover, shaped like ``mask`` (default ``mask``).
    """
    width = mask.shape[-1]
    values = {"logprobs": out.log_probs, **{stat: getattr(out, name, None) for name, stat in FIELD_TO_STAT.items()}}
    values = {name: None if value is None else value[..., -width:] for name, value in values.items()}
    return TokenBatch.of(layout, mask, values, completion=completion, shifted=True)


# ---------------------------------------------------------------------------------------------------------------------
# Every trainer: the fused heads, and what `compute_loss(..., return_outputs=True)` returns


class FusedTrainerMixin:
    """Installs the fused head on the policy (under PEFT, on its transformers model) and the reference model.

    Subclasses set ``_fused_outputs``: the per-token fields their loss and metrics read from the policy.
    The head's options come from ``self.args``, a Fused*Config or a plain TRL config (`lce_options`).
    Under FSDP2 with mixed precision the fused outputs are kept fp32 (`keep_fused_outputs_fp32`).
    """

    _fused_outputs: tuple = ()

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        keep_fused_outputs_fp32(self.accelerator)
        keep_tf32_off(self.args)

    def _head_settings(self, outputs: Sequence[str], trained: bool = True) -> FusedHeadSettings:
        """The head's settings; ``trained=False`` (the reference model) leaves out the filtering backward."""
        options = lce_options(self.args)
        return FusedHeadSettings(
            outputs=tuple(outputs), impl=options["impl"], memory_budget=options["memory_budget"],
            token_chunk=options["token_chunk"], filter_mass=options["filter_mass"] if trained else None,
        )

    def _install_fused_heads(self) -> None:
        """Installs the fused heads; called right after TRL's ``__init__`` (and wherever TRL uses a model before)."""
        policy = unwrap_transformers_model(self.accelerator.unwrap_model(self.model))
        settings = self._head_settings(self._fused_outputs)
        if fused_settings(policy) is None or fused_settings(policy).outputs != settings.outputs:
            install_fused_head(policy, settings)
            check_impl(settings.impl, policy, fused_settings(policy))
        ref = getattr(self, "ref_model", None)
        if ref is not None:
            ref = unwrap_transformers_model(self.accelerator.unwrap_model(ref))
            if fused_settings(ref) is None:
                install_fused_head(ref, self._head_settings((), trained=False))
                check_impl(settings.impl, ref, fused_settings(ref))

    @property
    def lce_backend(self) -> str:
        """Name of the backend the fused head runs on for the policy's device and dtype."""
        policy = unwrap_transformers_model(self.accelerator.unwrap_model(self.model))
        return check_impl(lce_options(self.args)["impl"], policy, fused_settings(policy))


def keep_tf32_off(args) -> None:
    """Honour ``tf32=False``: fp32 CUDA matmuls back in IEEE fp32 if something turned TF32 on.

    accelerate's ``AcceleratorState`` sets ``torch.backends.cuda.matmul.allow_tf32 = True`` for the whole process
    when a dynamo backend is set (``torch_compile=True``) on an fp32 CUDA run (no mixed precision), whatever the
    config's ``tf32`` says, after transformers has applied it. The head's fp32 GEMMs follow that setting, as
    PyTorch's do, so an fp32 head would run in TF32 (about 1e-3 relative on its logits) against the user's explicit
    choice. ``tf32`` True or None (transformers' default: its own choice, and accelerate's) is left alone.
    """
    if getattr(args, "tf32", None) is not False:
        return
    if tf32_matmuls():
        # Undone the way accelerate did it: the legacy setter updates both APIs' state, which then agree (setting
        # only the new one would leave the legacy one at "high", and reading ``allow_tf32`` would raise after).
        torch.backends.cuda.matmul.allow_tf32 = False
        warnings.warn("tf32=False: CUDA fp32 matmuls set back to IEEE fp32 after accelerate turned TF32 on for "
                      "torch_compile (AcceleratorState sets allow_tf32 = True for fp32 runs with a dynamo backend)",
                      stacklevel=2)


def outputs_with_logits(model, inputs: dict, drop: Iterable[str] = ("output_router_logits",)):
    """What ``compute_loss(..., return_outputs=True)`` returns: ``model``'s ordinary outputs, logits included, from
    an extra forward without gradient on ``inputs`` less the keys in ``drop`` (with a warning: that is the cost)."""
    warnings.warn(
        "`return_outputs=True` needs the logits, which the fused head never builds: they are recomputed with "
        "an extra forward pass.",
        stacklevel=3,
    )
    drop = frozenset(drop)
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k not in drop})


# ---------------------------------------------------------------------------------------------------------------------
# DPO and KTO: a policy and a reference


def reference_adapter_context(trainer):
    """The context under which ``trainer.model`` acts as the reference (PEFT without a ref model), else a no-op."""
    from trl.trainer.utils import use_adapter

    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    return contextlib.nullcontext()


class ReferenceTrainerMixin(FusedTrainerMixin):
    """What `FusedDPOTrainer` and `FusedKTOTrainer` share: TRL's ``__init__`` (model, ``ref_model``, ...) behind the
    checks and followed by the fused heads, the reference forwards and the MoE/entropy/token-count bookkeeping.

    Subclasses set ``_dataset_columns`` (the column sets their datasets may have) and may override
    `_around_trl_init`.
    """

    _dataset_columns: Sequence[Iterable[str]] = ()

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        check_before_init(type(self).__name__, args, (model, ref_model), self._dataset_columns, train_dataset,
                          eval_dataset)
        with self._around_trl_init(args, data_collator), lm_head_adapter_allowed(model, peft_config):
            super().__init__(
                model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
                callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
                peft_config=peft_config,
            )
        check_prepared_datasets(self)
        self._install_fused_heads()

    def _around_trl_init(self, args, data_collator):
        """Hook: a context manager around TRL's ``__init__`` (the checks have passed, the heads are not installed)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _precompute_context(self):
        """Around a reference forward (also of a batch whose log-probs TRL precomputes, ``compute_ref_log_probs``):
        no gradient or gradient checkpointing, the reference adapter under PEFT without ``ref_model``, and the
        accelerator's autocast. The autocast matters for ``ref_model``: accelerate prepares it inside TRL's
        ``__init__``, and the fused head installed after it calls the model's own forward, past the autocast
        wrapper (a bf16 policy against an fp32 reference of the same weights gave non-zero rewards at step 0)."""
        from trl.models.utils import disable_gradient_checkpointing

        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            reference_adapter_context(self),
            self.accelerator.autocast(),
        ):
            yield

    @contextlib.contextmanager
    def _reference_model(self):
        """Yields the model that scores as the reference, in `_precompute_context`: ``ref_model``, or (no
        ``ref_model``) the policy, with its adapter disabled under PEFT."""
        with self._precompute_context():
            yield self.model if self.ref_model is None else self.ref_model

    def _add_aux_loss(self, loss, outputs, mode):
        """``loss`` plus the MoE router loss (``router_aux_loss_coef * aux_loss``), logged as ``aux_loss``, when enabled."""
        if not self.aux_loss_enabled:
            return loss
        aux = outputs.aux_loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux).mean().item())
        return loss + self.router_aux_loss_coef * aux

    def _log_entropy_and_tokens(self, mode, entropy, mask, num_tokens) -> None:
        """TRL's ``entropy`` (mean over the ``mask`` tokens) and ``num_tokens`` (``num_tokens`` added in training)."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        tokens = acc.gather_for_metrics(mask.sum()).sum()
        entropy_sum = acc.gather_for_metrics((entropy.detach() * mask).sum()).sum()
        metrics["entropy"].append((entropy_sum / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(num_tokens).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


# ---------------------------------------------------------------------------------------------------------------------
# ORPO and CPO: one fused forward over a concatenated chosen + rejected batch


@dataclass
class PairedPass:
    """One fused forward over the concatenated batch ``[chosen rows; rejected rows]`` (``2B`` rows, width ``T``).

    Attributes:
        outputs: the raw `trainers.fused_forward.FusedHeadOutput` (``aux_loss`` for MoE).
        tokens: ``[2B, T - 1]`` per-token values (`align_losses.fused.TokenBatch`, ``logprobs`` with gradient);
            ``mask``: the labelled tokens (the chosen rows' NLL tokens, the rejected rows' completions),
            ``completion``: the completion tokens (TRL's ``concatenated_labels``, shifted).
        mean_logit_all: ``[2B, T]`` detached mean logit over the vocabulary at every input position.
        batch_size: ``B``.
    """

    outputs: Any
    tokens: TokenBatch
    mean_logit_all: torch.Tensor
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
    fields = head_fields(("mean_logit",)) if settings is not None and settings.quirks.softcap is not None else ()
    outputs = model(
        input_ids, attention_mask=attention_mask, use_cache=False, labels=labels, fused_lm_head=True,
        fused_outputs=fields, mean_logits_all=True, **kwargs,
    )
    tokens = token_batch(outputs, SequenceLayout.of(labels), labels[:, 1:] != -100,
                         completion=completion_labels[:, 1:] != -100)
    # Prompt-learning PEFT prepends virtual tokens: keep the real positions.
    mean_all = outputs.mean_logits_all[:, -input_ids.shape[1]:]
    return PairedPass(outputs=outputs, tokens=tokens, mean_logit_all=mean_all, batch_size=num)


class PairedTrainerMixin(FusedTrainerMixin):
    """What `FusedORPOTrainer` and `FusedCPOTrainer` share: TRL's ``__init__`` behind the checks and followed by the
    fused heads, and ``concatenated_forward``/``get_batch_loss_metrics`` on one `fused_paired_pass`.

    Subclasses set ``_default_config`` (the config class when ``args`` is None) and implement `_fused_pass`,
    `_paired_loss` and `_mean_logit_halves`; they may add metrics (`_extra_metrics`) and refuse configs (`_check_args`).
    """

    _fused_outputs: tuple = ()
    _default_config: type = None

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, compute_metrics=None):
        if args is None:
            args = self._default_config()
        self._check_args(args)
        check_before_init(type(self).__name__, args, (model,), PAIRED_COLUMNS, train_dataset, eval_dataset,
                          decoder_only=True)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init, callbacks=callbacks,
            optimizers=optimizers, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config, compute_metrics=compute_metrics,
        )
        check_prepared_datasets(self)
        self._install_fused_heads()

    def _check_args(self, args) -> None:
        """Hook for subclasses: refuse configs before TRL's ``__init__`` runs."""

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

    # ------------------------------------------------------------------------------------------------ hooks
    def _fused_pass(self, model, batch) -> PairedPass:
        """`fused_paired_pass` with this trainer's padding value and NLL labels."""
        raise NotImplementedError

    def _paired_loss(self, fused: PairedPass):
        """``(chosen logps [B], rejected logps [B], loss output)`` of a fused pass, the log-probs as TRL logs them."""
        raise NotImplementedError

    def _mean_logit_halves(self, fused: PairedPass):
        """``(chosen, rejected)`` vocabulary-mean logits over the positions TRL's ``logits/*`` metrics average."""
        raise NotImplementedError

    def _extra_metrics(self, result, prefix: str) -> dict:
        """Metrics logged after the common ones (none by default)."""
        return {}

    # ------------------------------------------------------------------------------------------------ TRL's steps
    def concatenated_forward(self, model, batch):
        """TRL's tuple ``(chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss[, aux_loss])``
        from the fused pass; the "logits" are vocabulary-mean logits (`_mean_logit_halves`), without the vocabulary."""
        fused = self._fused_pass(model, batch)
        chosen_logps, rejected_logps, result = self._paired_loss(fused)
        chosen_ml, rejected_ml = self._mean_logit_halves(fused)
        out = (chosen_logps, rejected_logps, chosen_ml, rejected_ml, result.nll_loss)
        return out + (fused.outputs.aux_loss,) if self.aux_loss_enabled else out

    def get_batch_loss_metrics(self, model, batch, train_eval: Literal["train", "eval"] = "train"):
        """The loss and TRL's metrics of a batch, from one fused pass."""
        fused = self._fused_pass(model, batch)
        chosen_logps, rejected_logps, result = self._paired_loss(fused)
        chosen_ml, rejected_ml = self._mean_logit_halves(fused)
        prefix = "eval_" if train_eval == "eval" else ""
        m = self._metric
        metrics = {
            f"{prefix}rewards/chosen": m(result.chosen_rewards),
            f"{prefix}rewards/rejected": m(result.rejected_rewards),
            f"{prefix}rewards/accuracies": m(result.reward_accuracies),
            f"{prefix}rewards/margins": m(result.reward_margins),
            f"{prefix}logps/rejected": m(rejected_logps),
            f"{prefix}logps/chosen": m(chosen_logps),
            # TRL: gather the per-rank mean of the [B, T(-1), V] logits, then average.
            f"{prefix}logits/rejected": m(rejected_ml.mean()),
            f"{prefix}logits/chosen": m(chosen_ml.mean()),
            f"{prefix}nll_loss": m(result.nll_loss),
        }
        metrics.update(self._extra_metrics(result, prefix))
        loss = result.loss
        if self.aux_loss_enabled:
            loss = loss + self.aux_loss_coef * fused.outputs.aux_loss
        return loss, metrics
