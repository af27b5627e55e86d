"""The layout a filtering backward walks: each vocabulary block's kept tokens ("slots"),
block-major, padded to whole tiles. Pure PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

@dataclass
class Slots:
    """The kept tokens of every block, padded to whole tiles of ``bm`` (block-major).

    ``rows`` int32 ``[tiles * bm]``: the token of each slot, -1 for padding; ``tile_block`` int32
    ``[tiles]``: each tile's block; ``tile_start`` int64 ``[NB + 1]`` and its host copy ``starts``:
    the first tile of each block.
    """

    rows: torch.Tensor
    tile_block: torch.Tensor
    tile_start: torch.Tensor
    starts: list

    @staticmethod
    def of(keep: torch.Tensor, bm: int, max_slots: Optional[int] = None) -> Optional["Slots"]:
        """The slots of ``keep`` (bool ``[NB, M]``), or None when they would be more than
        ``max_slots`` (padding included). One host synchronisation (the tile counts)."""
        nb = keep.shape[0]
        dev = keep.device
        counts = keep.sum(1)
        tiles = (counts + bm - 1) // bm
        bounds = torch.zeros(2, nb + 1, dtype=torch.int64, device=dev)
        bounds[0, 1:] = tiles.cumsum(0)
        bounds[1, 1:] = counts.cumsum(0)
        starts, firsts = bounds.tolist()
        if max_slots is not None and starts[-1] * bm > max_slots:
            return None
        start, first = bounds
        pairs = torch.nonzero_static(keep, size=firsts[-1])  # (block, token), block-major
        blk = pairs[:, 0]
        slot = start[blk] * bm + torch.arange(pairs.shape[0], device=dev) - first[blk]
        rows = torch.full((starts[-1] * bm,), -1, dtype=torch.int32, device=dev)
        rows[slot] = pairs[:, 1].to(torch.int32)
        tile_block = torch.repeat_interleave(torch.arange(nb, dtype=torch.int32, device=dev), tiles,
                                             output_size=starts[-1])
        return Slots(rows, tile_block, start, starts)

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
