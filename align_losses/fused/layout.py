"""Where the tokens of a batch sit per sequence: padded rows, or sequences packed into one row.

A batch's per-token tensors are ``[N, T]`` (padded: each row is a sequence) or ``[1, T_total]``
(packed: sequence ``s`` is positions ``cu_seqlens[s] : cu_seqlens[s + 1]``). `SequenceLayout`
turns either into a per-sequence ``[N, L]`` grid, for tensors aligned with the inputs and for
next-token values (position ``t`` scores token ``t + 1``; ``[rows, T - 1]``, the layout of the
core's per-token outputs under ``shift``, with the last position cut). Both the fused losses (from
hidden states) and the trainers (from the model's fused forward) lay their per-token values out here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SequenceLayout:
    """Where each position of a ``[rows, T]`` tensor sits in a per-sequence ``[N, L]`` grid.

    Padded rows (``cu_seqlens`` None): each of the ``N`` rows is a sequence, ``L = T``, and
    `arrange` returns its input unchanged. Packed rows (``[1, T_total]``): ``L`` is the longest
    sequence and `arrange` scatters each position to ``(s, position - cu_seqlens[s])`` (zeros fill
    the gaps). Building a packed layout reads ``cu_seqlens`` on the host once (one device sync per
    call when it lives on the GPU); everything else is derived from those host-side bounds.
    """

    num_sequences: int
    length: int
    start_mask: Optional[Tensor] = None  # packed: [T_total] bool, True at each non-empty sequence's first position
    destination: Optional[Tensor] = None  # packed: [T_total] int64 flat index into the [N * L] grid
    # packed: [T_total - 1] int64 flat index of next-token position p into the [N * (L - 1)] grid, or N * (L - 1)
    # (a slot past the grid, dropped) where token p + 1 starts another sequence
    shifted_destination: Optional[Tensor] = None

    @staticmethod
    def of(labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> "SequenceLayout":
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
        offset = positions - cu[sequence]
        # an empty sequence starts where the next one does, or at T_total (dropped by the slice)
        start_mask = positions.new_zeros(total + 1, dtype=torch.bool).index_fill_(0, cu[:-1], True)[:total]
        # next-token values: position p scores p + 1, which belongs to p's sequence unless it starts one
        width = max(longest - 1, 0)
        inside = ~start_mask[1:]
        shifted = torch.where(inside, sequence[:-1] * width + offset[:-1], num * width)
        return SequenceLayout(
            num, longest, start_mask=start_mask, destination=sequence * longest + offset, shifted_destination=shifted
        )

    @property
    def packed(self) -> bool:
        return self.destination is not None

    def arrange(self, x: Tensor, *, shifted: bool = False) -> Tensor:
        """The per-sequence view of ``x`` (differentiable; any dtype).

        ``shifted=False``: ``x`` is aligned with the labels (``[N, T]`` / ``[1, T_total]``) -> ``[N, L]``.
        ``shifted=True``: ``x`` holds next-token values (``[N, T - 1]`` / ``[1, T_total - 1]``, position
        ``t`` scoring token ``t + 1``) -> ``[N, L - 1]``; in a packed row the value at each sequence's
        last position (which scores the next sequence's first token) is dropped.
        """
        if not self.packed:
            return x
        flat = x.reshape(-1)
        if not shifted:
            grid = flat.new_zeros(self.num_sequences * self.length)
            return grid.index_copy(0, self.destination, flat).view(self.num_sequences, self.length)
        width = max(self.length - 1, 0)
        grid = flat.new_zeros(self.num_sequences * width + 1)  # + the slot of the dropped positions
        grid = grid.index_copy(0, self.shifted_destination, flat)
        return grid[:-1].view(self.num_sequences, width)

    def without_sequence_starts(self, labels: Tensor, ignore_index: int) -> Tensor:
        """Packed: ``labels`` with each sequence's first label set to ``ignore_index``.

        Under a next-token shift the last position of one packed sequence would otherwise score the
        first token of the next one; a padded row's first label is never scored, so this makes packed
        and padded batches give the same result (TRL's padding-free collator does the same).
        """
        if not self.packed:
            return labels
        return labels.masked_fill(self.start_mask, ignore_index)


def cu_seqlens_of(lengths: Tensor) -> Tensor:
    """``[N + 1]`` int64 sequence boundaries ``0, l_0, l_0 + l_1, ...`` of ``[N]`` sequence lengths."""
    return F.pad(lengths.to(torch.int64).cumsum(0), (1, 0))


def sequence_count(labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> int:
    """The number of sequences ``N`` of a batch, from shapes alone (no device sync).

    Checks the shapes (``labels [N, T]``, or ``[1, T_total]`` with a 1-D integer ``cu_seqlens
    [N + 1]``) so that a fused loss can check its per-sequence inputs before the head pass;
    `SequenceLayout.of` checks the boundaries themselves.
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
        given = f"shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [N + 1] of sequence boundaries (N >= 1); got {given}"
        )
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor; got {cu_seqlens.dtype}")
    return cu_seqlens.numel() - 1


def pair_count(labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> int:
    """``B`` of a paired batch of ``2B`` sequences (chosen first), from shapes alone (as `sequence_count`)."""
    return pairs_of(sequence_count(labels, cu_seqlens))


def pairs_of(num_sequences: int) -> int:
    """``B`` of ``2B`` sequences (the B chosen ones first); ValueError for an odd or zero count."""
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
