"""Configs of the fused trainers: TRL's configs plus the fused head's options.

Every trainer here also accepts the plain TRL config (``trl.DPOConfig`` and so on); the options below
then take their defaults. ``lce`` stands for "linear + cross-entropy", the fused head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import trl


def _impl_field():
    return field(
        default="auto",
        metadata={
            "help": "Backend of the fused linear + cross-entropy head, from `align_losses.backends.names()`: `'auto'` "
            "picks one for the device (see `align_losses.backends`), or name one (`'torch'`, `'cce'`, `'liger'`). An "
            "unknown name or one that cannot run here fails when the trainer is built. The environment variable "
            "`ALIGN_LOSSES_IMPL` overrides `'auto'`."
        },
    )


def _memory_budget_field():
    return field(
        default=None,
        metadata={
            "help": "Bytes of fp32 tile temporaries the `'torch'` backend may hold at once (vocabulary x token tiles). "
            "`None` uses the backend's default (512 MiB). Smaller values lower peak memory at some speed cost."
        },
    )


def _token_chunk_field():
    return field(
        default=None,
        metadata={
            "help": "Tokens per tile for the `'torch'` backend. `None` lets it choose (all tokens in one block when "
            "the memory budget allows)."
        },
    )


def lce_options(args) -> dict:
    """The fused-head options of any config: a Fused*Config, or a plain TRL config (defaults)."""
    return {
        "impl": getattr(args, "lce_impl", "auto") or "auto",
        "memory_budget": getattr(args, "lce_memory_budget", None),
        "token_chunk": getattr(args, "lce_token_chunk", None),
    }


def _check_lce_numbers(args) -> None:
    budget = getattr(args, "lce_memory_budget", None)
    if budget is not None and int(budget) <= 0:
        raise ValueError(f"`lce_memory_budget` must be a positive number of bytes or None; got {budget}.")
    chunk = getattr(args, "lce_token_chunk", None)
    if chunk is not None and int(chunk) <= 0:
        raise ValueError(f"`lce_token_chunk` must be a positive number of tokens or None; got {chunk}.")
    z = getattr(args, "lce_z_loss", 0.0)
    if z is not None and z < 0:
        raise ValueError(f"`lce_z_loss` must be >= 0; got {z}.")


@dataclass
class FusedDPOConfig(trl.DPOConfig):
    """`trl.DPOConfig` plus the fused head's options.

    Parameters beyond `trl.DPOConfig`:
        lce_impl (`str`, defaults to `"auto"`): backend of the fused head.
        lce_memory_budget (`int`, *optional*): bytes of tile temporaries of the `"torch"` backend.
        lce_token_chunk (`int`, *optional*): tokens per tile of the `"torch"` backend.

    `padding_free=True`, which TRL 1.16 ignores (it warns and pads), is honoured: each batch's chosen and
    rejected sequences are packed into one row with `position_ids` and no attention mask.
    """

    lce_impl: str = _impl_field()
    lce_memory_budget: Optional[int] = _memory_budget_field()
    lce_token_chunk: Optional[int] = _token_chunk_field()

    def __post_init__(self):
        super().__post_init__()
        _check_lce_numbers(self)


@dataclass
class FusedKTOConfig(trl.KTOConfig):
    """`trl.KTOConfig` plus the fused head's options (see `FusedDPOConfig`)."""

    lce_impl: str = _impl_field()
    lce_memory_budget: Optional[int] = _memory_budget_field()
    lce_token_chunk: Optional[int] = _token_chunk_field()

    def __post_init__(self):
        super().__post_init__()
        _check_lce_numbers(self)


@dataclass
class FusedSFTConfig(trl.SFTConfig):
    """`trl.SFTConfig` plus the fused head's options (see `FusedDPOConfig`) and a z-loss.

    Parameters beyond `trl.SFTConfig`:
        lce_z_loss (`float`, defaults to `0.0`): coefficient of the z-loss `logsumexp(z)**2` per token.

    `label_smoothing_factor` runs through the fused head as well (TRL 1.16 runs an extra full-logits pass).
    """

    lce_impl: str = _impl_field()
    lce_memory_budget: Optional[int] = _memory_budget_field()
    lce_token_chunk: Optional[int] = _token_chunk_field()
    lce_z_loss: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the z-loss, `lce_z_loss * logsumexp(logits)**2` added per completion token and "
            "normalised like the NLL (PaLM uses 1e-4). Computed by the fused head, without the logits. `0.0` disables it."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _check_lce_numbers(self)
