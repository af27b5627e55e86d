"""Per-token softmax statistics of a head, accumulated over the vocabulary in blocks.

`Stats` holds each token's running max, sum of exponentials and what the requested outputs need
(fp32 ``[M]`` each), folds in one tile of logits at a time (`Stats.update`, the ``"torch"``
backend's forward, with `LabelBlocks` for the labels' places) or takes the merged partials of a
kernel (the ``"triton"`` backend's), and merges the shards of a vocabulary-parallel head
(`Stats.all_reduce`). `finish_outputs` turns merged
statistics into the per-token outputs of `align_losses.problem.OUTPUTS`. Pure PyTorch; both
backends' ops import it, so their outputs come from one formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Stats:
    """Per-token running statistics over the vocabulary seen so far (fp32 ``[M]`` each).

    ``sum_exp`` and the other sums are taken relative to ``max``: ``sum_exp = sum exp(z - max)``,
    and ``sum_exp_z`` relative to it twice, so that a large offset common to a token's logits
    cancels exactly (with ``sum exp(z - max) * z``, an offset of 500 cost the entropy up to 8e-4).
    """

    max: torch.Tensor
    sum_exp: torch.Tensor
    label_logit: torch.Tensor
    sum_exp_z: Optional[torch.Tensor]  # sum exp(z - max) * (z - max), for the entropy
    sum_z: Optional[torch.Tensor]  # for the mean logit
    sum_exp2: Optional[torch.Tensor]  # sum exp(2 (z - max)), for log sum p^2
    argmax: Optional[torch.Tensor]  # int64 global vocabulary index of the first maximum

    @staticmethod
    def empty(m: int, device: torch.device, outputs: frozenset) -> "Stats":
        def zeros():
            return torch.zeros(m, dtype=torch.float32, device=device)

        need_entropy = "entropy" in outputs
        return Stats(
            max=torch.full((m,), -math.inf, dtype=torch.float32, device=device),
            sum_exp=zeros(),
            label_logit=zeros(),
            sum_exp_z=zeros() if need_entropy else None,
            sum_z=zeros() if "mean_logit" in outputs else None,
            sum_exp2=zeros() if "log_sum_p2" in outputs else None,
            argmax=torch.zeros(m, dtype=torch.int64, device=device) if "argmax_hit" in outputs else None,
        )

    def expected_z(self) -> Optional[torch.Tensor]:
        """``E_p[z]`` per token (None without ``sum_exp_z``)."""
        return self.max + self.sum_exp_z / self.sum_exp if self.sum_exp_z is not None else None

    def update(self, rows: slice, z: torch.Tensor, vocab_offset: int, labels: "LabelBlocks", block: int) -> None:
        """Fold the tile ``z [rows, block]`` (vocabulary ids from ``vocab_offset``, block number ``block`` of the
        walk that ``labels`` describes) into the stats.

        ``z`` is consumed: without the entropy (whose sum needs ``z - max`` beside ``exp(z - max)``) its memory
        holds ``exp(z - max)``, so that the tile costs no fp32 copy of itself. Each step is one kernel where it
        can be, updating the stats in place: a vocabulary block's host time is its launches (see `LabelBlocks`)."""
        picked = z.gather(1, labels.columns(rows, z.shape[1])).squeeze(1)
        self.label_logit[rows].add_(torch.where(labels.in_block(rows, block), picked, 0.0))  # a view: in place
        if self.sum_z is not None:
            self.sum_z[rows].add_(z.sum(dim=1))
        if self.argmax is not None:
            block_max, block_arg = z.max(dim=1)
        else:
            block_max = z.amax(dim=1)
        old_max = self.max[rows]
        new_max = torch.maximum(old_max, block_max)
        if self.argmax is not None:
            # Blocks arrive in increasing vocabulary order: only a strictly larger maximum moves
            # the argmax, so ties keep the first index.
            moved = block_max > old_max
            self.argmax[rows] = torch.where(moved, block_arg + vocab_offset, self.argmax[rows])
        # Logits of -inf only so far (a bias that masks part of the vocabulary): shift by the lowest finite
        # value, not -inf, so that z - shift is -inf there (exp 0), not NaN, and the rescale exp(-inf) = 0.
        shift_to = new_max.clamp_min(torch.finfo(new_max.dtype).min)
        rescale = torch.sub(old_max, shift_to).exp_()
        keep_z_rel = self.sum_exp_z is not None  # the entropy's sum needs z - max beside exp(z - max)
        z_rel = z.sub_(shift_to[:, None])
        p = torch.exp(z_rel) if keep_z_rel else z_rel.exp_()
        if keep_z_rel:
            moved = _shift_sums(self.sum_exp_z[rows], self.sum_exp[rows], old_max - shift_to, rescale)
            z_rel.clamp_(min=torch.finfo(z_rel.dtype).min)  # where z = -inf, p = 0: adds 0, not NaN
            self.sum_exp_z[rows] = moved + torch.einsum("ij,ij->i", p, z_rel)  # row-wise dots: no product tile
        del z_rel
        self.sum_exp[rows].mul_(rescale).add_(p.sum(dim=1))
        if self.sum_exp2 is not None:
            self.sum_exp2[rows].mul_(rescale * rescale).add_(torch.einsum("ij,ij->i", p, p))
        self.max[rows] = new_max

    def all_reduce(self, group) -> None:
        """Merge the statistics of every rank's vocabulary shard (for a vocabulary-parallel head)."""
        import torch.distributed as dist

        global_max = self.max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescale = torch.exp(self.max - global_max)
        rescale = torch.nan_to_num(rescale, nan=0.0)  # an empty shard has max -inf
        sums = [self.sum_exp * rescale, self.label_logit]
        if self.sum_exp_z is not None:
            sums.append(_shift_sums(self.sum_exp_z, self.sum_exp, self.max - global_max, rescale))
        if self.sum_z is not None:
            sums.append(self.sum_z)
        if self.sum_exp2 is not None:
            sums.append(self.sum_exp2 * rescale * rescale)
        stacked = torch.stack(sums)
        dist.all_reduce(stacked, group=group)
        merged = iter(stacked.unbind(0))
        self.sum_exp = next(merged)
        self.label_logit = next(merged)
        if self.sum_exp_z is not None:
            self.sum_exp_z = next(merged)
        if self.sum_z is not None:
            self.sum_z = next(merged)
        if self.sum_exp2 is not None:
            self.sum_exp2 = next(merged)
        if self.argmax is not None:
            # The first maximum overall: the smallest index among ranks that hold the global max.
            big = torch.iinfo(torch.int64).max
            candidate = torch.where(self.max == global_max, self.argmax, torch.full_like(self.argmax, big))
            dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
            self.argmax = candidate
        self.max = global_max


def _shift_sums(sum_exp_z: torch.Tensor, sum_exp: torch.Tensor, shift: torch.Tensor,
                rescale: torch.Tensor) -> torch.Tensor:
    """``sum exp(z - m) (z - m)`` re-based from the max ``m`` to ``m - shift`` (``rescale = exp(shift)``);
    0 where nothing was summed yet (``m = -inf``)."""
    return torch.where(rescale > 0, (sum_exp_z + shift * sum_exp) * rescale, torch.zeros_like(sum_exp_z))


def finish_outputs(stats: Stats, outputs: frozenset, vocab: int, labels: torch.Tensor) -> dict:
    """The per-token outputs named in ``outputs`` (plus ``logprobs``), fp32 ``[M]`` each, from the
    statistics merged over the whole vocabulary of ``vocab`` ids; ``labels`` int64 ``[M]`` global ids."""
    lse = stats.max + torch.log(stats.sum_exp)
    result = {"logprobs": stats.label_logit - lse}
    if "logsumexp" in outputs:
        result["logsumexp"] = lse
    if "entropy" in outputs:
        result["entropy"] = torch.log(stats.sum_exp) - stats.sum_exp_z / stats.sum_exp
    if "mean_logit" in outputs:
        result["mean_logit"] = stats.sum_z / vocab
    if "log_sum_p2" in outputs:
        result["log_sum_p2"] = torch.log(stats.sum_exp2) - 2.0 * torch.log(stats.sum_exp)
    if "argmax_hit" in outputs:
        result["argmax_hit"] = (stats.argmax == labels).float()
    return result


@dataclass(frozen=True)
class LabelBlocks:
    """Where each token's label lies in a walk over the vocabulary in blocks of ``size`` ids, found once per call:
    a block then finds its tokens with one compare (`in_block`) and their label columns with at most one clamp
    (`columns`), instead of a subtract, two compares, an and and a clamp per block. On a GPU the walk's host time
    is its launches, and a vocabulary of 152k ids in blocks of 5440 is 28 blocks a pass."""

    block: torch.Tensor  # int64 [M]: the number of the block holding the token's label; -1 outside the ids walked
    column: torch.Tensor  # int64 [M, 1]: the label's column in that block (0 .. size - 1); 0 outside
    size: int  # ids per block (the last block may be shorter)

    @staticmethod
    def of(labels: torch.Tensor, first: int, vocab: int, size: int) -> "LabelBlocks":
        """For ``labels`` int64 ``[M]`` (global ids) and blocks of ``size`` ids from ``first`` up to ``first + vocab``
        (a vocabulary shard's ids; labels outside them are in no block)."""
        local = labels - first
        inside = (local >= 0) & (local < vocab)
        block = torch.where(inside, local.div(max(size, 1), rounding_mode="floor"), -1)
        column = torch.where(inside, local - block * size, 0)
        return LabelBlocks(block, column[:, None], size)

    @property
    def inside(self) -> torch.Tensor:
        """bool ``[M]``: whether the token's label is among the ids walked."""
        return self.block >= 0

    def in_block(self, rows: slice, block: int) -> torch.Tensor:
        """bool ``[T]``: whether each token of ``rows`` is labelled inside block number ``block``."""
        return self.block[rows] == block

    def columns(self, rows: slice, width: int) -> torch.Tensor:
        """int64 ``[T, 1]``: the tokens' label columns, valid indices into a block of ``width`` columns (clamped
        where the block is shorter than ``size``, so that tokens labelled in other blocks stay in range)."""
        column = self.column[rows]
        return column if width >= self.size else column.clamp(max=max(width - 1, 0))
