"""The head problem: what the core hands every backend, and the outputs it may ask for.

The core (`align_losses.core`) validates the user's inputs, drops ignored tokens and hands every
backend the same normalised problem: ``hidden [M, D]`` holding only labelled tokens, ``labels [M]``
(global vocabulary ids, all valid), the head's ``weight [V_local, D]`` and ``bias [V_local]``, the logit
transform, the set of per-token outputs wanted and, for a vocabulary-parallel head, the shard.
A backend returns one float32 ``[M]`` tensor per requested output, differentiable where
`DIFFERENTIABLE_OUTPUTS` says so.

This module is the contract between `align_losses.backends` (which registers and checks the
implementations) and `align_losses.ops` (which computes them); it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

#: Per-token outputs a backend can be asked for. ``logprobs`` is always computed.
#: ``entropy``, ``mean_logit`` and ``logsumexp`` carry gradients; the others are detached.
OUTPUTS = ("logprobs", "entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2")
DIFFERENTIABLE_OUTPUTS = frozenset({"logprobs", "entropy", "mean_logit", "logsumexp"})


@dataclass(frozen=True)
class LogitTransform:
    """The map from the head's raw output ``a = hidden @ weight.T + bias`` to the logits ``z``.

    ``z = softcap * tanh(a * logit_scale / softcap) / temperature`` (without the tanh when
    ``softcap`` is None). The identity is ``LogitTransform()``.
    """

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    @property
    def is_linear(self) -> bool:
        """True when ``z`` is a scalar multiple of ``a`` (no soft-cap)."""
        return self.softcap is None


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a vocabulary split across a process group.

    The rank holds rows ``[start, start + weight.shape[0])`` of the full ``[size, D]`` head.
    Per-token statistics are combined across ``group`` (a max and a few sums per token).
    """

    start: int
    size: int
    group: object  # torch.distributed.ProcessGroup; typed loosely so this module imports without c10d


@dataclass(frozen=True)
class HeadProblem:
    """One call of the head, as the core hands it to a backend.

    Shapes: ``hidden [M, D]`` (only labelled tokens), ``weight [V_local, D]``, ``bias [V_local]``
    or None, ``labels [M]`` int64 global ids. ``outputs`` always contains ``"logprobs"``.
    ``hidden`` and ``weight`` already have the compute dtype (the core casts them under autocast,
    once, so a backward under another autocast state reuses it).

    The problem the backend check (`align_losses.backends.check`) reads before any work holds the
    caller's tensors as given (of the compute dtype): a check may read their dtype and device, not
    their shapes or values.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    transform: LogitTransform
    outputs: frozenset
    shard: Optional[VocabShard] = None
    options: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary (all shards)."""
        return self.shard.size if self.shard is not None else self.weight.shape[0]
