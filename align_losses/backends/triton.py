"""The ``"triton"`` backend: CUDA, Triton GEMMs with fused softmax epilogues plus cuBLAS GEMMs
(see `align_losses.ops.triton_head`). Triton is imported only when the backend runs.

Options: ``memory_budget`` (bytes of the backward's chunk buffer), ``filter_mass`` (opt-in
filtering backward, `align_losses.ops.triton_filter`) and ``max_labelled`` (a bound on the labelled tokens
for the sync-free path of a CUDA-graph capture: `align_losses.ops.library.MAX_LABELLED`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import library
from ..packages import installed
from ..problem import OUTPUTS, HeadProblem
from .base import Backend, Capabilities


def _available() -> Optional[str]:
    if not installed("triton"):
        return "it needs the triton package, which is not installed"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and torch.cuda.is_available() is False"
    if torch.version.hip is not None:
        return "its kernels are for NVIDIA GPUs (inline PTX, Hopper's TMA) and this torch is a ROCm build"
    return None


#: ``filter_mass=True``: each token's backward may skip up to 2^-8 of its probability off the label
#: (so at most 2^-8 of its own gradient; align_losses.ops.triton_filter; the gradient errors that
#: left on the head benchmark's logits are in benchmarks/NOTES-triton.md).
DEFAULT_FILTER_MASS = 2.0**-8


def filter_mass(value) -> Optional[float]:
    """The ``filter_mass`` backend option as a probability, or None for the exact backward.

    None or False: exact; True: `DEFAULT_FILTER_MASS`; a number in (0, 1): that probability.
    """
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_FILTER_MASS
    if isinstance(value, (int, float)) and 0.0 < float(value) < 1.0:
        return float(value)
    raise ValueError(
        f"backend option filter_mass must be None/False (exact), True ({DEFAULT_FILTER_MASS}) or a probability "
        f"in (0, 1): the share of each token's probability off its label that its backward may skip; got {value!r}"
    )


def _run(problem: HeadProblem) -> dict:
    from ..ops.triton_head import triton_head

    budget = problem.options.get("memory_budget")
    return triton_head(problem, memory_budget=int(budget) if budget else None,
                       filter_mass=filter_mass(problem.options.get("filter_mass")))


def _run_traceable(problem: HeadProblem, ignore_index: int) -> Optional[dict]:
    if filter_mass(problem.options.get("filter_mass")) is not None:
        return None  # the filtering backward keeps per-call state the registered op does not carry
    budget = problem.options.get("memory_budget")
    return library.head(problem, ignore_index, "triton", memory_budget=int(budget) if budget else None,
                        max_labelled=problem.options.get(library.MAX_LABELLED))


def _check_options(problem: HeadProblem) -> list:
    """Refuse a malformed ``max_labelled`` before any work; every well-formed value is supported."""
    library.check_max_labelled(problem.options.get(library.MAX_LABELLED))
    return []


BACKEND = Backend(
    name="triton",
    capabilities=Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        bias=True,
        softcap=True,
        logit_scale=True,
        temperature=True,
        outputs=frozenset(OUTPUTS),
        vocab_parallel=True,
        options=frozenset({"memory_budget", "filter_mass", library.MAX_LABELLED}),
    ),
    run=_run,
    available=_available,
    extra_check=_check_options,
    run_traceable=_run_traceable,
)
