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
the core cannot reproduce (`trainers.fused_forward.output_head`).

With TRL's ``SFTTrainer`` (which installs its own chunked head on the instance and calls
``model(..., fused_lm_head=True)``): on an instance patched here, a forward pre-hook routes those calls
to our forward, so ours runs and TRL's head does not. The hook fires on ``model(...)``; under PEFT, or
with only the class patched, TRL's head runs alone until ``apply_fused_head(trainer.model)`` is called after
building the trainer (ours then sits outside TRL's). In no order do both heads run for one call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, TypeVar

import torch

from .fused_forward import (
    FusedHeadSettings,
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
            fused core can reproduce (naming the head's type), or something that is not a causal LM.
    """
    settings = _settings(impl, label_smoothing, z_loss, backend_options)
    if _is_model_class(model):
        check_impl(impl)
        if not callable(getattr(model, "get_output_embeddings", None)):
            raise ValueError(f"{model.__name__} has no `get_output_embeddings`: apply_fused_head needs a causal LM class")
        install_fused_head_on_class(model, settings)
        return model
    inner = unwrap_transformers_model(model)
    if not isinstance(inner, torch.nn.Module) or not hasattr(inner, "config"):
        raise ValueError(
            "apply_fused_head expects a transformers PreTrainedModel instance or class, got "
            + (f"the class {model.__name__}" if isinstance(model, type) else f"a {type(model).__name__}")
        )
    # Before anything is installed: the backend runs here and supports this head (bias, soft-cap, dtype) for the loss
    output_head(inner)
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
