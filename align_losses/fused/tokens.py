"""Per-token values laid out per sequence (`TokenBatch`), from hidden states (`head_pass`) or from a caller.

`TokenBatch` is what every "per-token log-probs -> loss" function of `align_losses.fused` reads.
The fused losses fill it with `head_pass` (one core call on the hidden states); the trainers fill
it from their model's fused forward (`TokenBatch.of`), whose per-token outputs come from the same core.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..core import STATS, linear_token_stats
from ..losses import check_ld_alpha, ld_sequence_logps, sequence_logps
from .layout import SequenceLayout, pair_count, pairs_of


@dataclass(frozen=True)
class TokenBatch:
    """Per-token values of a batch, per sequence: every tensor is ``[N, L]``, with the core's names.

    Position ``j`` of sequence ``s`` holds the values of the token scored there (after the
    next-token shift, when there is one).

    Attributes:
        mask: bool, the scored tokens (labels != ignore_index).
        completion: bool, the tokens the sequence log-probs sum over: ``mask``, or ``mask`` and a
            caller's completion mask (ORPO scores the prompt for its NLL term only).
        logprobs: float32 log-probabilities of the labels (differentiable), 0 off ``mask``.
        entropy, mean_logit, logsumexp: float32, differentiable; None unless requested.
        argmax_hit: float32 1/0 from the core (bool from a model's fused forward), detached; None unless requested.
        log_sum_p2: float32 ``log sum_v p_v^2``, detached; None unless requested.
    """

    mask: Tensor
    completion: Tensor
    logprobs: Tensor
    entropy: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    logsumexp: Optional[Tensor] = None
    argmax_hit: Optional[Tensor] = None
    log_sum_p2: Optional[Tensor] = None

    @staticmethod
    def of(
        layout: SequenceLayout,
        mask: Tensor,
        values: Mapping[str, Optional[Tensor]],
        *,
        completion: Optional[Tensor] = None,
        shifted: bool = True,
    ) -> "TokenBatch":
        """Lay out per-token tensors shaped like ``mask`` (``[rows, W]``) per sequence.

        Args:
            layout: the batch's `SequenceLayout`.
            mask: the scored tokens, any dtype (nonzero = scored).
            values: ``logprobs`` and any of `align_losses.core.STATS` (None entries are skipped).
            completion: the tokens the sequence log-probs cover, shaped like ``mask`` (default: ``mask``).
            shifted: the tensors hold next-token values (``W = T - 1``), as `SequenceLayout.arrange`.
        """
        def arrange(x: Tensor) -> Tensor:
            return layout.arrange(x, shifted=shifted)

        scored = arrange(mask != 0)
        covered = scored if completion is None else scored & arrange(completion != 0)
        present = {name: arrange(value) for name, value in values.items() if value is not None}
        return TokenBatch(mask=scored, completion=covered, **present)

    @property
    def num_sequences(self) -> int:
        return self.mask.shape[0]

    @property
    def lengths(self) -> Tensor:
        """``[N]`` int64 completion token count of each sequence."""
        return self.completion.sum(dim=-1)

    def rows(self, index) -> "TokenBatch":
        """The sequences picked by ``index`` (a slice, a ``[N]`` bool mask or an index tensor)."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: value[index] for name, value in picked.items() if value is not None})


def split_pairs(tokens: TokenBatch) -> tuple[TokenBatch, TokenBatch]:
    """``(chosen, rejected)``: the first and the second half of the sequences (``B`` each)."""
    n = tokens.num_sequences
    half = pairs_of(n)
    return tokens.rows(slice(0, half)), tokens.rows(slice(half, n))


def pair_sequence_logps(
    chosen: TokenBatch, rejected: TokenBatch, ld_alpha: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    """``([B], [B])`` sequence log-probs of pairs: completion sums, or LD-DPO weighted with ``ld_alpha``."""
    if ld_alpha is None:
        return (
            sequence_logps(chosen.logprobs, chosen.completion),
            sequence_logps(rejected.logprobs, rejected.completion),
        )
    return ld_sequence_logps(
        chosen.logprobs, chosen.completion, rejected.logprobs, rejected.completion, ld_alpha=ld_alpha
    )


# ----------------------------------------------------------------------------------------------- from hidden states


@dataclass(frozen=True)
class HeadOptions:
    """How the core evaluates the head ``z = transform(hidden @ weight.T + bias)``.

    Every fused loss takes these as keyword arguments (``**head``); see
    `align_losses.linear_token_stats` for the transform.

    Attributes:
        impl: ``"auto"`` or a backend name: ``"triton"`` (the CUDA default), ``"torch"`` (alias
            ``"pytorch"``), ``"cce"``, ``"liger"``. ``"auto"`` runs ``"triton"`` on CUDA when it
            supports the call and ``"torch"`` otherwise (e.g. with ``backend_options["token_chunk"]``,
            a torch-only option); a backend named explicitly that does not support an option
            raises ValueError.
        ignore_index: label value of tokens that are not scored (prompt, padding).
        shift: labels are the input ids (next-token alignment is done by the core: position ``t``
            scores ``labels[t + 1]``), as in TRL's batches. ``False``: labels are already aligned.
        temperature, softcap, logit_scale: the logit transform (Gemma-2 softcap, Cohere logit scale).
        backend_options: backend settings, e.g. ``{"token_chunk": 4096}`` for ``"torch"``.
        process_group: for a vocabulary-parallel head (weight is this rank's ``[V_local, D]`` shard).
    """

    impl: str = "auto"
    ignore_index: int = -100
    shift: bool = True
    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    backend_options: Optional[Mapping] = None
    process_group: Any = None


def head_pass(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    head: HeadOptions,
    outputs: Sequence[str] = (),
    bias: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    completion_mask: Optional[Tensor] = None,
) -> TokenBatch:
    """Run the core once and lay its per-token outputs out per sequence.

    Args:
        hidden: ``[N, T, D]`` padded rows, or ``[1, T_total, D]`` packed rows (fp32/bf16/fp16).
        weight: ``[V, D]`` output embedding (same dtype as ``hidden`` outside autocast).
        labels: integer ``[N, T]`` / ``[1, T_total]``: token ids, ``head.ignore_index`` where not scored.
        head: the `HeadOptions`.
        outputs: extra per-token outputs (subset of `align_losses.core.STATS`); the log-probs are always computed.
        bias: ``[V]`` head bias.
        cu_seqlens: ``[N + 1]`` integer boundaries of the packed sequences (``0 = c_0 <= ... <= c_N = T_total``).
        completion_mask: optional, shaped like ``labels``, nonzero on the tokens that the
            per-sequence log-probs should cover (aligned like the labels).

    Returns:
        `TokenBatch` with ``N`` sequences, ``L - 1`` positions under ``head.shift`` (``L`` without).
    """
    layout = SequenceLayout.of(labels, cu_seqlens)
    if completion_mask is not None and completion_mask.shape != labels.shape:
        raise ValueError(
            f"completion_mask must have the labels' shape {tuple(labels.shape)}; got {tuple(completion_mask.shape)}"
        )
    if head.shift:
        labels = layout.without_sequence_starts(labels, head.ignore_index)
    stats = linear_token_stats(
        hidden, weight, labels, outputs=tuple(outputs), bias=bias, ignore_index=head.ignore_index, shift=head.shift,
        temperature=head.temperature, softcap=head.softcap, logit_scale=head.logit_scale, impl=head.impl,
        process_group=head.process_group, backend_options=head.backend_options,
    )
    values = {name: getattr(stats, name) for name in ("logprobs", *STATS)}
    if head.shift:  # position t scores labels[t + 1]; the last position scores nothing
        values = {name: None if value is None else value[..., :-1] for name, value in values.items()}
        labels = labels[..., 1:]
        completion_mask = None if completion_mask is None else completion_mask[..., 1:]
    return TokenBatch.of(layout, labels != head.ignore_index, values, completion=completion_mask, shifted=head.shift)


def fused_sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    average: bool = False,
    ld_alpha: Optional[float] = None,
    **head,
) -> Tensor:
    """Per-sequence log-probs from hidden states in one fused pass, e.g. for reference models or KTO's KL term.

    Args:
        hidden, weight, labels, bias, cu_seqlens: as the fused losses (padded ``[N, T, D]`` or packed).
        average: per-token mean instead of the sum (ORPO/SimPO style).
        ld_alpha: LD-DPO weighting of a paired batch (``N = 2B``, chosen first), as `FusedDPOLoss`.
        **head: `HeadOptions`.

    Returns:
        ``[N]`` float32, differentiable (wrap in ``torch.no_grad()`` for a reference).
    """
    if ld_alpha is not None:
        if average:
            raise ValueError("ld_alpha weights summed log-probs; it cannot be combined with average=True")
        check_ld_alpha(ld_alpha)
        pair_count(labels, cu_seqlens)
    tokens = head_pass(hidden, weight, labels, head=HeadOptions(**head), bias=bias, cu_seqlens=cu_seqlens)
    if ld_alpha is None:
        return sequence_logps(tokens.logprobs, tokens.completion, average=average)
    return torch.cat(pair_sequence_logps(*split_pairs(tokens), ld_alpha=ld_alpha))
