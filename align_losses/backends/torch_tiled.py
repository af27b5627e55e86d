"""The ``"torch"`` backend: pure PyTorch, any device, every feature (see `align_losses.ops.tiled_head`)."""

from __future__ import annotations

import torch

from ..ops.tiled_head import tiled_head
from ..problem import OUTPUTS, HeadProblem
from .base import Backend, Capabilities

#: Default bytes of fp32 tile temporaries. Large enough for big GEMMs on a GPU, small beside
#: the ``[tokens, vocab]`` logits it replaces (8k tokens x 152k vocabulary = 4.6 GiB in fp32).
DEFAULT_MEMORY_BUDGET = 512 * 2**20


def _run(problem: HeadProblem) -> dict:
    budget = problem.options.get("memory_budget") or DEFAULT_MEMORY_BUDGET
    return tiled_head(problem, memory_budget=int(budget), token_block=problem.options.get("token_chunk"))


BACKEND = Backend(
    name="torch",
    capabilities=Capabilities(
        devices=frozenset({"*"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        bias=True,
        softcap=True,
        logit_scale=True,
        temperature=True,
        outputs=frozenset(OUTPUTS),
        vocab_parallel=True,
        options=frozenset({"memory_budget", "token_chunk"}),
    ),
    run=_run,
)
