"""The ``torch`` backend's step on a GPU with its compiled tile functions built under other Inductor options,
beside TRL 1.16's chunked head: an experiment on what Inductor's choices are worth in the whole step.

One forward + backward of per-token log-probs (``impl="torch"``, tiles compiled, random upstream gradient) at
head.py's token counts (8192 and 32768 tokens, a quarter unlabelled; D 2048, V 151936, bf16), CUDA-event
medians (3 warm-up, 9 timed), each variant twice in interleaved rounds so that clock drift hits them alike:

- ``default``: the backend's own ``torch.compile(fn, dynamic=True, fullgraph=True)`` with its options
  (`align_losses.ops.tiles.inductor_options`: n-d tiling); ``plain``: without options;
- ``cdt``: with ``coordinate_descent_tuning``;
- ``static``: the tile width marked static (`torch._dynamo.mark_static`), the token count still dynamic;
- ``nd-nosplit`` and ``nd-tiledred``: the backend's n-d tiling with ``split_reductions=False`` (each reduction in
  one kernel, not split in two) or ``triton.tile_reductions``;
- ``default-1GiB``, ``static-1GiB``: those with a 1 GiB ``memory_budget`` (half the vocabulary blocks).

The variants replace the backend's cached compiled tile functions (``align_losses.ops.tiles._compiled``, a private
cache that no public option reaches): an experiment's hook, not an interface. ``--trace DIR`` also writes a
torch.profiler chrome trace of one default step at the first token count (GPU idle gaps: benchmarks/NOTES-torch.md).

Usage: ``python benchmarks/torch_inductor_variants.py [--commit HASH] [--variants a,b] [--tokens 8192,32768]
[--trace DIR] > log``. The kept run: ``benchmarks/results/torch-inductor-variants.log``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py, however this is run
import _common  # noqa: E402 - puts the checkout on sys.path too
import align_losses  # noqa: E402
from align_losses.ops import tiles  # noqa: E402
from torch_profile import INDUCTOR_VARIANTS, compile_tile, median_ms, problem  # noqa: E402


#: name: (an `INDUCTOR_VARIANTS` entry of torch_profile.py, memory_budget or None for the default)
VARIANTS = {
    "default": ("the backend's", None),
    "plain": ("plain dynamic", None),
    "cdt": ("coordinate descent", None),
    "static": ("static width", None),
    "nd-nosplit": ("n-d tiling, no split reductions", None),
    "nd-tiledred": ("n-d tiling, tiled reductions", None),
    "autotune": ("n-d tiling, autotuned", None),
    "default-1GiB": ("the backend's", 2**30),
    "static-1GiB": ("static width", 2**30),
}


def install(variant: str) -> None:
    """Put the tile functions compiled as ``variant`` (`INDUCTOR_VARIANTS`) in the backend's cache."""
    torch._dynamo.reset()
    tiles._compiled.clear()
    for fn in (tiles.fold_tile, tiles.tile_grad):
        tiles._compiled[fn] = compile_tile(fn, *INDUCTOR_VARIANTS[variant])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_commit_arg(parser)
    parser.add_argument("--variants", default="default,plain,static", help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--tokens", default="8192,32768", help="token counts, comma-separated (a quarter unlabelled)")
    parser.add_argument("--trace", help="write a chrome trace of one default step at the first token count here")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("torch_inductor_variants.py times CUDA kernels: no CUDA device is visible")
    print(f"# torch backend under Inductor variants: {_common.utc_now()}, commit {args.commit or _common.git_commit()}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for n in [int(t) for t in args.tokens.split(",")]:
        h, weight, y, up = problem(n)
        budget = [None]

        def ours():
            options = {"compile_tiles": True} | ({"memory_budget": budget[0]} if budget[0] else {})
            logprobs = align_losses.linear_logprobs(h, weight, y, impl="torch", backend_options=options)
            (logprobs * up).sum().backward()

        def trl():
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

            logprobs = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, chunk, None, 1.0, ())[0]
            (logprobs.float() * up).sum().backward()

        for round_index in range(2):
            for name in names:
                variant, budget[0] = VARIANTS[name]
                install(variant)
                t0 = time.time()
                ours()
                torch.cuda.synchronize()
                first = time.time() - t0
                print(f"labelled tokens {h.shape[0]} round {round_index} {name:13s} {median_ms(ours, reps=9)[0]:7.2f} ms "
                      f"(first call {first:.1f} s)", flush=True)
            try:
                print(f"labelled tokens {h.shape[0]} round {round_index} {'TRL':13s} {median_ms(trl, reps=9)[0]:7.2f} ms",
                      flush=True)
            except ImportError as e:
                print(f"TRL's chunked head unavailable: {e}")
        del h, weight
        torch.cuda.empty_cache()
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        h, weight, y, up = problem(int(args.tokens.split(",")[0]))
        install(VARIANTS["default"][0])

        def step():
            logprobs = align_losses.linear_logprobs(h, weight, y, impl="torch", backend_options={"compile_tiles": True})
            (logprobs * up).sum().backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        os.makedirs(args.trace, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.trace, "trace-torch-step.json"))
        print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
