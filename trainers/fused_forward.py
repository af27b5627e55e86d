"""The model-side half of the fused trainers: a forward that returns per-token statistics, not logits.

`install_fused_head(model, settings)` replaces ``model.forward`` (on the instance, as TRL's own
``add_fused_lm_head`` does; `install_fused_head_on_class` on a class) with a forward that, when called
with ``fused_lm_head=True``, runs the model's backbone and hands its last hidden states and the LM
head's parameters to `align_losses.linear_token_stats`. With ``settings.labels_loss`` (what
`trainers.patch.apply_fused_head` installs), a call with ``labels`` also goes there and returns the
model's own causal-LM output with the loss and no logits. Every other call goes to the forward it
replaced, so generation and ``model(**inputs).logits`` are unchanged. `uninstall_fused_head` puts back
what was there. Heads whose output is not ``h W^T + b`` of their own parameters are refused
(`output_head`): the fused head reads the parameters and never calls the head. Because the patch
sits on the transformers model itself, every call still goes through the wrappers around it: DDP/FSDP
hooks, PEFT's ``PeftModel.forward`` and its adapter layers, accelerate's autocast.

The fused call returns a `FusedHeadOutput` carrying the fields TRL's trainers read from its own
fused head (``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``,
``label_mask``, ``loss``, ``aux_loss``), shaped ``[B, T - 1]`` (next-token labels; ``[B, T]`` with
``shift_labels``), zero where the label is -100, plus:

* ``logsumexp`` (differentiable) for z-loss and label smoothing;
* ``mean_logits_all`` ``[B, T]``: the mean logit over the vocabulary at *every* input position
  (prompt and padding included, unshifted), which ORPO/CPO log as ``logits/chosen``. Without a
  soft-cap it costs no projection: ``mean_v(h . W_v + b_v) = h . mean_v(W) + mean_v(b)``, scaled by
  ``logit_scale / temperature``. With a soft-cap (Gemma-2) that identity fails, because
  ``mean(tanh(.)) != tanh(mean(.))``; the labelled positions then take the exact mean from the main
  pass, and the other positions (prompt, padding) are run through the core once more, without
  gradient, asking only for ``mean_logit``: exact, tiled, a second GEMM over those positions but
  still no ``[tokens, V]`` buffer.

Model quirks are read from the (text) config once, at install time: Gemma-2's
``final_logit_softcapping``; a logit multiplier (Cohere's ``logit_scale``, ``output_multiplier``,
``lm_head_multiplier``, Granite's divisor ``logits_scaling``); the LM-head bias and tied embeddings
need nothing special, since the head's own ``weight`` and ``bias`` are read on every call.

LoRA on the LM head (PEFT ``target_modules`` including ``lm_head``): the adapter adds
``s * (h A^T) B^T`` to ``h W^T + b``. The fused forward feeds the core the augmented pair

    hidden' = [h, s * A(dropout(h))]   [N, D + r]        weight' = [W, B]   [V, D + r]

so that ``hidden' @ weight'^T = h W^T + s (h A^T) B^T`` exactly (the adapter's own ``lora_A`` and
``lora_dropout`` modules run on ``h``; a ``lora_B`` bias adds ``s * b_B`` to the head bias). The
only extra memory is the concatenated weight, ``V x (D + r)`` in the weight dtype, plus its
gradient buffer in backward (the core's weight gradient is split back onto ``W``, frozen, and
``B``); a merged weight ``W + s B A`` would cost the same ``V x D`` but round the product into the
weight's dtype. Several active adapters add one block of ``r`` columns each. LoRA variants (DoRA
and others) are refused. A core that accepted a low-rank term natively could avoid the copy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

import align_losses
from align_losses import backends
from align_losses.backends.base import HeadProblem, LogitTransform
from align_losses.losses import sft_loss

from . import model_source

logger = logging.getLogger(__name__)

#: TRL's fused-head field names, and the core statistic behind each.
FIELD_TO_STAT = {
    "entropy": "entropy",
    "mean_logits": "mean_logit",
    "is_top1": "argmax_hit",
    "log_sum_sq_probs": "log_sum_p2",
    "logsumexp": "logsumexp",
}
FIELDS = ("log_probs", *FIELD_TO_STAT)

_MARKER = "_align_losses_head"
_CLASS_MARKER = "_align_losses_class_head"
#: A fused call routed past another forward wrapper (`_route_fused_calls`).
_FUSED_FLAG = "_align_losses_fused"


@dataclass
class FusedHeadOutput(ModelOutput):
    """Output of a model called with ``fused_lm_head=True`` after `install_fused_head`.

    Per-token fields are ``[B, T - 1]`` (``[B, T]`` with ``shift_labels``), float32, zero where the
    label is -100; those not requested are None. ``log_probs``, ``entropy``, ``mean_logits`` and
    ``logsumexp`` carry gradients (TRL's ``mean_logits`` does not; label smoothing needs it);
    ``log_sum_sq_probs`` and ``is_top1`` (bool) do not.

    Attributes:
        loss: NLL summed over labelled tokens, divided by ``num_items_in_batch`` (or their count),
            plus the MoE router loss as the model's forward adds it, when router logits are on.
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, logsumexp: per-token statistics.
        label_mask: bool, where the label is not -100.
        aux_loss: MoE router loss as the model's forward computes it, when router logits were requested
            (None for a model whose forward computes none, as Llama 4's text model).
        mean_logits_all: ``[B, T]`` mean logit at every input position (see the module docstring),
            when called with ``mean_logits_all=True``; detached.
    """

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    logsumexp: Optional[torch.Tensor] = None
    mean_logits_all: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class HeadQuirks:
    """How the model turns its head output ``a = h W^T + b`` into logits, read from its config."""

    softcap: Optional[float] = None
    logit_scale: float = 1.0


@dataclass(frozen=True)
class FusedHeadSettings:
    """What the fused forward computes and with which backend.

    Attributes:
        outputs: default per-token fields (beyond ``log_probs``), names from `FIELDS`.
        impl: ``"auto"`` or a backend name of `align_losses.backends`.
        memory_budget: bytes of tile temporaries for the ``torch`` backend (None: its default).
        token_chunk: tokens per tile for the ``torch`` backend (None: its choice).
        filter_mass: the ``triton`` backend's filtering backward (None: exact).
        temperature: logits are divided by it (1.0 for the trainers here; the RL trainers use their
            sampling temperature).
        fp32_head: run the head in float32 outside autocast, the hidden states cast up (TRL's
            ``cast_lm_head_to_fp32``, which leaves the head's weight in float32).
        labels_loss: calls with ``labels`` (and no ``fused_lm_head``) return the model's own causal-LM
            output with the loss from the fused head and no logits (`trainers.patch`); otherwise they
            go to the forward it replaced, as calls without labels always do.
        label_smoothing, z_loss: of that loss (``labels_loss`` only).
    """

    outputs: tuple = ()
    impl: str = "auto"
    memory_budget: Optional[int] = None
    token_chunk: Optional[int] = None
    filter_mass: Optional[float] = None
    temperature: float = 1.0
    quirks: HeadQuirks = field(default_factory=HeadQuirks)
    fp32_head: bool = False
    labels_loss: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    @property
    def backend_options(self) -> dict:
        options = {}
        if self.memory_budget is not None:
            options["memory_budget"] = int(self.memory_budget)
        if self.token_chunk is not None:
            options["token_chunk"] = int(self.token_chunk)
        if self.filter_mass is not None:
            options["filter_mass"] = float(self.filter_mass)
        return options

    @property
    def transform(self) -> LogitTransform:
        return LogitTransform(
            logit_scale=float(self.quirks.logit_scale), softcap=self.quirks.softcap, temperature=float(self.temperature)
        )


# ---------------------------------------------------------------------------------------------------------------------
# Config quirks and the head's operands


def read_head_quirks(config) -> HeadQuirks:
    """Soft-cap and logit multiplier of a (possibly multimodal) model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            scale = value
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        # Granite / MiniCPM3 divide by it; HyperCLOVA X multiplies.
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / text.logits_scaling
    return HeadQuirks(softcap=None if softcap is None else float(softcap), logit_scale=1.0 if scale is None else float(scale))


def _tuner_layer_type():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed
        return None
    return BaseTunerLayer


def is_adapter_layer(module) -> bool:
    tuner = _tuner_layer_type()
    return tuner is not None and isinstance(module, tuner)


def head_operands(head: torch.nn.Module, hidden: torch.Tensor):
    """``(hidden', weight', bias)`` with ``hidden' @ weight'^T + bias`` equal to ``head(hidden)``.

    A plain linear head gives its own parameters. A PEFT LoRA layer gives the augmented pair of the
    module docstring (or its base layer's parameters when its adapters are disabled or merged).
    """
    if not is_adapter_layer(head):
        return hidden, head.weight, getattr(head, "bias", None)
    base = head.get_base_layer()
    weight, bias = base.weight, base.bias
    if head.disable_adapters or head.merged:
        return hidden, weight, bias
    lora_a = getattr(head, "lora_A", None)
    if lora_a is None:
        raise ValueError(f"the LM head is wrapped by {type(head).__name__}, which the fused head cannot read; only LoRA is supported")
    hidden_parts, weight_parts = [hidden], [weight]
    for name in head.active_adapters:
        if name not in lora_a:
            continue
        if name in getattr(head, "lora_variant", {}):
            raise ValueError(
                f"LoRA variant {type(head.lora_variant[name]).__name__} (e.g. DoRA) on the LM head is not supported by the "
                "fused head; use plain LoRA on `lm_head` or remove it from `target_modules`."
            )
        a, b = head.lora_A[name], head.lora_B[name]
        scaling = head.scaling[name]
        low = a(head.lora_dropout[name](hidden.to(a.weight.dtype))) * scaling
        hidden_parts.append(low.to(hidden.dtype))
        weight_parts.append(b.weight.to(weight.dtype))
        if b.bias is not None:
            extra = (b.bias * scaling).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    if len(hidden_parts) == 1:
        return hidden, weight, bias
    return torch.cat(hidden_parts, dim=-1), torch.cat(weight_parts, dim=1), bias


def _modules_to_save_type():
    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # peft not installed
        return None
    return ModulesToSaveWrapper


def _reading_module(head: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``weight``/``bias`` the fused head reads: under a LoRA layer its base layer, under
    PEFT's ``modules_to_save`` wrapper the copy that is active (or the original when adapters are off)."""
    if is_adapter_layer(head):
        return head.get_base_layer()
    wrapper = _modules_to_save_type()
    if wrapper is not None and isinstance(head, wrapper):
        if head.disable_adapters or not head.active_adapters:
            return head.original_module
        return head.modules_to_save[head.active_adapters[0]]
    return head


def _is_plain(module: torch.nn.Module, kind: type) -> bool:
    """``module`` is a ``kind`` whose own class keeps ``kind.forward`` (so its output is its weight's product)."""
    return isinstance(module, kind) and type(module).forward is kind.forward


def output_head(model) -> torch.nn.Module:
    """The LM head of ``model``, or a ValueError saying why the fused head cannot reproduce it.

    The fused head never calls the head: it reads ``weight`` and ``bias`` and computes ``h W^T + b``.
    That is the head's output only for a plain ``nn.Linear`` (its type, or a subclass that keeps
    ``nn.Linear.forward``), a PEFT LoRA layer or ``modules_to_save`` copy of one, or the model's own
    input ``nn.Embedding`` used as a tied head, and only as a module of the model itself (not inside
    another module whose forward runs first, as BERT's ``cls.predictions``). Anything else (a subclass
    whose forward scales its output, a norm before the projection, a quantised layer) would train on
    wrong log-probs and leave the extra parameters without gradient, so it is refused.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (`get_output_embeddings()` returned None): the fused "
            "head needs a causal LM with a linear LM head, e.g. an `AutoModelForCausalLM` model, not a bare backbone "
            "(`AutoModel`) or a classification model."
        )
    owner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper answers for the model it holds
    if not any(c is head or (is_adapter_layer(c) and c.get_base_layer() is head) for c in owner.children()):
        raise ValueError(
            f"the LM head of {type(model).__name__} ({type(head).__name__}) is not one of its own modules but sits "
            "inside another (as BERT's and RoBERTa's `decoder` after a dense layer and a norm), whose forward runs "
            "before it: the fused head reads the head's weight and would skip that. Train this model without the "
            "fused head."
        )
    if is_adapter_layer(head) and getattr(head, "lora_A", None) is None:
        raise ValueError(
            f"the LM head of {type(model).__name__} is wrapped by {type(head).__name__}, which the fused head cannot "
            "read; only LoRA is supported on `lm_head` (or leave it out of `target_modules`)."
        )
    base = _reading_module(head)
    tied_input = False
    if _is_plain(base, torch.nn.Embedding):
        get_in = getattr(model, "get_input_embeddings", None)
        inputs = get_in() if callable(get_in) else None
        tied_input = inputs is base or getattr(inputs, "weight", None) is base.weight
    if not (_is_plain(base, torch.nn.Linear) or tied_input):
        raise ValueError(
            f"the LM head of {type(model).__name__} is a {type(base).__module__}.{type(base).__qualname__}, which the "
            "fused head cannot reproduce: it reads the head's `weight` and `bias` and never calls its forward, so it "
            "supports only a plain `nn.Linear` (or a subclass that does not override `forward`), a PEFT LoRA wrapper "
            "of one, or the tied input embedding. Fold what the head does into a plain `nn.Linear` (a scale into its "
            "weight, a norm into the backbone), or train this model without the fused head."
        )
    weight = getattr(base, "weight", None)
    # ZeRO-3 leaves an empty placeholder between gathers; `ds_shape` keeps the real shape.
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())
    if not isinstance(weight, torch.Tensor) or len(shape) != 2:
        raise ValueError(
            f"the output embeddings of {type(model).__name__} ({type(base).__name__}) have no 2-D `weight`; the fused "
            "head needs a linear LM head [vocab, hidden]."
        )
    return head


def check_impl(impl: str, model=None, settings: Optional[FusedHeadSettings] = None) -> str:
    """Raise a ValueError unless backend ``impl`` exists, runs here, and supports this model's head.

    Returns the backend name that ``impl`` resolves to for the model's device and dtype.
    """
    impl = impl or "auto"
    try:
        backends.check(impl)  # the name and this environment, before the head is read
    except backends.BackendError as e:
        if e.kind != "unavailable":
            raise
        raise ValueError(f"lce_impl={impl!r} cannot run here: {e.reason}") from e
    if model is None:
        return impl
    head = output_head(model)
    base = head.get_base_layer() if is_adapter_layer(head) else head
    weight = base.weight
    settings = settings or FusedHeadSettings(impl=impl)
    outputs = frozenset(("logprobs", *(FIELD_TO_STAT[f] for f in settings.outputs if f in FIELD_TO_STAT)))
    problem = HeadProblem(
        hidden=weight.new_empty((0, 0)),  # a probe of device, dtype and features: shapes do not matter
        weight=weight,
        bias=getattr(base, "bias", None),
        labels=torch.empty(0, dtype=torch.long, device=weight.device),
        transform=settings.transform,
        outputs=outputs,
        options=settings.backend_options,
    )
    return backends.check(impl, problem).name


# ---------------------------------------------------------------------------------------------------------------------
# The patched forward


@dataclass(frozen=True)
class _Installed:
    """One patch of a model instance (stored in its ``__dict__``) or of a class (in the class's ``__dict__``).

    ``inner`` answers every call the patch does not: the instance's bound forward it replaced, or the
    class's function. ``previous`` is what the instance's (class's) own ``__dict__`` held under
    ``forward`` (None: nothing, the forward came from the class), restored on removal unless a forward
    installed later wraps ``installed`` (the function this patch put there).
    """

    inner: Callable
    settings: FusedHeadSettings
    previous: Optional[Callable] = None
    hook: Any = None  # the handle of `_route_fused_calls`, if registered
    installed: Optional[Callable] = None
    check: Optional[Callable] = None  # a class patch's check of each instance it answers for (ValueError)


def install_fused_head(model, settings: FusedHeadSettings, route_fused_calls: bool = False) -> None:
    """Patch ``model.forward`` (a transformers causal LM, not a PEFT or DDP wrapper) with the fused forward.

    Installing again replaces the settings and keeps the forward it first wrapped (and its routing hook).
    ``route_fused_calls``: also register `_route_fused_calls` (for a forward installed later outside ours).
    """
    output_head(model)
    settings = dataclasses.replace(settings, quirks=read_head_quirks(model.config))
    entry = model.__dict__.get(_MARKER)
    if entry is not None:
        model.__dict__[_MARKER] = dataclasses.replace(entry, settings=settings)  # a new object: callers may restore the old
        return
    inner = model.forward  # TRL's patched forward (which itself falls back to the original) or the original

    def entry_of(self):
        found = self.__dict__.get(_MARKER)
        if found is None:  # removed while a forward installed later still wraps this one: pass every call on
            return _Installed(inner, FusedHeadSettings())
        return found

    hook = _route_fused_calls(model) if route_fused_calls else None
    forward = _patched_forward(type(model).forward, entry_of, per_call_quirks=False)
    model.__dict__[_MARKER] = _Installed(inner, settings, model.__dict__.get("forward"), hook, installed=forward)
    model.forward = types.MethodType(forward, model)


@contextmanager
def temporary_fused_head(model, settings: FusedHeadSettings):
    """`install_fused_head` on ``model`` (a transformers causal LM) for the block; on exit its instance holds
    exactly what it held before: TRL's fused head, an earlier install with other settings, or nothing."""
    keys = ("forward", _MARKER)
    saved = {k: model.__dict__[k] for k in keys if k in model.__dict__}
    try:
        install_fused_head(model, settings)
        yield model
    finally:
        for k in keys:
            model.__dict__.pop(k, None)
        model.__dict__.update(saved)


def install_fused_head_on_class(cls: type, settings: FusedHeadSettings, check: Optional[Callable] = None) -> None:
    """Patch ``cls.forward`` so that every instance, also those built later by other code, gets the fused forward.

    The head is checked on each call (there is no instance yet), as is ``check(model)`` if given, and the quirks
    read from each instance's config. Installing again replaces the settings and the check.
    """
    entry = cls.__dict__.get(_CLASS_MARKER)
    if entry is not None:
        setattr(cls, _CLASS_MARKER, dataclasses.replace(entry, settings=settings, check=check))
        return
    original = cls.forward

    def entry_of(self):
        found = cls.__dict__.get(_CLASS_MARKER)
        if found is None:  # removed while an instance install still wraps this function: the original answers
            return _Installed(types.MethodType(original, self), FusedHeadSettings())
        return dataclasses.replace(found, inner=types.MethodType(found.inner, self))

    forward = _patched_forward(original, entry_of, per_call_quirks=True)
    setattr(cls, _CLASS_MARKER,
            _Installed(original, settings, previous=cls.__dict__.get("forward"), installed=forward, check=check))
    cls.forward = forward


def uninstall_fused_head(target) -> bool:
    """Undo `install_fused_head` (an instance) or `install_fused_head_on_class` (a class); False if none was there.

    The instance's (class's) ``forward`` is what it was before: its own earlier one (e.g. TRL's fused head)
    or none, so that the class's forward answers again. A forward installed after ours and wrapping it
    (TRL's ``add_fused_lm_head`` on a patched instance) stays, and ours under it passes every call on.
    """
    is_class = isinstance(target, type)
    store = target.__dict__
    entry = store.get(_CLASS_MARKER if is_class else _MARKER)
    if entry is None:
        return False
    if entry.hook is not None:
        entry.hook.remove()
    current = store.get("forward")
    ours_outermost = getattr(current, "__func__", current) is entry.installed
    if is_class:
        delattr(target, _CLASS_MARKER)
    else:
        del store[_MARKER]
    if not ours_outermost:
        return True
    if entry.previous is not None:
        setattr(target, "forward", entry.previous)
    elif is_class:
        delattr(target, "forward")
    else:
        store.pop("forward", None)
    return True


def fused_settings(model) -> Optional[FusedHeadSettings]:
    """The settings of a fused head installed on the instance ``model``, or None."""
    entry = model.__dict__.get(_MARKER)
    return None if entry is None else entry.settings


def active_settings(model) -> Optional[FusedHeadSettings]:
    """The settings ``model``'s calls run with: its own install, else its class's (`install_fused_head_on_class`)."""
    entry = model.__dict__.get(_MARKER)
    if entry is None:
        for klass in type(model).__mro__:
            entry = klass.__dict__.get(_CLASS_MARKER)
            if entry is not None:
                break
    return None if entry is None else entry.settings


def _route_fused_calls(model) -> Any:
    """Make ``model`` answer ``fused_lm_head=True`` with this module's fused forward even when a forward
    installed later sits outside it (TRL's ``SFTTrainer`` puts its own chunked head there with
    ``add_fused_lm_head``); returns the hook's handle.

    A forward pre-hook turns the call into ``fused_lm_head=False`` plus a private flag: a wrapper outside
    ours then takes its ordinary path, which hands the keyword arguments on, and our forward answers the
    flag. It fires on ``model(...)`` only: PEFT calls the base model's ``forward`` directly, so under PEFT
    the outermost forward answers (see `trainers.patch`).
    """

    def hook(module, args, kwargs):
        if not kwargs.get("fused_lm_head"):
            return None
        return args, {**kwargs, "fused_lm_head": False, _FUSED_FLAG: True}

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _positional_names(forward) -> tuple:
    """The names of ``forward``'s positional parameters after ``self``."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _patched_forward(template, entry_of, per_call_quirks: bool):
    """The fused forward, with ``template``'s signature (``generate`` validates its kwargs against it).

    ``entry_of(self)`` gives the `_Installed` in force. A call is answered here when it asks for the
    fused statistics (``fused_lm_head=True`` or the routed flag), or when it carries ``labels`` and the
    settings ask for the loss (``labels_loss``); every other call goes to the forward it replaced, as
    does a call with ``labels`` and a ``logits_to_keep`` other than 0 (it asks for logits).
    Positional arguments are named after ``template``: the backbone's positional order differs.
    """
    names = _positional_names(template)

    @functools.wraps(template)
    def forward(
        self,
        *args,
        fused_lm_head: bool = False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        fused_outputs: Optional[Sequence[str]] = None,
        mean_logits_all: bool = False,
        **kwargs,
    ):
        entry = entry_of(self)
        settings = entry.settings
        fused = bool(fused_lm_head) or bool(kwargs.pop(_FUSED_FLAG, False))
        if args:
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__}.forward takes {len(names)} positional arguments, {len(args)} given")
            for name, value in zip(names, args):
                if name in kwargs or (name == "labels" and labels is not None):
                    raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
                kwargs[name] = value
        if labels is None:
            labels = kwargs.pop("labels", None)
        keep = kwargs.get("logits_to_keep", 0)
        keeps_all = isinstance(keep, int) and keep == 0
        if not fused and not (settings.labels_loss and labels is not None and keeps_all):
            return _pass_on(self, entry, kwargs, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch)
        if per_call_quirks:
            output_head(self)
            if entry.check is not None:
                entry.check(self)
            settings = dataclasses.replace(settings, quirks=read_head_quirks(self.config))
        kwargs.pop("logits_to_keep", None)
        text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        if fused:
            return _fused_call(
                self, text_config, settings, kwargs, labels, shift_labels, num_items_in_batch, fused_outputs, mean_logits_all
            )
        return _loss_call(self, text_config, settings, kwargs, labels, shift_labels, num_items_in_batch)

    return forward


def _pass_on(self, entry: _Installed, kwargs: dict, **loss_kwargs):
    """A call the patch does not answer, to the forward it replaced (with the loss arguments it was given)."""
    if entry.settings.labels_loss and loss_kwargs["labels"] is None and self.training and torch.is_grad_enabled():
        warnings.warn(
            "the fused head was called with gradients but without `labels`, so the model built its logits as "
            "before (no memory saved). A `Trainer` with `label_smoothing_factor` or `compute_loss_func` takes "
            "the labels out of the call: pass `label_smoothing=` to `apply_fused_head` instead, or compute "
            "a custom loss from `model(..., labels=labels, fused_lm_head=True).log_probs`.",
            stacklevel=3,
        )
    kwargs.update((key, value) for key, value in loss_kwargs.items() if value is not None)
    return entry.inner(**kwargs)


@dataclass
class _HeadPass:
    """The backbone's output and the head's per-token statistics of one fused call."""

    per_token: dict
    label_mask: torch.Tensor
    backbone: Any
    aux_loss: Optional[torch.Tensor]
    mean_logits_all: Optional[torch.Tensor]
    aux_weight: float = 0.0  # the router loss's factor in the model's own loss (`model_source.RouterLoss.weight`)


def _fused_call(self, text_config, settings, kwargs, labels, shift_labels, num_items_in_batch, fields, want_all):
    if labels is None and shift_labels is None:
        raise ValueError("a fused_lm_head=True call needs `labels` (or `shift_labels`)")
    fields = tuple(settings.outputs if fields is None else fields)
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fused outputs {sorted(unknown)}; expected a subset of {list(FIELDS)}")
    if settings.label_smoothing or settings.z_loss:
        warnings.warn(
            "apply_fused_head's label_smoothing and z_loss are in the loss of calls with `labels` only: this "
            "fused_lm_head=True call (TRL's SFTTrainer makes them) returns per-token log-probs, and the loss its caller "
            "computes from them has neither.",
            stacklevel=3,
        )
    kwargs["use_cache"] = False
    kwargs.pop("return_dict", None)
    run = _head_pass(self, text_config, settings, kwargs, labels, shift_labels, fields, want_all)
    count = run.label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -run.per_token["log_probs"].sum() / count
    if run.aux_loss is not None:
        loss = loss + run.aux_weight * run.aux_loss
    return FusedHeadOutput(
        loss=loss, label_mask=run.label_mask, aux_loss=run.aux_loss, mean_logits_all=run.mean_logits_all, **run.per_token
    )


def labels_loss_fields(settings: FusedHeadSettings) -> tuple:
    """The per-token fields (beyond ``log_probs``) the loss of a call with ``labels`` needs (``labels_loss``)."""
    if settings.label_smoothing > 0:
        return ("mean_logits", "logsumexp")
    return ("logsumexp",) if settings.z_loss > 0 else ()


def _loss_call(self, text_config, settings, kwargs, labels, shift_labels, num_items_in_batch):
    """The model's own causal-LM output with ``labels``, its loss from the fused head and ``logits=None``.

    The loss is transformers' ``ForCausalLMLoss`` (shifted labels or ``shift_labels``, -100 ignored, the sum
    over scored tokens divided by their count or ``num_items_in_batch``; NaN, as there, when that is 0),
    with the settings' label smoothing and z-loss, plus the MoE router loss as the model's forward adds it
    (`trainers.model_source.router_loss`).
    """
    return_dict = kwargs.pop("return_dict", None)
    run = _head_pass(self, text_config, settings, kwargs, labels, shift_labels, labels_loss_fields(settings), False)
    divisor = run.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = sft_loss(
        run.per_token["log_probs"],
        run.label_mask,
        num_items_in_batch=divisor,
        label_smoothing=settings.label_smoothing,
        z_loss=settings.z_loss,
        mean_logit=run.per_token["mean_logits"],
        logsumexp=run.per_token["logsumexp"],
    ).loss
    # No scored token (or num_items_in_batch 0): the model's cross-entropy is 0 / 0, NaN; sft_loss clamps the
    # divisor to 1 and gives 0. Give the model's NaN (a where on the device: no host sync; the gradient stays 0).
    loss = torch.where(torch.as_tensor(divisor, device=loss.device) == 0, float("nan"), loss)
    values = dict(run.backbone.items())
    if run.aux_loss is not None:
        loss = loss + run.aux_weight * run.aux_loss.to(loss.device)
        values["aux_loss"] = run.aux_loss
    moe = run.aux_loss is not None or values.get("router_logits") is not None
    out_type = MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast
    names = {f.name for f in dataclasses.fields(out_type)} - {"loss", "logits"}
    output = out_type(loss=loss, logits=None, **{k: v for k, v in values.items() if k in names})
    return output.to_tuple() if return_dict is False else output


def _head_pass(self, text_config, settings, kwargs, labels, shift_labels, fields, want_all) -> _HeadPass:
    """Run the backbone on ``kwargs`` (named inputs) and the fused head on its last hidden states."""
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    head = self.get_output_embeddings()
    if _has_zero3_params(head) and not _owns_its_weight(head):
        raise ValueError(
            f"an LM head whose weight lives in a child module ({type(head).__name__}: a LoRA adapter or PEFT's "
            "`modules_to_save` on `lm_head`) is not supported by the fused head under DeepSpeed ZeRO-3 (ZeRO fetches "
            "the parameters of the module called, not its children's); leave `lm_head` out of `target_modules` / "
            "`modules_to_save`, or use FSDP2."
        )
    # Before any work: a router loss the fused forward cannot reproduce is an error (None: the forward computes none).
    router = model_source.router_loss(type(self)) if kwargs.get("output_router_logits") else None
    backbone_out = model_source.backbone(self)(**kwargs)
    hidden = backbone_out.last_hidden_state
    device = (head.get_base_layer() if is_adapter_layer(head) else head).weight.device
    hidden = hidden.to(device)
    if shift_labels is None:
        targets, shift = labels.to(device), True
    else:
        targets, shift = shift_labels.to(device), False

    stats = tuple(FIELD_TO_STAT[f] for f in fields if f in FIELD_TO_STAT)

    def head_stats(hidden):
        h, weight, bias = head_operands(head, hidden)
        weight, bias = _full_tensor(weight), _full_tensor(bias)
        result = align_losses.linear_token_stats(
            h,
            weight,
            targets,
            outputs=stats,
            bias=bias,
            shift=shift,
            temperature=settings.temperature,
            softcap=settings.quirks.softcap,
            logit_scale=settings.quirks.logit_scale,
            impl=settings.impl,
            backend_options=settings.backend_options,
        )
        all_means = _mean_logits_all(h, weight, bias, settings, result, targets, shift) if want_all else None
        return result, all_means

    if settings.fp32_head:
        with torch.autocast(hidden.device.type, enabled=False):
            result, all_means = _run_as_head_call(head, head_stats, hidden.float())
    else:
        result, all_means = _run_as_head_call(head, head_stats, hidden)

    def cut(x):
        return None if x is None else (x[:, :-1] if shift else x)

    per_token = {
        "log_probs": cut(result.logprobs),
        "entropy": cut(result.entropy),
        "mean_logits": cut(result.mean_logit),
        "is_top1": cut(None if result.argmax_hit is None else result.argmax_hit.bool()),
        "log_sum_sq_probs": cut(result.log_sum_p2),
        "logsumexp": cut(result.logsumexp),
    }
    label_mask = (targets[:, 1:] if shift else targets) != -100

    aux_loss, aux_weight = None, 0.0
    if router is not None and getattr(backbone_out, "router_logits", None) is not None:
        aux_loss = router.aux_loss(self, backbone_out.router_logits, kwargs.get("attention_mask"))
        aux_weight = router.weight(self)
    return _HeadPass(per_token, label_mask, backbone_out, aux_loss, all_means, aux_weight)


def _run_as_head_call(head, fn, hidden):
    """``fn(hidden)``, run as the forward of ``head`` when a sharding wrapper hooks the head's calls.

    The fused head reads the head's parameters without calling the head, so hooks that FSDP2 or
    DeepSpeed ZeRO-3 put on the head's ``__call__`` would not fire. Run as the head's forward, the
    core call fires them:
    - FSDP2 (``fully_shard(lm_head)``): pre-forward all-gathers the head (the core sees a plain
      tensor), post-forward reshards and registers the re-gather for backward, post-backward
      reduce-scatters the gradient; without them the head's gradient is wrong (0.99 relative error on
      2 ranks). accelerate's FSDP2 puts the head in one unit with the final norm, whose forward has
      already unsharded it; calling the head then changes nothing (tested exact).
    - ZeRO-3: pre-forward fetches the partitioned weight (tied to the embeddings or not), post-forward
      releases it, the outputs' pre-backward hook fetches it again for the core's backward, whose
      weight gradient ZeRO's gradient hooks reduce and partition. Gathering it ourselves instead
      clashed with ZeRO's bookkeeping (it refused to release a weight it counted as in use).
    A head wrapped by neither is used directly.
    """
    if not (_is_fsdp2_module(head) or _has_zero3_params(head)):
        return fn(hidden)
    kept = {}

    def forward(h):
        result, all_means = fn(h)
        kept["type"], kept["names"] = type(result), [f.name for f in dataclasses.fields(result)]
        return tuple(getattr(result, n) for n in kept["names"]) + (all_means,)  # tensors: FSDP2 / ZeRO-3 hook them

    previous = head.__dict__.get("forward")  # an instance-level forward someone else installed
    head.forward = forward
    try:
        values = head(hidden)
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
    return kept["type"](**dict(zip(kept["names"], values[:-1]))), values[-1]


def _full_tensor(t):
    """FSDP2 shards parameters as DTensors; the core takes the whole (gathered, differentiable) head."""
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def _mean_logits_all(h, weight, bias, settings: FusedHeadSettings, result, targets, shift) -> torch.Tensor:
    """``[B, T]`` mean over the vocabulary of the logits at every position (module docstring)."""
    t = settings.transform
    if t.is_linear:
        w_mean = weight.mean(dim=0, dtype=torch.float32)  # no fp32 copy of the [V, D] weight
        mean = h.float() @ w_mean
        if bias is not None:
            mean = mean + bias.mean(dtype=torch.float32)
        return mean * (t.logit_scale / t.temperature)
    # Soft-capped: the labelled positions have it already; project the others once, without gradient.
    labelled = targets[:, 1:] if shift else targets
    known = result.mean_logit
    pos_known = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    if known is not None:  # else the main pass did not compute it: project every position
        if shift:
            pos_known[:, :-1] = labelled != -100
        else:
            pos_known = labelled != -100
    dummy = torch.where(pos_known, -100, 0)
    rest = align_losses.linear_token_stats(
        h.detach(), weight.detach(), dummy, outputs=("mean_logit",), bias=None if bias is None else bias.detach(),
        temperature=t.temperature, softcap=t.softcap, logit_scale=t.logit_scale, impl=settings.impl,
        backend_options=settings.backend_options,
    ).mean_logit
    if known is None:
        return rest
    return torch.where(pos_known, known.detach(), rest)


def _is_fsdp2_module(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _owns_its_weight(head) -> bool:
    """Whether the weight the fused head reads is a parameter of ``head`` itself, not of a child module."""
    weight = getattr(head, "weight", None)
    return any(p is weight for p in head.parameters(recurse=False))


def _has_zero3_params(module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions a parameter of ``module`` or of its children (``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def keep_fused_outputs_fp32(accelerator) -> None:
    """Stop FSDP2 from rounding what the model returns to the mixed-precision dtype (no-op otherwise).

    With bf16 mixed precision accelerate builds FSDP2's ``MixedPrecisionPolicy`` with ``output_dtype=bf16``,
    and FSDP2 casts every floating tensor a wrapped module returns to it: the fused head's fp32 per-token
    log-probs (and the loss) would leave the model rounded to bf16, a relative error up to 2^-8 per token
    before the loss sums them. Without an ``output_dtype`` a module's outputs keep the dtype they were
    computed in: bf16 for the decoder layers (their parameters are cast to ``param_dtype``), fp32 for the
    fused statistics. Must run before the model and a reference model are sharded: accelerate's
    ``fsdp2_prepare_model`` and TRL's ``prepare_fsdp`` read the policy then.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(plugin, "fsdp_version", 1) != 2 or getattr(policy, "output_dtype", None) is None:
        return
    plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)
    logger.info("FSDP2: output_dtype %s dropped from the mixed-precision policy: the fused head's per-token "
                "outputs stay fp32", policy.output_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Letting TRL's __init__ accept a LoRA adapter on the LM head


@contextmanager
def allow_lm_head_adapter(model):
    """While active, ``get_output_embeddings()`` of ``model`` answers the base layer of a PEFT-wrapped head.

    TRL's DPO/KTO/SFT ``__init__`` refuse a LoRA adapter on ``lm_head`` (their fused head reads
    ``lm_head.weight`` directly and would ignore it); ours reads the adapter, so the trainers here
    enter this context around ``super().__init__()``. ``model`` is the transformers model (the one
    PEFT wraps, or the one a ``peft_config`` will be applied to); the override is an instance
    attribute, removed on exit.
    """
    if model is None or isinstance(model, str):
        yield
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    cls_get = type(inner).get_output_embeddings

    def get_output_embeddings(self):
        head = cls_get(self)
        return head.get_base_layer() if is_adapter_layer(head) else head

    had = "get_output_embeddings" in inner.__dict__
    if not had:
        inner.get_output_embeddings = types.MethodType(get_output_embeddings, inner)
    try:
        yield
    finally:
        if not had:
            inner.__dict__.pop("get_output_embeddings", None)


def unwrap_transformers_model(model):
    """The transformers model under PEFT (``get_base_model``) or the model itself."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model
