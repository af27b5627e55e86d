"""The labelled positions of a flat label tensor, with the range check of the labels.

Shared by the core's eager path (`align_losses.core`) and the registered ops (`align_losses.ops.library`),
so that a bad label gives the same error on both. Pure PyTorch.
"""

from __future__ import annotations

import torch


def label_error(vocab: int, ignore_index: int, found: list) -> ValueError:
    """The error for labels outside ``[0, vocab)`` that are not ``ignore_index`` (``found``: a few of them)."""
    return ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {found}")


def labelled_positions(targets: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """Indices (int64 ``[M]``, sorted) of the labelled entries of the flat ``targets`` (int64 ``[N]``), after
    checking their range; raises `label_error`'s ValueError for a label outside ``[0, vocab)``.

    One host synchronisation for both the count and the range check (each one drains the GPU queue),
    in few operations (each costs the host ~10 us before the forward kernel can start).
    """
    labelled = targets != ignore_index
    in_range = targets.clamp(0, vocab - 1) == targets
    count, count_in_range = torch.stack((labelled, in_range)).sum(1).tolist()
    # Ignored entries are in range only when ignore_index is a vocabulary id.
    ignored_in_range = targets.numel() - count if 0 <= ignore_index < vocab else 0
    if count_in_range - ignored_in_range != count:
        raise label_error(vocab, ignore_index, targets[labelled & ~in_range][:5].tolist())
    if labelled.device.type in ("cpu", "cuda"):  # where nonzero_static exists; it does not sync again
        return torch.nonzero_static(labelled, size=count).squeeze(1)
    return torch.nonzero(labelled).squeeze(1)


def assert_labels_async(targets: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """The range check of `labelled_positions` without waiting for the device (for a CUDA-graph capture):
    an assertion the device raises when it runs (on CUDA a device-side assert, which ends the process's
    CUDA context; on the CPU the same RuntimeError at once)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    torch._assert_async(~bad.any(), f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
