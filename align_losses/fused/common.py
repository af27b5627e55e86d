"""The shared pieces every fused loss is built from.

A fused loss is three steps, each a piece of this module:

1. `head_pass`: ONE call of the core (`align_losses.linear_token_stats`) on the hidden states,
   asking only for the per-token outputs the loss and its metrics need, with the per-token values
   laid out per sequence as ``[N, L]`` (`TokenBatch`), whether the rows were padded (``[N, T]``)
   or packed (``[1, T_total]`` + ``cu_seqlens``; `SequenceLayout`).
2. `split_pairs` (chosen rows first, then rejected, as TRL's collators lay them out) or a boolean
   row selection (`TokenBatch.rows`), then per-sequence sums / counts over the masks, handed to the
   functional loss of `align_losses.losses`.
3. metric helpers (`token_mean`, `preference_metrics`, `logits_metrics`) that turn the loss's
   output and the token statistics into TRL's metric names.

`FusedLoss` ties the head options to these steps; each family (`FusedDPOLoss`, ...) only writes
its ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core import linear_token_stats
from ..losses.common import PreferenceOutput

#: Per-token outputs of the core, in `TokenBatch` field order (``logprobs`` is always computed).
_STAT_FIELDS = ("entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2")


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
        shift: labels are the input ids (next-token alignment is done here: position ``t`` scores
            ``labels[t + 1]``), as in TRL's batches. ``False``: labels are already aligned.
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


def shift_left(x: Tensor, fill) -> Tensor:
    """Next-token alignment along the last dim: ``out[..., t] = x[..., t + 1]``, ``fill`` at the last position."""
    return torch.cat([x[..., 1:], torch.full_like(x[..., :1], fill)], dim=-1)


@dataclass(frozen=True)
class SequenceLayout:
    """Where each position of a ``[rows, T]`` label tensor sits in a per-sequence ``[N, L]`` grid.

    Padded rows (``cu_seqlens`` None): each of the ``N`` rows is a sequence, ``L = T``, and
    `arrange` returns its input unchanged. Packed rows (labels ``[1, T_total]``): sequence ``s``
    is ``positions cu_seqlens[s] : cu_seqlens[s + 1]``, ``L`` is the longest sequence, and
    `arrange` scatters each position to ``(s, position - cu_seqlens[s])`` (zeros fill the gaps).
    Building a packed layout reads ``cu_seqlens`` on the host once (one device sync per call when
    it lives on the GPU); everything else is derived from those host-side bounds.
    """

    num_sequences: int
    length: int
    start_mask: Optional[Tensor] = None  # packed: [T_total] bool, True at each non-empty sequence's first position
    destination: Optional[Tensor] = None  # packed: [T_total] int64 flat index into the [N * L] grid

    @staticmethod
    def of(labels: Tensor, cu_seqlens: Optional[Tensor]) -> "SequenceLayout":
        """The layout of ``labels`` (``[N, T]``, or ``[1, T_total]`` with ``cu_seqlens [N + 1]``)."""
        num = sequence_count(labels, cu_seqlens)
        if cu_seqlens is None:
            return SequenceLayout(num_sequences=num, length=labels.shape[1])
        bounds = _host_bounds(cu_seqlens, labels.shape[1])
        total = bounds[-1]
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
        positions = torch.arange(total, device=labels.device)
        # sequence of each position: how many boundaries cu[1:] lie at or before it (skips empty ones)
        sequence = torch.searchsorted(cu[1:], positions, right=True)
        destination = sequence * longest + (positions - cu[sequence])
        # an empty sequence starts where the next one does, or at T_total (dropped by the slice)
        start_mask = positions.new_zeros(total + 1, dtype=torch.bool).index_fill_(0, cu[:-1], True)[:total]
        return SequenceLayout(num, longest, start_mask=start_mask, destination=destination)

    @property
    def packed(self) -> bool:
        return self.destination is not None

    def arrange(self, x: Tensor) -> Tensor:
        """``[N, L]`` per-sequence view of ``x`` shaped like the labels (differentiable)."""
        if not self.packed:
            return x
        flat = x.reshape(-1)
        grid = flat.new_zeros(self.num_sequences * self.length)
        return grid.index_copy(0, self.destination, flat).view(self.num_sequences, self.length)

    def without_sequence_starts(self, labels: Tensor, ignore_index: int) -> Tensor:
        """Packed: ``labels`` with each sequence's first label set to ``ignore_index``.

        Under ``shift`` the last position of one packed sequence would otherwise score the first
        token of the next one; a padded row's first label is never scored, so this makes packed
        and padded batches give the same result (TRL's padding-free collator does the same).
        """
        if not self.packed:
            return labels
        return labels.masked_fill(self.start_mask, ignore_index)


def sequence_count(labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> int:
    """The number of sequences ``N`` of a batch, from shapes alone (no device sync).

    Checks the shapes (``labels [N, T]``, or ``[1, T_total]`` with a 1-D integer ``cu_seqlens
    [N + 1]``) so that a fused loss can check its per-sequence inputs before the head pass;
    `head_pass` checks the boundaries themselves.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            "labels must be [N, T] (padded rows) or [1, T_total] with cu_seqlens (packed rows); "
            f"got shape {shape}"
        )
    if cu_seqlens is None:
        return labels.shape[0]
    if labels.shape[0] != 1:
        raise ValueError(
            f"packed rows (cu_seqlens given) need hidden [1, T_total, D] and labels [1, T_total]; "
            f"got labels of shape {tuple(labels.shape)}"
        )
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of sequence boundaries")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor; got {cu_seqlens.dtype}")
    return cu_seqlens.numel() - 1


def pair_count(labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> int:
    """``B`` of a paired batch of ``2B`` sequences (chosen first), from shapes alone (as `sequence_count`)."""
    return _pairs_of(sequence_count(labels, cu_seqlens))


def _pairs_of(num_sequences: int) -> int:
    if num_sequences == 0 or num_sequences % 2:
        raise ValueError(
            "paired losses need 2B sequences, the B chosen ones first and then the B rejected ones "
            f"(padded [2B, T] rows or cu_seqlens [2B + 1]); got {num_sequences} sequences"
        )
    return num_sequences // 2


def _host_bounds(cu_seqlens: Tensor, total: int) -> list[int]:
    """``cu_seqlens`` read on the host (the layout's one device sync), checked against ``T_total``."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T_total = {total} (labels [1, {total}]); "
            f"got {bounds[0]} ... {bounds[-1]} (trailing padding, labelled ignore_index, belongs to the last sequence)"
        )
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {bounds}")
    return bounds


@dataclass(frozen=True)
class TokenBatch:
    """Per-token outputs of one head pass, per sequence: every tensor is ``[N, L]``.

    Attributes:
        mask: bool, the scored tokens (labels != ignore_index, after the shift).
        completion: bool, the tokens the sequence log-probs sum over: ``mask``, or ``mask`` and a
            caller's ``completion_mask`` (ORPO scores the prompt for its NLL term only).
        logps: float32 log-probabilities of the labels (differentiable), 0 off ``mask``.
        entropy, mean_logit, logsumexp: float32, differentiable; None unless requested.
        argmax_hit, log_sum_p2: float32, detached; None unless requested.
    """

    mask: Tensor
    completion: Tensor
    logps: Tensor
    entropy: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    logsumexp: Optional[Tensor] = None
    argmax_hit: Optional[Tensor] = None
    log_sum_p2: Optional[Tensor] = None

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
        outputs: extra per-token outputs (subset of ``entropy, mean_logit, logsumexp, argmax_hit,
            log_sum_p2``); the log-probs are always computed.
        bias: ``[V]`` head bias.
        cu_seqlens: ``[N + 1]`` integer boundaries of the packed sequences (``0 = c_0 <= ... <= c_N = T_total``).
        completion_mask: optional, shaped like ``labels``, nonzero on the tokens that the
            per-sequence log-probs should cover (aligned like the labels: shifted when ``head.shift``).

    Returns:
        `TokenBatch` with ``N`` sequences.
    """
    layout = SequenceLayout.of(labels, cu_seqlens)
    targets = labels
    if head.shift:
        targets = shift_left(layout.without_sequence_starts(labels, head.ignore_index), head.ignore_index)
    stats = linear_token_stats(
        hidden, weight, targets, outputs=tuple(outputs), bias=bias, ignore_index=head.ignore_index, shift=False,
        temperature=head.temperature, softcap=head.softcap, logit_scale=head.logit_scale, impl=head.impl,
        process_group=head.process_group, backend_options=head.backend_options,
    )
    mask = layout.arrange(targets != head.ignore_index)
    completion = mask
    if completion_mask is not None:
        if completion_mask.shape != labels.shape:
            raise ValueError(
                f"completion_mask must have the labels' shape {tuple(labels.shape)}; got {tuple(completion_mask.shape)}"
            )
        aligned = shift_left(completion_mask != 0, False) if head.shift else completion_mask != 0
        completion = mask & layout.arrange(aligned)
    requested = {name: getattr(stats, name) for name in _STAT_FIELDS}
    per_token = {name: layout.arrange(value) for name, value in requested.items() if value is not None}
    return TokenBatch(mask=mask, completion=completion, logps=layout.arrange(stats.logprobs), **per_token)


def split_pairs(tokens: TokenBatch) -> tuple[TokenBatch, TokenBatch]:
    """``(chosen, rejected)``: the first and the second half of the sequences (``B`` each)."""
    n = tokens.num_sequences
    half = _pairs_of(n)
    return tokens.rows(slice(0, half)), tokens.rows(slice(half, n))


def per_sequence_input(value: Optional[Tensor], name: str, count: int, device: torch.device) -> Optional[Tensor]:
    """Check a caller's ``[count]`` per-sequence tensor (e.g. reference log-probs); cast it to float32 on ``device``.

    Float32 is the dtype of the head pass's sequence log-probs; called before the head pass.
    """
    if value is None:
        return None
    if not isinstance(value, Tensor) or tuple(value.shape) != (count,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a tensor of shape [{count}] (one value per sequence); got {shape}")
    return value.to(device=device, dtype=torch.float32)


def require_reference(*references: Optional[Tensor], reference_free: bool, loss: str) -> None:
    """Reference log-probs must all be given unless the loss was built ``reference_free=True`` (then none).

    ``references``: the reference tensors of one call, e.g. ``(ref_chosen, ref_rejected)`` or ``(ref_logps,)``.
    """
    given = [ref is not None for ref in references]
    if reference_free and any(given):
        raise ValueError(f"{loss} was built with reference_free=True; do not pass reference log-probs")
    if not reference_free and not all(given):
        raise ValueError(
            f"{loss} needs the reference log-probs of every sequence (per-sequence sums over the same tokens, "
            "from the reference model or precomputed), or reference_free=True"
        )


# ----------------------------------------------------------------------------------------------- metrics


def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached ``[]`` mean of ``values`` over the True positions of ``mask`` (0 when there are none)."""
    return torch.where(mask, values.detach(), 0).sum() / mask.sum().clamp(min=1)


def mean(values: Tensor) -> Tensor:
    """Detached ``[]`` float mean of a ``[n]`` tensor."""
    return values.detach().float().mean()


def preference_metrics(result: PreferenceOutput, chosen_logps: Tensor, rejected_logps: Tensor) -> dict[str, Tensor]:
    """TRL's ``rewards/*`` and ``logps/*`` of a paired loss: batch means of its ``[B]`` rewards and log-probs."""
    return {
        "rewards/chosen": mean(result.chosen_rewards),
        "rewards/rejected": mean(result.rejected_rewards),
        "rewards/accuracies": mean(result.reward_accuracies),
        "rewards/margins": mean(result.reward_margins),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }


def logits_metrics(chosen: TokenBatch, rejected: TokenBatch) -> dict[str, Tensor]:
    """TRL's ``logits/chosen``, ``logits/rejected``: the vocabulary-mean logit, averaged over completion tokens."""
    return {
        "logits/chosen": token_mean(chosen.mean_logit, chosen.completion),
        "logits/rejected": token_mean(rejected.mean_logit, rejected.completion),
    }


# ----------------------------------------------------------------------------------------------- base


@dataclass(frozen=True)
class FusedOutput:
    """What a fused loss returns.

    Attributes:
        loss: ``[]`` float32 scalar to back-propagate.
        metrics: TRL metric name -> detached ``[]`` float32 tensor (call ``.item()`` when logging).
        result: the functional loss's own output (`PreferenceOutput`, `ORPOOutput`, `CPOOutput`,
            `KTOOutput` or `SFTOutput`), e.g. for the per-pair rewards.
    """

    loss: Tensor
    metrics: dict
    result: Any


class FusedLoss(nn.Module):
    """Base of the fused losses: head options, which core outputs a call needs, and one `head_pass`.

    Subclasses set ``metric_outputs`` (core outputs only their metrics read), override
    `loss_outputs` when the loss itself needs more than log-probs, and write ``forward``.
    """

    metric_outputs: tuple[str, ...] = ()

    def __init__(self, *, compute_metrics: bool = True, **head):
        super().__init__()
        self.compute_metrics = compute_metrics
        self.head = HeadOptions(**head)

    def loss_outputs(self) -> tuple[str, ...]:
        """Core outputs (beyond log-probs) the loss needs."""
        return ()

    def outputs(self) -> tuple[str, ...]:
        """Core outputs one call asks for: the loss's, plus the metrics' when ``compute_metrics``."""
        wanted = self.loss_outputs() + (self.metric_outputs if self.compute_metrics else ())
        return tuple(dict.fromkeys(wanted))

    def head_pass(self, hidden, weight, labels, *, bias=None, cu_seqlens=None, completion_mask=None) -> TokenBatch:
        return head_pass(
            hidden, weight, labels, head=self.head, outputs=self.outputs(), bias=bias, cu_seqlens=cu_seqlens,
            completion_mask=completion_mask,
        )

    def extra_repr(self) -> str:
        return f"head={self.head}, compute_metrics={self.compute_metrics}"
