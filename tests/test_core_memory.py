"""The torch backend never holds a [tokens, vocab] tensor."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import align_losses


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_op_produces_a_tokens_by_vocab_tensor():
    n, d, v = 300, 16, 2000
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    budget = 16 * 64 * 500  # tiles of 32,000 elements
    with _LargestTensor() as mode:
        stats = align_losses.linear_token_stats(
            hidden, weight, labels, outputs=("entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2"),
            backend_options={"memory_budget": budget},
        )
        (stats.logprobs.sum() + stats.entropy.sum() + stats.logsumexp.sum()).backward()
    assert mode.largest <= max(budget // 16, v * d), mode.largest  # tiles, or the weight gradient itself


def test_peak_memory_stays_far_below_the_logits():
    """4096 tokens x 65k vocabulary: fp32 logits would be 1 GiB; the whole step stays under a third of that."""
    script = textwrap.dedent(
        """
        import resource, torch, align_losses
        torch.manual_seed(0)
        n, d, v = 4096, 16, 65_536
        hidden = torch.randn(n, d, requires_grad=True)
        weight = (torch.randn(v, d) * 0.2).requires_grad_()
        labels = torch.randint(0, v, (n,))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = align_losses.linear_logprobs(hidden, weight, labels, backend_options={"memory_budget": 64 * 2**20})
        out.sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra = int(done.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 65_536 * 4
    assert extra < logits_bytes / 3, f"peak grew by {extra / 2**30:.2f} GiB"
