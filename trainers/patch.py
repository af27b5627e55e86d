"""Any Hugging Face causal LM in one line: ``apply_fused_head(model)`` and ``remove_fused_head(model)``.

    from trainers import apply_fused_head
    apply_fused_head(model)                      # an instance: patched in place, returned
    apply_fused_head(Qwen3ForCausalLM)           # a class: every instance, also those built later

After it, ``model(**batch, labels=labels).loss`` is the model's own causal-LM loss (shifted labels,
``-100`` ignored, the mean over scored tokens, or the sum over ``num_items_in_batch`` as `Trainer`'s
gradient accumulation passes it; ``shift_labels`` where transformers passes them; MoE router loss
added as the model adds it), computed by `align_losses`' fused linear + cross-entropy core from the
last hidden states and the head's weight: the ``[tokens, vocab]`` logits are never built and the head's
forward never runs; ``logits`` is None. Calls without ``labels`` (``generate``, evaluation that needs
logits) are untouched. ``model(..., labels=labels, fused_lm_head=True)`` returns per-token statistics
instead of the loss (`trainers.fused_forward.FusedHeadOutput`: ``log_probs``, ``entropy`` with
``fused_outputs=("entropy",)``, ...), for custom losses.

The patch is `trainers.fused_forward`'s forward (the one the fused trainers install) with
``labels_loss`` on: config quirks (soft-cap, logit scales), LoRA or ``modules_to_save`` on the head,
FSDP2 and ZeRO-3 head calls and the MoE auxiliary loss come from there, as does the refusal of heads
the core cannot reproduce (`trainers.fused_forward.output_head`). Models whose own forward computes
another loss (a loss of its own, a transform before the head, hidden states changed before it, an
extra loss term, a soft-cap or scale in the config it does not apply) are refused here, from that
forward's source (`check_causal_lm_forward`, `check_config_quirks`).

With TRL's ``SFTTrainer`` (which installs its own chunked head on the instance and calls
``model(..., fused_lm_head=True)``): on an instance patched here, a forward pre-hook routes those calls
to our forward, so ours runs and TRL's head does not. The hook fires on ``model(...)``; under PEFT, or
with only the class patched, TRL's head runs alone until ``apply_fused_head(trainer.model)`` is called after
building the trainer (ours then sits outside TRL's). In no order do both heads run for one call.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, TypeVar

import torch

from .fused_forward import (
    FusedHeadSettings,
    HeadQuirks,
    active_settings,
    check_impl,
    install_fused_head,
    install_fused_head_on_class,
    labels_loss_fields,
    output_head,
    read_head_quirks,
    uninstall_fused_head,
    unwrap_transformers_model,
)
from .model_source import AUX_ADD, method_source

#: `FusedHeadSettings` fields that ``backend_options`` may set.
BACKEND_OPTIONS = ("memory_budget", "token_chunk", "filter_mass")
#: What ``fused_lm_head=True`` calls compute besides ``log_probs`` unless ``fused_outputs=`` says otherwise:
#: the fields TRL's ``SFTTrainer`` reads.
FUSED_CALL_OUTPUTS = ("entropy", "is_top1")

Model = TypeVar("Model")


def _settings(impl: str, label_smoothing: float, z_loss: float, backend_options: Optional[dict]) -> FusedHeadSettings:
    if not isinstance(impl, str) or not impl:
        raise ValueError(f"impl must be 'auto' or a backend name, got {impl!r}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if backend_options is not None and not isinstance(backend_options, dict):
        raise ValueError(f"backend_options must be a dict or None, got {type(backend_options).__name__}")
    options = dict(backend_options or {})
    unknown = set(options) - set(BACKEND_OPTIONS)
    if unknown:
        raise ValueError(f"unknown backend_options {sorted(unknown)}; expected a subset of {list(BACKEND_OPTIONS)}")
    if options.get("filter_mass") is not None and label_smoothing > 0:
        raise ValueError(
            "backend_options filter_mass cannot be combined with label_smoothing: label smoothing takes a gradient of "
            "the mean logit over the whole vocabulary, which the filtering backward skips. Use one of the two."
        )
    return FusedHeadSettings(
        outputs=FUSED_CALL_OUTPUTS,
        impl=impl,
        labels_loss=True,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        **options,
    )


#: Lines of a causal LM's ``forward`` that may set ``hidden_states`` between the backbone and the head: the
#: backbone's last hidden states, their ``logits_to_keep`` slice, and MiniCPM3's division by ``logits_scaling``
#: (a logit scale, read from the config like Granite's).
_HIDDEN_LINES = re.compile(
    r"hidden_states = (\w+\.last_hidden_state|\w+\[0\]"
    r"|slice_logits_to_keep\((hidden_states|\w+\.last_hidden_state), logits_to_keep\)"
    r"|hidden_states / self\.config\.logits_scaling)$"
)
#: Lines that may set ``loss``: none, transformers' ``loss_function``, and the MoE router loss added with labels
#: (whose form and coefficient `trainers.model_source.router_loss` reads).
_LOSS_LINES = re.compile(rf"loss = None$|loss = self\.loss_function\(|{AUX_ADD.pattern}")


def _head_attribute(cls: type) -> Optional[str]:
    """The attribute ``cls.get_output_embeddings`` returns (``lm_head`` unless overridden), None if not one of its own."""
    from transformers import PreTrainedModel

    if cls.get_output_embeddings is PreTrainedModel.get_output_embeddings:
        return "lm_head"
    found = re.search(r"return self\.(\w+)\s*$", method_source(cls, "get_output_embeddings")[1], re.M)
    return found.group(1) if found else None


def _forward_problem(cls: type) -> Optional[str]:
    """Why the patch cannot reproduce the loss of ``cls.forward`` (`check_causal_lm_forward`), or None."""
    _, body = method_source(cls, "forward")
    if "self.loss_function(" not in body:
        return "computes its loss with code of its own, not transformers' `loss_function`"
    head = _head_attribute(cls)
    if head is None:
        return "returns an LM head from `get_output_embeddings` that is not one of its own attributes"
    if not re.search(rf"self\.{head}\(\s*hidden_states(\[[^\]]*\]|\.to\([\w.]*\))?\s*\)", body):
        return f"does not call `self.{head}` (its output embeddings) on the backbone's hidden states"
    for line in (line.strip() for line in body.splitlines()):
        if re.match(r"hidden_states\s+[-+*/]?=\s", line) and not _HIDDEN_LINES.match(line):
            return f"changes the hidden states before its head (`{line}`)"
        if re.match(r"loss\s+[-+*/]?=\s", line) and not _LOSS_LINES.match(line):
            return f"computes a loss the fused head does not reproduce (`{line}`)"
    return None


def check_causal_lm_forward(cls: type) -> None:
    """A ValueError unless the patched forward computes the same loss as ``cls.forward``.

    The patched forward computes ``loss_function(head(backbone(...).last_hidden_state), labels)`` plus the
    MoE router loss. That is the model's loss only when its own forward does the same, which its source
    shows: the loss from ``self.loss_function`` (not a loss of its own: BART's, Marian's, XLNet's, BERT's
    masked LM), the head an attribute named by ``get_output_embeddings`` and called on the backbone's
    hidden states unchanged (not BERT's or RoBERTa's ``cls.predictions.decoder`` after a transform, nor
    ModernBERT-decoder's ``decoder`` after a norm), and nothing else added to the loss (Bamba's z-loss).
    """
    problem = _forward_problem(cls)
    if problem is not None:
        raise ValueError(
            f"{cls.__name__} {problem}: apply_fused_head supports causal LMs whose forward takes the loss of "
            "`self.loss_function` on their LM head's output for the backbone's last hidden states, so that the fused "
            "loss is the model's own."
        )


#: The config fields `read_head_quirks` reads a logit scale from: the forward must apply one of them.
_SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def check_config_quirks(cls: type, quirks: HeadQuirks) -> None:
    """A ValueError when the config gives a soft-cap or logit scale that ``cls.forward`` does not apply.

    The fused head applies what `read_head_quirks` reads from the (text) config; a model whose forward
    ignores it (Gemma-3's image-text model has ``text_config.final_logit_softcapping`` and applies no
    soft-cap) has another loss.
    """
    _, body = method_source(cls, "forward")
    if quirks.softcap is not None and "final_logit_softcapping" not in body:
        raise ValueError(
            f"the config of {cls.__name__} sets final_logit_softcapping={quirks.softcap}, which its forward does not "
            "apply: the fused loss would be soft-capped and the model's not. Set it to None if the model is meant "
            "to run without it."
        )
    if quirks.logit_scale != 1.0 and not any(name in body for name in _SCALE_FIELDS):
        raise ValueError(
            f"the config of {cls.__name__} gives a logit scale ({quirks.logit_scale}, from one of {list(_SCALE_FIELDS)}) "
            "that its forward does not apply: the fused loss would be scaled and the model's not."
        )


def check_instance_quirks(model) -> None:
    """`check_config_quirks` of ``model``'s class and config (a class patch runs it on each call it answers)."""
    check_config_quirks(type(model), read_head_quirks(model.config))


def _is_model_class(target) -> bool:
    from transformers import PreTrainedModel

    return isinstance(target, type) and issubclass(target, PreTrainedModel)


def apply_fused_head(
    model: Model,
    *,
    impl: str = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend_options: Optional[dict] = None,
) -> Model:
    """Patch a causal LM (instance, in place; or class) so that its loss with ``labels`` comes from the fused head.

    Args:
        model: a transformers ``PreTrainedModel`` with an LM head (a PEFT model: its base model is patched),
            or a ``PreTrainedModel`` subclass such as ``Qwen3ForCausalLM``, whose instances, also those
            built afterwards by other code, are then patched.
        impl: the backend of `align_losses` (``"auto"``, ``"torch"``, ``"triton"``, ``"cce"``, ``"liger"``).
        label_smoothing: as ``cross_entropy(..., label_smoothing=)`` and `Trainer`'s ``label_smoothing_factor``
            (leave that at 0: `Trainer` then takes the labels out of the call and smooths full logits).
        z_loss: adds ``z_loss * logsumexp**2`` per scored token.
        backend_options: ``memory_budget``, ``token_chunk`` (``torch``), ``filter_mass`` (``triton``).

    Returns:
        ``model``, patched. Patching again replaces the options.

    Raises:
        ValueError: for options out of range, a backend that cannot run here, a model without a head the
            fused core can reproduce (naming the head's type), a model whose forward computes a loss the patch
            does not reproduce (saying what it does), or something that is not a causal LM.
    """
    settings = _settings(impl, label_smoothing, z_loss, backend_options)
    if _is_model_class(model):
        check_impl(impl)
        if not callable(getattr(model, "get_output_embeddings", None)):
            raise ValueError(f"{model.__name__} has no `get_output_embeddings`: apply_fused_head needs a causal LM class")
        check_causal_lm_forward(model)
        install_fused_head_on_class(model, settings, check=check_instance_quirks)
        return model
    inner = unwrap_transformers_model(model)
    if not isinstance(inner, torch.nn.Module) or not hasattr(inner, "config"):
        raise ValueError(
            "apply_fused_head expects a transformers PreTrainedModel instance or class, got "
            + (f"the class {model.__name__}" if isinstance(model, type) else f"a {type(model).__name__}")
        )
    # Before anything is installed: a forward whose loss we reproduce, a head we can read, a backend that runs here and
    # supports this head (bias, soft-cap, dtype) for the loss
    output_head(inner)
    if getattr(inner.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(inner).__name__} is an encoder-decoder model: apply_fused_head needs a causal LM")
    check_causal_lm_forward(type(inner))
    check_instance_quirks(inner)
    probe = dataclasses.replace(settings, outputs=labels_loss_fields(settings), quirks=read_head_quirks(inner.config))
    check_impl(impl, inner, probe)
    install_fused_head(inner, settings, route_fused_calls=True)
    return model


def fused_head_backend(model) -> str:
    """The backend the patched ``model``'s loss runs on for its device and dtype (``"torch"``, ``"triton"``, ...)."""
    inner = unwrap_transformers_model(model)
    settings = active_settings(inner)
    if settings is None or not settings.labels_loss:
        raise ValueError(f"apply_fused_head was not applied to this {type(inner).__name__} (nor to its class)")
    probe = dataclasses.replace(settings, outputs=labels_loss_fields(settings), quirks=read_head_quirks(inner.config))
    return check_impl(settings.impl, inner, probe)


def remove_fused_head(model_or_class):
    """Undo `apply_fused_head`: the instance's or class's ``forward`` is what it was before. Returns its argument.

    Raises ValueError when nothing was applied to it.
    """
    target = model_or_class if isinstance(model_or_class, type) else unwrap_transformers_model(model_or_class)
    if not uninstall_fused_head(target):
        name = target.__name__ if isinstance(target, type) else type(target).__name__
        raise ValueError(f"no fused head was applied to this {name}: nothing to remove")
    return model_or_class
