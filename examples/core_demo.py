"""Per-token log-probs of a large-vocabulary head, fused against full logits, on CPU.

Runs one forward and backward of each path on the same inputs and prints the largest tensor each
one allocated, the time, and how far apart their results are.

    python examples/core_demo.py [--tokens 2048] [--hidden 256] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import align_losses


class LargestTensor(TorchDispatchMode):
    """Tracks the bytes of the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def full_logits_logprobs(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def run(path, hidden, weight, labels, upstream):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    start = time.perf_counter()
    with LargestTensor() as mode:
        out = path(h, w, labels)
        (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad, mode.largest, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    args = parser.parse_args()

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden)
    weight = torch.randn(args.vocab, args.hidden) * (2.0 / args.hidden**0.5)
    labels = torch.randint(0, args.vocab, (args.tokens,))
    upstream = torch.randn(args.tokens)  # a DPO-like per-token weighting, not a plain mean

    fused = run(lambda h, w, y: align_losses.linear_logprobs(h, w, y), hidden, weight, labels, upstream)
    full = run(full_logits_logprobs, hidden, weight, labels, upstream)

    gib = 2**30
    print(f"{args.tokens} tokens x {args.vocab} vocabulary x {args.hidden} hidden, fp32, forward + backward")
    print(f"  full logits : largest tensor {full[3] / gib:6.3f} GiB, {full[4]:6.2f} s")
    print(f"  fused core  : largest tensor {fused[3] / gib:6.3f} GiB, {fused[4]:6.2f} s")
    print(f"  saved       : {(full[3] - fused[3]) / gib:6.3f} GiB on the largest tensor alone")
    for name, a, b in (("log-probs", fused[0], full[0]), ("grad hidden", fused[1], full[1]), ("grad weight", fused[2], full[2])):
        print(f"  {name:12s}: relative difference {float((a - b).norm() / b.norm()):.2e}")


if __name__ == "__main__":
    main()
