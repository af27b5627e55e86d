"""The ``"torch"`` head's weight-gradient rows (`align_losses.ops.tiled_head`'s backward): the label terms, and
rows written in place.

- **Label terms.** Each token's label entry of ``dL/da`` stays out of the GEMM operands
  (`align_losses.ops.tiled_head.add_label_entries` says why); its product with the token's hidden state goes into
  the weight gradient's row of its label. `LabelledRows` sums those products per distinct label once per backward
  and learns where each vocabulary block's labels start, with the backward's one wait for the device;
  `AllRows` does without the wait (for a CUDA-graph capture), walking all tokens in every block.
- **Rows in place.** With all tokens in one token block, a vocabulary block's weight-gradient rows are one GEMM's
  output, not a sum: `rows_in_place` decides whether that GEMM writes them into the gradient itself (no fp32
  block, no cast) and `write_rows` writes them, its label terms included; `rows_in_place_kind` tells the tile plan
  which way a walk of one token block will go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import gemm
from .stats import label_columns


class LabelledRows:
    """The weight gradient's label terms ``entry[t] * hidden[t]``, summed per distinct label once per backward,
    and where each vocabulary block's labels start: a block then adds its rows with one ``index_add_`` of distinct
    indices (no two adds meet, so no atomics' order shows), instead of a deterministic ``index_put_`` a block,
    which on CUDA costs a sort, a dozen launches and a wait for the device each time.

    The block bounds are host ints, read once per backward. `of` sorts the labels and, on CUDA, copies the bounds
    to pinned host memory without waiting; the first use of a block's bounds (`add_to_block`, `count`,
    `redo_rows`) waits for that copy alone (an event) and makes the sums. By then the caller has queued the first
    block's recompute GEMM and tile (and its hidden-state GEMM) behind the copy, so the GPU works through them while
    the host makes the sums' launches, where waiting for the stream in `of` would leave it idle from the wait to the
    first GEMM (benchmarks/NOTES-torch.md)."""

    @staticmethod
    def of(labels: torch.Tensor, entry: torch.Tensor, hidden: torch.Tensor, offset: int, vocab: int, block: int,
           chunk: int) -> "LabelledRows":
        """For blocks of ``block`` ids from ``offset`` up to ``offset + vocab``; ``entry`` fp32 ``[M]`` (0 for a
        label outside them), ``hidden [M, D]``; the products are made ``chunk`` tokens at a time. One sort and
        one wait for the device for all blocks; the sums take an fp32 row per distinct label inside the ids
        walked (a vocabulary shard's: few of a batch's tokens)."""
        inside = (labels >= offset) & (labels < offset + vocab)
        sorted_labels, order = torch.sort(torch.where(inside, labels, offset + vocab), stable=True)  # outside: last
        new = torch.ones_like(sorted_labels, dtype=torch.bool)
        new[1:] = sorted_labels[1:] != sorted_labels[:-1]
        seen = new.cumsum(0)  # distinct labels up to each sorted token
        edges = torch.arange(offset, offset + vocab + block, block, device=labels.device).clamp_(max=offset + vocab)
        ends = torch.searchsorted(sorted_labels, edges)  # sorted tokens before each block edge
        before = torch.cat([seen.new_zeros(1), seen])[ends]  # distinct labels before each block edge
        counts = torch.cat([before, ends[-1:]])
        ready = None
        if counts.is_cuda:
            counts = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True).copy_(counts, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(labels.device))  # the copy's stream, whatever device is current
        return LabelledRows(_Pending(counts, ready, sorted_labels, order, seen, entry, hidden, chunk))

    def __init__(self, pending: "_Pending"):
        self._pending: Optional[_Pending] = pending  # None once the sums are made
        self.labels: Optional[torch.Tensor] = None  # int64 [K]: the distinct labels inside the ids walked, increasing
        self.rows: Optional[torch.Tensor] = None  # fp32 [K, D]: per distinct label, the sum of entry[t] * hidden[t]
        self.bounds: Optional[list[int]] = None  # host ints: block b's labels are labels[bounds[b] : bounds[b + 1]]

    def _finish(self) -> None:
        """Wait for the bounds (the backward's one wait for the device) and sum the label terms."""
        counts, ready, sorted_labels, order, seen, entry, hidden, chunk = self._pending
        if ready is not None:
            ready.synchronize()
        *bounds, tokens_inside = counts.tolist()
        slot = seen[:tokens_inside] - 1  # each sorted token's distinct label
        rows = torch.zeros(bounds[-1], hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for c0 in range(0, tokens_inside, chunk):
            tokens = order[c0 : min(c0 + chunk, tokens_inside)]
            products = hidden[tokens].float().mul_(entry[tokens, None])
            # Repeated labels summed in token order: CUDA's index_put_(accumulate=True) sorts and sums in order
            # (its index_add_ uses atomics); on the CPU it is the other way round (index_put_ adds with atomics
            # across threads from 32k elements, index_add_ is serial).
            if rows.is_cuda:
                rows.index_put_((slot[c0 : c0 + chunk],), products, accumulate=True)
            else:
                rows.index_add_(0, slot[c0 : c0 + chunk], products)
        self.labels = torch.zeros_like(sorted_labels[: bounds[-1]]).scatter_(0, slot, sorted_labels[:tokens_inside])
        self.rows, self.bounds, self._pending = rows, bounds, None

    def add_to_block(self, rows: torch.Tensor, index: int, first: int) -> None:
        """``rows[l - first] += `` the label terms of ``l``, for the labels ``l`` of block ``index``, whose fp32 rows
        ``rows [R, D]`` start at id ``first``."""
        lo, hi = self._bounds(index)
        if hi > lo:
            rows.index_add_(0, self.labels[lo:hi] - first, self.rows[lo:hi])

    def count(self, index: int) -> int:
        """The number of distinct labels in block ``index``."""
        lo, hi = self._bounds(index)
        return hi - lo

    def redo_rows(self, out: torch.Tensor, grad_op: torch.Tensor, h_op: torch.Tensor, index: int, first: int) -> None:
        """Block ``index``'s label rows of ``out [R, D]`` (rows from id ``first``, written rounded to its half
        precision as ``grad_op.T @ h_op``, ``grad_op [M, R]``, ``h_op [M, D]``) made again: their product in fp32
        plus their label terms, rounded once, as the fp32 block's cast rounds them. Adding the label terms to the
        rounded product would round twice, and where the two nearly cancel (tokens of like hidden states, one
        labelled with the id and others putting their probability on it) the first rounding's error would stay in
        a small result."""
        lo, hi = self._bounds(index)
        if hi > lo:
            columns = self.labels[lo:hi] - first
            exact = gemm.matmul_fp32(grad_op.index_select(1, columns).t(), h_op).add_(self.rows[lo:hi])
            out.index_copy_(0, columns, exact.to(out.dtype))

    def _bounds(self, index: int) -> tuple[int, int]:
        """Where block ``index``'s labels are in ``labels`` and ``rows``, the sums made first if not yet."""
        if self._pending is not None:
            self._finish()
        return self.bounds[index], self.bounds[index + 1]


class _Pending(NamedTuple):
    """What `LabelledRows` keeps from its sort until its first block: the bounds (int64 ``[blocks + 2]``; on CUDA in
    pinned host memory, still being copied until ``ready``, a CUDA event; elsewhere on their device, ``ready`` None),
    the sorted labels, their order and distinct-label counts (int64 ``[M]`` each), and the sums' inputs."""

    counts: torch.Tensor
    ready: Optional[torch.cuda.Event]
    sorted_labels: torch.Tensor
    order: torch.Tensor
    seen: torch.Tensor
    entry: torch.Tensor
    hidden: torch.Tensor
    chunk: int


@dataclass(frozen=True)
class AllRows:
    """`LabelledRows` without the host synchronisation: every block walks all tokens, those labelled
    outside it adding zero rows (a CUDA graph cannot wait for the device to learn the blocks' bounds). The rows
    are added with ``index_add_`` on every device: CUDA's ``index_put_(accumulate=True)`` (the deterministic
    order `LabelledRows` uses there) fails under CUDA-graph capture, so repeated labels sum in atomics' order."""

    labels: torch.Tensor  # int64 [M]
    entry: torch.Tensor  # fp32 [M]
    hidden: torch.Tensor  # [M, D]

    def add_to_block(self, rows: torch.Tensor, index: int, first: int) -> None:
        """As `LabelledRows.add_to_block`, over all tokens (``index`` unused)."""
        column, inside = label_columns(self.labels, first, rows.shape[0])
        rows.index_add_(0, column.squeeze(1), self.hidden.float() * torch.where(inside, self.entry, 0.0)[:, None])


#: A GPU's GEMM rate over its memory bandwidth, in flops per byte (an H100: ~700 TFLOP/s in bf16 over ~3 TB/s), to
#: weigh a GEMM's flops against bytes moved (`redo_pays`).
GEMM_FLOPS_PER_BYTE = 230


def redo_pays(count: int, m: int, width: int) -> bool:
    """Whether writing a ``[width, D]`` block of weight-gradient rows rounded by its GEMM and making its ``count``
    labelled rows again (`LabelledRows.redo_rows`) costs less than the fp32 block it replaces, for ``m`` tokens.
    Saved: 8 B per element (the fp32 block's extra 2 B written, then 4 B read and 2 B written by its cast, against
    2 B written). Spent, where a row is labelled: the redo GEMM reads all of ``h_op`` (2 B per element of
    ``[m, D]``) and makes ``2 count m D`` flops."""
    return count == 0 or m * (2 + 2 * count / GEMM_FLOPS_PER_BYTE) <= 8 * width


def rows_in_place(out: torch.Tensor, grad_op: torch.Tensor, h_op: torch.Tensor,
                  labelled: Optional[LabelledRows | AllRows], index: int, m: int) -> bool:
    """Whether block ``index``'s weight-gradient rows ``out [W, D]`` (a view of the weight gradient), the product
    ``grad_op.T @ h_op`` of one GEMM over all ``m`` tokens plus the label terms of ``labelled`` (None, or the
    label rows' sums), are written by that GEMM in place (`write_rows`), with the values of an fp32 block, its
    label terms added and cast: in fp32 always (the label terms are added to the rows themselves); in half
    precision where the GEMM writes it (`align_losses.ops.gemm.writes_bf16`) and making the labelled rows again pays
    (`redo_pays`), which needs their bounds on the host (not on the sync-free path, `AllRows`)."""
    if not grad_op.dtype == h_op.dtype == out.dtype:
        return False
    kind = rows_in_place_kind(grad_op, sync_free=isinstance(labelled, AllRows))
    if kind != "redo":
        return kind == "fp32"
    return labelled is None or redo_pays(labelled.count(index), m, out.shape[0])


def write_rows(out: torch.Tensor, grad_op: torch.Tensor, h_op: torch.Tensor,
               labelled: Optional[LabelledRows | AllRows], index: int, first: int) -> None:
    """``out = grad_op.T @ h_op`` plus block ``index``'s label terms (rows from id ``first``), in place: see
    `rows_in_place`. ``grad_op [M, W]`` and ``h_op [M, D]`` in ``out``'s dtype."""
    gemm.mm_rounded(grad_op.t(), h_op, out)
    if labelled is None:
        return
    if out.dtype == torch.float32:
        labelled.add_to_block(out, index, first)
    else:
        labelled.redo_rows(out, grad_op, h_op, index, first)


def rows_in_place_kind(hidden: torch.Tensor, sync_free: bool = False) -> str:
    """How the backward of one token block writes the weight gradient's rows for ``hidden``'s dtype and device (or
    those of a GEMM operand like it), the one decision the tile plan and `rows_in_place` share: ``"fp32"`` in place;
    ``"redo"`` in place, rounded by the GEMM, its labelled rows made again where that pays (`redo_pays`); ``""``
    through an fp32 block, as in half precision on the sync-free path (``sync_free``: `AllRows`, whose rows are not
    made again)."""
    if hidden.dtype == torch.float32:
        return "fp32"
    return "redo" if gemm.writes_bf16(hidden) and not sync_free else ""
