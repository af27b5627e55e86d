"""The ``"torch"`` backend: pure PyTorch, any device, every feature (see `align_losses.ops.tiled_head`).

Options: ``memory_budget`` (bytes of fp32 tile temporaries), ``token_chunk`` (tokens per tile),
``max_labelled`` (a bound on the labelled tokens for the sync-free path: `align_losses.ops.library.MAX_LABELLED`)
and ``compile_tiles`` (the tiles' math through `torch.compile`: `align_losses.ops.tiles.COMPILE_TILES`)."""

from __future__ import annotations

import torch

from ..ops import library
from ..ops.tiled_head import tiled_head
from ..ops.tiles import COMPILE_TILES, check_compile_tiles
from ..problem import OUTPUTS, HeadProblem
from .base import Backend, Capabilities

#: Default bytes of fp32 tile temporaries. Large enough for big GEMMs on a GPU, small beside
#: the ``[tokens, vocab]`` logits it replaces (8k tokens x 152k vocabulary = 4.6 GiB in fp32).
DEFAULT_MEMORY_BUDGET = 512 * 2**20


def _run(problem: HeadProblem) -> dict:
    budget = problem.options.get("memory_budget") or DEFAULT_MEMORY_BUDGET
    return tiled_head(problem, memory_budget=int(budget), token_block=problem.options.get("token_chunk"),
                      compile_tiles=problem.options.get(COMPILE_TILES))


def _run_traceable(problem: HeadProblem, ignore_index: int) -> dict:
    budget = problem.options.get("memory_budget") or DEFAULT_MEMORY_BUDGET
    return library.head(problem, ignore_index, "torch", memory_budget=int(budget),
                        token_chunk=problem.options.get("token_chunk"),
                        max_labelled=problem.options.get(library.MAX_LABELLED),
                        compile_tiles=problem.options.get(COMPILE_TILES))


def _check_options(problem: HeadProblem) -> list:
    """The sync-free path's ``max_labelled`` bound and ``compile_tiles`` (the core checks ``memory_budget`` and
    ``token_chunk`` for every backend). Returns no missing feature: every well-formed value is supported."""
    library.check_max_labelled(problem.options.get(library.MAX_LABELLED))
    check_compile_tiles(problem.options.get(COMPILE_TILES))
    return []


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
        options=frozenset({"memory_budget", "token_chunk", library.MAX_LABELLED, COMPILE_TILES}),
    ),
    run=_run,
    extra_check=_check_options,
    run_traceable=_run_traceable,
)
