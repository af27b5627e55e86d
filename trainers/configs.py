"""Configs of the fused trainers: TRL's configs plus the fused head's options.

Every trainer here also accepts the plain TRL config (``trl.DPOConfig`` and so on); the options below
then take their defaults. ``lce`` stands for "linear + cross-entropy", the fused head.

The options live in one mixin, `LCEOptionsMixin`, that each ``Fused*Config`` lists before the TRL
config it extends (``class FusedDPOConfig(LCEOptionsMixin, trl.DPOConfig)``): its fields then follow
TRL's (all of which have defaults), and its ``__post_init__`` validates them after TRL's own.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

import trl

from align_losses.core import check_size_option
from align_losses.losses.common import check_coefficient
from align_losses.losses.dpo import check_beta


@dataclass
class LCEOptionsMixin:
    """The fused head's options, shared by every ``Fused*Config``.

    Parameters:
        lce_impl (`str`, defaults to `"auto"`): backend of the fused head.
        lce_memory_budget (`int`, *optional*): bytes of tile temporaries of the `"torch"` backend.
        lce_token_chunk (`int`, *optional*): tokens per tile of the `"torch"` backend.
        lce_filter_mass (`float`, *optional*): opt-in filtering backward of the `"triton"` backend.

    Put it first among the bases, before the TRL config: ``class FusedXConfig(LCEOptionsMixin, XConfig)``.
    """

    lce_impl: str = field(
        default="auto",
        metadata={
            "help": "Backend of the fused linear + cross-entropy head, from `align_losses.backends.names()`: `'auto'` "
            "picks one for the device (see `align_losses.backends`), or name one (`'torch'`, `'cce'`, `'liger'`). An "
            "unknown name or one that cannot run here fails when the trainer is built. The environment variable "
            "`ALIGN_LOSSES_IMPL` overrides `'auto'`."
        },
    )
    lce_memory_budget: Optional[int] = field(
        default=None,
        metadata={
            "help": "Bytes of fp32 tile temporaries the `'torch'` backend may hold at once (vocabulary x token tiles). "
            "`None` uses the backend's default (512 MiB). Smaller values lower peak memory at some speed cost."
        },
    )
    lce_token_chunk: Optional[int] = field(
        default=None,
        metadata={
            "help": "Tokens per tile for the `'torch'` backend. `None` lets it choose (all tokens in one block when "
            "the memory budget allows)."
        },
    )

    lce_filter_mass: Optional[float] = field(
        default=None,
        metadata={
            "help": "Turns on the `'triton'` backend's filtering backward: per token, the vocabulary blocks of smallest "
            "probability, at most this share of its probability off the label in total (e.g. `0.00390625` = 2^-8), "
            "are not recomputed, so the backward costs a fraction of the dense one on peaked distributions and each "
            "token's gradient loses at most this share of itself. `None`: the exact backward. Needs a "
            "CUDA GPU with the `'triton'` backend (`'auto'` picks it there) and losses whose gradients flow through "
            "log-probs and logsumexp (z-loss) only, not entropy or mean logit (SFT label smoothing)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_lce_numbers(self)


def lce_options(args) -> dict:
    """The fused-head options of any config: a Fused*Config, or a plain TRL config (defaults)."""
    return {
        "impl": getattr(args, "lce_impl", "auto") or "auto",
        "memory_budget": getattr(args, "lce_memory_budget", None),
        "token_chunk": getattr(args, "lce_token_chunk", None),
        "filter_mass": getattr(args, "lce_filter_mass", None),
    }


def check_lce_numbers(args) -> None:
    """Fail on an ``lce_impl`` that is not a non-empty string, an ``lce_memory_budget``/``lce_token_chunk`` that
    is not a positive int, an ``lce_filter_mass`` outside (0, 1) or an ``lce_z_loss`` that is not a finite
    number >= 0; each message names the value given."""
    impl = getattr(args, "lce_impl", "auto")
    if not isinstance(impl, str) or not impl:
        raise ValueError(f"`lce_impl` must be 'auto' or a backend name (align_losses.backends.names()); got {impl!r}.")
    for key in ("memory_budget", "token_chunk"):  # the core's rule for these backend options
        check_size_option(key, getattr(args, f"lce_{key}", None), name=f"`lce_{key}`")
    mass = getattr(args, "lce_filter_mass", None)
    if mass is not None:
        if isinstance(mass, bool) or not isinstance(mass, numbers.Real) or not 0.0 < mass < 1.0:
            raise ValueError(f"`lce_filter_mass` must be a probability in (0, 1) or None; got {mass!r}.")
    z = getattr(args, "lce_z_loss", 0.0)
    if z is not None:
        check_coefficient(z, "lce_z_loss")
    beta = getattr(args, "beta", None)
    if beta is not None:
        losses = getattr(args, "loss_type", None)
        check_beta(beta, [losses] if isinstance(losses, str) else list(losses or ()))
    for name in ("desirable_weight", "undesirable_weight"):
        if getattr(args, name, None) is not None:
            check_coefficient(getattr(args, name), name)


@dataclass
class FusedDPOConfig(LCEOptionsMixin, trl.DPOConfig):
    """`trl.DPOConfig` plus the fused head's options (`LCEOptionsMixin`: ``lce_impl``, ``lce_memory_budget``,
    ``lce_token_chunk``, ``lce_filter_mass``).

    `padding_free=True`, which TRL 1.16 ignores (it warns and pads), is honoured: each batch's chosen and
    rejected sequences are packed into one row with `position_ids` and no attention mask.
    """


@dataclass
class FusedKTOConfig(LCEOptionsMixin, trl.KTOConfig):
    """`trl.KTOConfig` plus the fused head's options (see `LCEOptionsMixin`)."""


@dataclass
class FusedSFTConfig(LCEOptionsMixin, trl.SFTConfig):
    """`trl.SFTConfig` plus the fused head's options (see `LCEOptionsMixin`) and a z-loss.

    Parameters beyond `trl.SFTConfig` and `LCEOptionsMixin`:
        lce_z_loss (`float`, defaults to `0.0`): coefficient of the z-loss `logsumexp(z)**2` per token.

    `label_smoothing_factor` runs through the fused head as well (TRL 1.16 runs an extra full-logits pass).
    """

    lce_z_loss: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the z-loss, `lce_z_loss * logsumexp(logits)**2` added per completion token and "
            "normalised like the NLL (PaLM uses 1e-4). Computed by the fused head, without the logits. `0.0` disables it."
        },
    )
