"""Per-token softmax statistics of a head, accumulated over the vocabulary in blocks.

`Stats` holds each token's running max, sum of exponentials and what the requested outputs need
(fp32 ``[M]`` each), takes the tile-by-tile updates of the ``"torch"`` backend's forward
(`align_losses.ops.tiles.fold_tile`, on the `RowStats` of some tokens) or the merged partials of a
kernel (the ``"triton"`` backend's), and merges the shards of a vocabulary-parallel head
(`Stats.all_reduce`). `finish_outputs` turns merged statistics into the per-token outputs of
`align_losses.problem.OUTPUTS`. Pure PyTorch; both backends' ops import it, so their outputs come
from one formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class RowStats(NamedTuple):
    """The fields of `Stats` for some tokens (``[T]`` each, None where `Stats` has None): what the
    ``"torch"`` backend's pure tile function (`align_losses.ops.tiles.fold_tile`) takes and returns."""

    max: torch.Tensor
    sum_exp: torch.Tensor
    label_logit: torch.Tensor
    sum_exp_z: Optional[torch.Tensor]
    sum_z: Optional[torch.Tensor]
    sum_exp2: Optional[torch.Tensor]
    argmax: Optional[torch.Tensor]


def covers(rows: slice, n: int) -> bool:
    """Whether the slice ``rows`` (step 1) takes all ``n`` rows."""
    return (rows.start or 0) == 0 and (rows.stop is None or rows.stop >= n)


def rows_of(values: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    """``values[rows]``, or ``values`` itself when ``rows`` are all of them (a view would reach a compiled tile
    function as a copy: `align_losses.ops.tiles.run_tile` copies small views, which Dynamo guards on their base);
    None for None (an optional per-token vector)."""
    return values if values is None or covers(rows, values.shape[0]) else values[rows]


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

    def take(self, rows: slice) -> "RowStats":
        """The statistics of the tokens ``rows`` (``[T]`` each; views, or the fields themselves when ``rows`` are
        all tokens), for `align_losses.ops.tiles.fold_tile`."""
        return RowStats(*(rows_of(f, rows) for f in self._fields()))

    def put(self, rows: slice, values: "RowStats") -> None:
        """Store new statistics (``[T]`` each) of the tokens ``rows``: copied in, or taken as the fields when
        ``rows`` are all tokens (no copy; the tile functions return new tensors)."""
        if covers(rows, self.max.shape[0]):
            for name, value in zip(RowStats._fields, values):
                if getattr(self, name) is not None:
                    setattr(self, name, value)
            return
        for field, value in zip(self._fields(), values):
            if field is not None:
                field[rows] = value

    def _fields(self) -> tuple:
        return (self.max, self.sum_exp, self.label_logit, self.sum_exp_z, self.sum_z, self.sum_exp2, self.argmax)

    def all_reduce(self, group) -> None:
        """Merge the statistics of every rank's vocabulary shard (for a vocabulary-parallel head)."""
        import torch.distributed as dist

        global_max = self.max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescale = torch.exp(self.max - global_max)
        rescale = torch.nan_to_num(rescale, nan=0.0)  # an empty shard has max -inf
        sums = [self.sum_exp * rescale, self.label_logit]
        if self.sum_exp_z is not None:
            sums.append(shift_sums(self.sum_exp_z, self.sum_exp, self.max - global_max, rescale))
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


def shift_sums(sum_exp_z: torch.Tensor, sum_exp: torch.Tensor, shift: torch.Tensor,
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


def label_columns(labels: torch.Tensor, first: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's label as a column of the tile whose columns are ids ``first .. first + width - 1``:
    ``(column [T, 1] int64, inside [T] bool)``; a label outside the tile points at column 0 or
    ``width - 1`` with ``inside`` False, so that no step needs the host to know which tokens are inside."""
    local = labels - first
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1)[:, None], inside
