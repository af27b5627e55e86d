"""Which (vocabulary block, token) pairs a filtering backward must recompute, and their layout.

Pure PyTorch (no kernels): the selection from the forward's per-block statistics, and the
block-major "slots" of kept tokens, padded to whole tiles, that the gathered kernels walk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: Tokens per kept-pair scan of `kept_blocks` (bounds its ``[tokens, blocks]`` sort temporaries).
_ROWS_PER_SCAN = 2048


def kept_blocks(block_max: torch.Tensor, block_sum: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                offset: int, vocab_local: int, block: int, filter_mass: float) -> torch.Tensor:
    """``keep`` bool ``[NB, M]``: the (vocabulary block, token) pairs the backward recomputes.

    ``block_max``, ``block_sum``: fp32 ``[NB, M]``, each block's max logit and sum of
    ``exp(z - max)``; ``lse``: fp32 ``[M]`` over the whole vocabulary; ``labels`` ``[M]`` global ids,
    this rank's rows starting at ``offset``. Per token, the blocks sorted by mass
    ``block_sum * exp(block_max - lse)`` are dropped from the smallest while their running total
    stays at most ``filter_mass``; the label's block is kept whatever its mass.
    """
    nb, m = block_max.shape
    keep = torch.empty((nb, m), dtype=torch.bool, device=block_max.device)
    positions = torch.arange(nb, device=block_max.device)
    for r0 in range(0, m, _ROWS_PER_SCAN):
        r1 = min(m, r0 + _ROWS_PER_SCAN)
        mass = (block_sum[:, r0:r1] * torch.exp(block_max[:, r0:r1] - lse[None, r0:r1])).t()
        ascending, order = mass.sort(dim=1)
        dropped = (ascending.cumsum(1) <= filter_mass).sum(1)
        keep_sorted = positions[None, :] >= dropped[:, None]
        keep[:, r0:r1] = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted).t()
    local = labels - offset
    mine = (local >= 0) & (local < vocab_local)
    label_block = torch.where(mine, local, 0) // block
    tokens = torch.arange(m, device=keep.device)
    keep[label_block, tokens] = keep[label_block, tokens] | mine
    return keep


@dataclass
class Slots:
    """The kept tokens of every block, padded to whole tiles of ``bm`` (block-major).

    ``rows`` int32 ``[tiles * bm]``: the token of each slot, -1 for padding; ``tile_block`` int32
    ``[tiles]``: each tile's block; ``tile_start`` int32 ``[NB + 1]`` and its host copy ``starts``:
    the first tile of each block.
    """

    rows: torch.Tensor
    tile_block: torch.Tensor
    tile_start: torch.Tensor
    starts: list

    @staticmethod
    def of(keep: torch.Tensor, bm: int, max_kept: Optional[int] = None) -> Optional["Slots"]:
        """The slots of ``keep`` (bool ``[NB, M]``), or None when it keeps more than ``max_kept``
        pairs. One host synchronisation (the tile counts)."""
        nb = keep.shape[0]
        dev = keep.device
        counts = keep.sum(1)
        tiles = (counts + bm - 1) // bm
        bounds = torch.zeros(2, nb + 1, dtype=torch.int64, device=dev)
        bounds[0, 1:] = tiles.cumsum(0)
        bounds[1, 1:] = counts.cumsum(0)
        starts, firsts = bounds.tolist()
        if max_kept is not None and firsts[-1] > max_kept:
            return None
        start, first = bounds
        pairs = torch.nonzero_static(keep, size=firsts[-1])  # (block, token), block-major
        blk = pairs[:, 0]
        slot = start[blk] * bm + torch.arange(pairs.shape[0], device=dev) - first[blk]
        rows = torch.full((starts[-1] * bm,), -1, dtype=torch.int32, device=dev)
        rows[slot] = pairs[:, 1].to(torch.int32)
        tile_block = torch.repeat_interleave(torch.arange(nb, dtype=torch.int32, device=dev), tiles,
                                             output_size=starts[-1])
        return Slots(rows, tile_block, start.to(torch.int32), starts)

    def chunks(self, max_tiles: int):
        """``(first block, end block)`` runs of whole blocks with at most ``max_tiles`` tiles each
        (a single block may exceed it)."""
        b0 = 0
        nb = len(self.starts) - 1
        for b in range(1, nb + 1):
            if self.starts[b] - self.starts[b0] > max_tiles and b - 1 > b0:
                yield b0, b - 1
                b0 = b - 1
        yield b0, nb
