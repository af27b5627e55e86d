"""Float64 full-logits references, written independently of `align_losses` (materialising logits is the point)."""

from __future__ import annotations

from typing import Optional

import torch


def full_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[..., V]`` float64 logits after the documented transforms."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_stats(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift: bool = False) -> dict:
    """Every per-token output of the core from full logits ``z [..., V]``, zero where ignored."""
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
    keep = labels != ignore_index
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    first_max = z.argmax(dim=-1)  # torch returns the first maximal index
    values = {
        "logprobs": logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1),
        "entropy": -(p * logp).sum(-1),
        "mean_logit": z.mean(-1),
        "logsumexp": torch.logsumexp(z, dim=-1),
        "argmax_hit": (first_max == labels).to(z.dtype),
        "log_sum_p2": torch.logsumexp(2 * logp, dim=-1),
    }
    return {k: torch.where(keep, v, torch.zeros_like(v)) for k, v in values.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm of the difference, ``|a - b| / |b|`` (absolute when ``b`` is zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many bf16 steps apart ``a`` and ``b`` (bf16, finite) are, counted across zero (both zeros
    are one value): the bit patterns mapped to integers in the values' order."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()
