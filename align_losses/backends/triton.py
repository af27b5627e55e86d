"""The ``"triton"`` backend: CUDA, Triton GEMMs with fused softmax epilogues plus cuBLAS GEMMs
(see `align_losses.ops.triton_head`). Triton is imported only when the backend runs."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .base import OUTPUTS, Backend, Capabilities, HeadProblem


def _available() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "it needs the triton package, which is not installed"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and torch.cuda.is_available() is False"
    return None


def _run(problem: HeadProblem) -> dict:
    from ..ops.triton_head import triton_head

    budget = problem.options.get("memory_budget")
    return triton_head(problem, memory_budget=int(budget) if budget else None)


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
        options=frozenset({"memory_budget"}),
    ),
    run=_run,
    available=_available,
)
