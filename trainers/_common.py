"""What the fused trainers share: checks before TRL's ``__init__`` runs, and installing the fused heads."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
from accelerate.utils import is_peft_model

from align_losses import backends

from .configs import lce_options
from .fused_forward import (
    FusedHeadSettings,
    allow_lm_head_adapter,
    check_impl,
    fused_settings,
    install_fused_head,
    output_head,
    unwrap_transformers_model,
)


def check_impl_name(args) -> None:
    """Fail now on an ``lce_impl`` that is unknown or cannot run in this environment."""
    impl = lce_options(args)["impl"]
    if impl == "auto":
        return
    try:
        backend = backends.get(impl)
    except ValueError as e:
        raise ValueError(f"lce_impl={impl!r} is not a known backend: expected one of {backends.names()}") from e
    reason = backend.available()
    if reason is not None:
        raise ValueError(f"lce_impl={impl!r} cannot run here: {reason}. Use lce_impl='auto' or another backend.")


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
    """Fail unless ``dataset`` holds one of the column sets in ``alternatives``."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            check_columns(part, alternatives, trainer, f"{split}[{name!r}]")
        return
    columns = dataset_columns(dataset)
    if columns is None:
        return
    for option in alternatives:
        if set(option) <= columns:
            return
    wanted = " or ".join("{" + ", ".join(repr(c) for c in option) + "}" for option in alternatives)
    raise ValueError(
        f"{trainer}: the {split} dataset has columns {sorted(columns)}, but it needs {wanted}."
    )


class FusedTrainerMixin:
    """Installs the fused head on the policy (under PEFT, on its transformers model) and the reference model.

    Subclasses set ``_fused_outputs``: the per-token fields their loss and metrics read from the policy.
    """

    _fused_outputs: tuple = ()

    def _head_settings(self, outputs: Sequence[str]) -> FusedHeadSettings:
        options = lce_options(self.args)
        return FusedHeadSettings(
            outputs=tuple(outputs),
            impl=options["impl"],
            memory_budget=options["memory_budget"],
            token_chunk=options["token_chunk"],
        )

    def _install_fused_heads(self) -> None:
        policy = unwrap_transformers_model(self.accelerator.unwrap_model(self.model))
        settings = self._head_settings(self._fused_outputs)
        if fused_settings(policy) is None or fused_settings(policy).outputs != settings.outputs:
            install_fused_head(policy, settings)
            check_impl(settings.impl, policy, fused_settings(policy))
        ref = getattr(self, "ref_model", None)
        if ref is not None:
            ref = unwrap_transformers_model(self.accelerator.unwrap_model(ref))
            if fused_settings(ref) is None:
                install_fused_head(ref, self._head_settings(()))
                check_impl(settings.impl, ref, fused_settings(ref))

    @property
    def lce_backend(self) -> str:
        """Name of the backend the fused head runs on for the policy's device and dtype."""
        policy = unwrap_transformers_model(self.accelerator.unwrap_model(self.model))
        return check_impl(lce_options(self.args)["impl"], policy, fused_settings(policy))


@contextlib.contextmanager
def lm_head_adapter_allowed(model, peft_config):
    """Around TRL's ``__init__``: let a LoRA adapter on ``lm_head`` through its refusal (we train it)."""
    if model is None or isinstance(model, str):
        yield
        return
    with allow_lm_head_adapter(model):
        yield


def reference_adapter_context(trainer):
    """The context under which ``trainer.model`` acts as the reference (PEFT without a ref model), else a no-op."""
    from trl.trainer.utils import use_adapter

    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    return contextlib.nullcontext()


def gather_mean(accelerator, values: torch.Tensor) -> float:
    return accelerator.gather(values).mean().item()
