"""The vocabulary-parallel core on 2, 3 and 4 gloo ranks (uneven shards) against one process."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import align_losses
from align_losses.core import STATS
from reference import bf16_ulps, rel

DIFFERENTIABLE = ("logprobs", "entropy", "mean_logit", "logsumexp")
N, D, V = 23, 12, 61
SHARDS = {2: [40, 21], 3: [1, 35, 25], 4: [17, 0, 30, 14]}  # uneven, one rank even empty
OPTIONS = [
    {},
    {"softcap": 2.0, "temperature": 0.8, "logit_scale": 1.4},
]


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.6
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    weight[5] = weight[44]  # a tie for the maximum across shards on some tokens
    bias[5] = bias[44]
    upstream = {n: torch.randn(N, generator=g) for n in DIFFERENTIABLE}
    return hidden, weight, bias, labels, upstream


def _run(hidden, weight, bias, labels, upstream, options, group=None):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    stats = align_losses.linear_token_stats(
        leaves[0], leaves[1], labels, outputs=STATS, bias=leaves[2], process_group=group,
        backend_options={"memory_budget": 16 * 5 * 7}, **options,
    )
    loss = sum((getattr(stats, n) * upstream[n]).sum() for n in DIFFERENTIABLE)
    grads = torch.autograd.grad(loss, leaves)
    return stats, grads


def _run_losses(hidden, weight, labels, upstream, options, group=None):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    stats = align_losses.linear_token_stats(leaves[0], leaves[1], labels, outputs=("logsumexp",), process_group=group,
                                            backend_options={"memory_budget": 16 * 5 * 7}, **options)
    loss = (stats.logprobs * upstream["logprobs"]).sum() + (stats.logsumexp * upstream["logsumexp"]).sum()
    return torch.autograd.grad(loss, leaves)


def _grads_bf16(hidden, weight, labels, upstream, in_place: bool, group=None):
    """The losses' backward in bf16 with all tokens in one block (8-id blocks): each block's weight-gradient rows
    through an fp32 block, or (``in_place``) written in place by their GEMM with the labelled rows made again, the
    path `align_losses.ops.weight_rows.rows_in_place` takes on CUDA, forced here for every block (however narrow).
    Returns the gradients and, for the in-place run, ``(first id, labelled rows)`` of each block."""
    from align_losses.ops import gemm, weight_rows

    redone = []
    real = gemm.writes_bf16, weight_rows.redo_pays, weight_rows.LabelledRows.redo_rows

    def redo(self, out, grad_op, h_op, index, first):
        redone.append((first, self.count(index)))
        return real[2](self, out, grad_op, h_op, index, first)

    gemm.writes_bf16, weight_rows.redo_pays, weight_rows.LabelledRows.redo_rows = (lambda a: in_place), \
        (lambda *a: True), redo
    try:
        leaves = [t.bfloat16().requires_grad_() for t in (hidden, weight)]
        m = int((labels != -100).sum())  # the tokens the op walks: the labelled ones
        logps = align_losses.linear_logprobs(leaves[0], leaves[1], labels, impl="torch", process_group=group,
                                             backend_options={"memory_budget": 16 * m * 8, "token_chunk": m,
                                                              "compile_tiles": False})
        grads = torch.autograd.grad((logps * upstream["logprobs"]).sum(), leaves)
    finally:
        gemm.writes_bf16, weight_rows.redo_pays, weight_rows.LabelledRows.redo_rows = real
    return grads, redone


def _worker(rank: int, world: int, init_file: str, results: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sizes = SHARDS[world]
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for i, options in enumerate(OPTIONS):
            hidden, weight, bias, labels, upstream = _problem(seed=i)
            full_stats, full_grads = _run(hidden, weight, bias, labels, upstream, options)
            stats, grads = _run(hidden, weight[start:stop], bias[start:stop], labels, upstream, options, dist.group.WORLD)
            for name in STATS + ("logprobs",):
                assert rel(getattr(stats, name), getattr(full_stats, name)) < 1e-5, (name, options)
            assert rel(grads[0], full_grads[0]) < 1e-5, ("grad hidden", options)
            assert rel(grads[1], full_grads[1][start:stop]) < 1e-5 or stop == start, ("grad weight", options)
            assert rel(grads[2], full_grads[2][start:stop]) < 1e-5 or stop == start, ("grad bias", options)
        # The losses' backward (row-scaled tiles, label entries from the label logits): log-prob and logsumexp
        # upstream gradients only, no bias.
        hidden, weight, _, labels, upstream = _problem(seed=7)
        options = {"temperature": 0.8, "logit_scale": 1.4}
        full_grads = _run_losses(hidden, weight, labels, upstream, options)
        grads = _run_losses(hidden, weight[start:stop], labels, upstream, options, dist.group.WORLD)
        assert rel(grads[0], full_grads[0]) < 1e-5, "grad hidden, row-scaled"
        assert rel(grads[1], full_grads[1][start:stop]) < 1e-5 or stop == start, "grad weight, row-scaled"
        # bf16, the weight gradient's rows written in place on a shard: the labelled rows made again are found from
        # the shard's first id (a block's rows start at ``start + v0``), so the gradient is the fp32 blocks' within
        # one bf16 step.
        (_, fp32_w), _ = _grads_bf16(hidden, weight[start:stop], labels, upstream, False, dist.group.WORLD)
        (_, ours_w), redone = _grads_bf16(hidden, weight[start:stop], labels, upstream, True, dist.group.WORLD)
        assert bf16_ulps(ours_w, fp32_w).max() <= 1 if stop > start else ours_w.numel() == 0, "in-place rows"
        labelled_here = ((labels >= start) & (labels < stop)).any().item()
        assert [first for first, _ in redone] == list(range(start, stop, 8)), redone
        assert (sum(count for _, count in redone) > 0) == labelled_here, redone
        (_, one_w), _ = _grads_bf16(hidden, weight, labels, upstream, False)
        assert rel(ours_w, one_w[start:stop]) < 1e-2 or stop == start, "in-place rows against one process"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(SHARDS))
def test_sharded_vocabulary_matches_one_process(world):
    assert sum(SHARDS[world]) == V
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), {}), nprocs=world, join=True)
