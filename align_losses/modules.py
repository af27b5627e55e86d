"""`LinearCrossEntropyLoss`: a drop-in ``nn.Module`` for ``cross_entropy(lm_head(hidden), labels)`` without logits."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .core import check_head_arguments, linear_token_stats
from .losses import check_sft_args, sft_outputs, sft_token_losses

REDUCTIONS = ("mean", "sum", "none")


class LinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of a linear output head, computed by the fused core (no ``[tokens, V]`` logits).

    Equals ``F.cross_entropy(output_embeddings(hidden_states).flatten(0, -2), labels.flatten(),
    ignore_index=..., reduction=..., label_smoothing=...)`` plus ``z_loss * logsumexp**2`` per token.

    The module keeps a reference to ``output_embeddings`` (an ``nn.Linear``, or any module with a
    ``.weight [V, D]`` and optional ``.bias [V]``) and reads ``.weight`` / ``.bias`` at every call,
    so FSDP or PEFT replacing the parameters is seen; it does not register it as a submodule (its
    parameters belong to the model: no duplicate ``state_dict`` entries, ``.to()`` leaves it alone).

    Args:
        output_embeddings: the model's output embedding module (``model.get_output_embeddings()``).
        impl: core backend: ``"auto"``, ``"triton"`` (the CUDA default), ``"torch"`` (alias
            ``"pytorch"``), ``"cce"``, ``"liger"``. ``"auto"`` runs ``"triton"`` on CUDA when it
            supports the call and ``"torch"`` otherwise.
        chunk_size: tokens per chunk of the ``"torch"`` backend (``backend_options["token_chunk"]``);
            a torch-only option: ``"auto"`` then runs ``"torch"``, and any other backend named
            explicitly rejects it with a ValueError.
        ignore_index: label value of tokens that are not scored.
        shift: position ``t`` scores ``labels[..., t + 1]`` (labels are the input ids); the last
            position scores nothing.
        reduction: "mean" (over the scored tokens; 0 when there are none, where ``F.cross_entropy``
            gives NaN), "sum", or "none" (per-token ``[...]`` shaped like ``labels``, 0 where not scored).
        label_smoothing: eps in [0, 1], as ``F.cross_entropy(label_smoothing=eps)``.
        z_loss: coefficient of the per-token ``logsumexp(logits)**2`` regulariser.
        temperature, softcap, logit_scale, backend_options: see `align_losses.linear_token_stats`.

    Forward ``(hidden_states [..., D], labels [...] int, *, num_items_in_batch=None)``; with
    "mean", ``num_items_in_batch`` (int or ``[]`` tensor) replaces the token count as the divisor.
    Returns a float32 ``[]`` loss (``[...]`` for "none"). The per-token smoothing / z-loss math is
    `align_losses.losses.sft_token_losses`'s.
    """

    def __init__(
        self,
        output_embeddings: nn.Module,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
        ignore_index: int = -100,
        shift: bool = False,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        *,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        logit_scale: float = 1.0,
        backend_options: Optional[Mapping] = None,
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        check_sft_args("nll", label_smoothing, z_loss)
        check_head_arguments(
            ignore_index=ignore_index, shift=shift, impl=impl, temperature=temperature, softcap=softcap,
            logit_scale=logit_scale, backend_options=backend_options,
        )
        options = dict(backend_options or {})
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
            if options.get("token_chunk", chunk_size) != chunk_size:
                raise ValueError("chunk_size and backend_options['token_chunk'] disagree; give one of them")
            options["token_chunk"] = chunk_size
        # A plain attribute, not a submodule: see the class docstring.
        object.__setattr__(self, "_output_embeddings", output_embeddings)
        self.impl, self.chunk_size, self.ignore_index, self.shift = impl, chunk_size, ignore_index, shift
        self.reduction, self.label_smoothing, self.z_loss = reduction, label_smoothing, z_loss
        self.temperature, self.softcap, self.logit_scale = temperature, softcap, logit_scale
        self.backend_options = options or None

    @property
    def output_embeddings(self) -> nn.Module:
        return self._output_embeddings

    def _head(self) -> tuple[Tensor, Optional[Tensor]]:
        weight = getattr(self._output_embeddings, "weight", None)
        if weight is None:
            raise ValueError(f"output_embeddings ({type(self._output_embeddings).__name__}) has no `.weight`")
        return weight, getattr(self._output_embeddings, "bias", None)

    def forward(self, hidden_states: Tensor, labels: Tensor, *, num_items_in_batch=None) -> Tensor:
        if num_items_in_batch is not None and self.reduction != "mean":
            raise ValueError(f"num_items_in_batch is the divisor of reduction='mean'; not used by {self.reduction!r}")
        weight, bias = self._head()
        stats = linear_token_stats(
            hidden_states, weight, labels, outputs=sft_outputs(self.label_smoothing, self.z_loss), bias=bias,
            ignore_index=self.ignore_index, shift=self.shift, temperature=self.temperature, softcap=self.softcap,
            logit_scale=self.logit_scale, impl=self.impl, backend_options=self.backend_options,
        )
        # The core gives 0 (and no gradient) at the tokens it does not score, so these are 0 there too.
        losses = sft_token_losses(
            stats.logprobs, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            mean_logit=stats.mean_logit, logsumexp=stats.logsumexp,
        )
        if self.reduction == "none":
            return losses
        total = losses.sum()
        if self.reduction == "sum":
            return total
        if num_items_in_batch is None:
            # the scored labels: with shift, position t scores labels[..., t + 1], so the first is never scored
            scored = labels[..., 1:] if self.shift else labels
            num_items_in_batch = (scored != self.ignore_index).sum()
        return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)

    def extra_repr(self) -> str:
        return (
            f"impl={self.impl!r}, chunk_size={self.chunk_size}, ignore_index={self.ignore_index}, shift={self.shift}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}"
        )
