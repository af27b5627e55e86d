"""Where the ``torch`` backend's time goes on a GPU, by default at `head.py`'s qwen3-1.7b shape (6144 labelled tokens,
D 2048, V 151936, bf16), beside TRL 1.16's chunked head.

1. One forward + backward of per-token log-probs with a random upstream gradient: CUDA-event medians (3
   warm-up, 7 timed), the host's time to return from a step, the GPU's idle gaps within a profiled step, and kernel
   and host tables (torch.profiler) of ours ``impl="torch"`` (with its tiles compiled too
   where the checkout has the ``compile_tiles`` option) and of TRL's ``ChunkedLogProbFunction``.
2. The GEMM forms the backend can use, alone, on one vocabulary block of its default plan (512 MiB / 16 B
   per element): bf16 or fp32 output, transposed operands, an fp32 accumulation.
3. The elementwise passes of its tiles, alone, over one fp32 block ``[tokens, block]``.
4. Its compiled tile functions alone (`align_losses.ops.tiles.fold_tile` and `tile_grad`, the losses' case), over
   one such block and one of head.py's long shape, under Inductor options (`INDUCTOR_VARIANTS`): the backend's
   (``dynamic=True`` and n-d tiling), none, coordinate-descent tuning, n-d tiling without split reductions, with
   tiled reductions or with every reduction config autotuned, and the block width marked static; their kernel time
   and bandwidth
   (from torch.profiler: a compiled call's kernels are shorter than the host's time to make it), whether Inductor's
   online softmax (one pass for the max and the sum) took the forward, and (``--code-dir``) the generated code.

Usage: ``python benchmarks/torch_profile.py [--commit HASH] [--tokens N] [--sections 1,2,3,4] [--code-dir DIR]
> torch-profile.log`` (prints a header
with the date, commit, device and versions; ``--tokens 32768`` is head.py's long shape). The kept run: ``benchmarks/results/torch-profile-latest.log``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py, however this is run
import _common  # noqa: E402 - puts the checkout on sys.path too
import align_losses  # noqa: E402
from align_losses.ops.tiles import inductor_options  # noqa: E402

N, D, V = 8192, 2048, 151936  # tokens (a quarter of them unlabelled), hidden size, vocabulary
BUDGET = 512 * 2**20  # the torch backend's default memory_budget

#: Inductor variants of the compiled tile functions: name: (torch.compile options, tile width marked static). The
#: backend's own options are `align_losses.ops.tiles.inductor_options` (n-d tiling where torch has it).
INDUCTOR_VARIANTS = {
    "the backend's": (inductor_options(), False),
    "plain dynamic": ({}, False),
    "coordinate descent": ({"coordinate_descent_tuning": True}, False),
    "n-d tiling, no split reductions": ({"triton.prefer_nd_tiling": True, "split_reductions": False}, False),
    "n-d tiling, tiled reductions": ({"triton.prefer_nd_tiling": True, "triton.tile_reductions": True}, False),
    # Every reduction config Inductor has, timed at the first call, instead of its heuristic's one or two.
    "n-d tiling, autotuned": ({"triton.prefer_nd_tiling": True, "max_autotune_pointwise": True}, False),
    "static width": ({}, True),
    "static width, coordinate descent": ({"coordinate_descent_tuning": True}, True),
}


def compile_tile(fn, options: dict, static: bool):
    """``fn`` (a tile function of `align_losses.ops.tiles`) compiled as the backend compiles it (dynamic shapes,
    one graph) with Inductor ``options``; ``static``: the tile's width (dim 1 of its first argument) marked static."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
    if not static:
        return compiled

    def marked(a, *args):
        torch._dynamo.mark_static(a, 1)
        return compiled(a, *args)
    return marked


def default_plan(tokens: int):
    """The backend's default tile plan (`align_losses.ops.tiled_head.Tiling`) for ``tokens`` labelled bf16 tokens on
    CUDA, both gradients needed, its fold and its row-scaled tiles compiled (4 and 6 bytes a tile element), as once
    its first call compiled them, a walk of one token block writing the weight gradient's rows in place; the step of
    section 1 walks the forward and the row-scaled backward (``backward_walk(row_scaled=True)``)."""
    from align_losses.ops.tiled_head import Tiling

    return Tiling.plan(tokens, V, D, BUDGET, compiled=True, forward_bytes=4, scaled_backward_bytes=6,
                       rows_in_place="redo")


def problem(n: int) -> tuple:
    """``(hidden [M, D] bf16 requiring grad, weight [V, D] bf16 requiring grad, labels [M], upstream fp32 [M])``: the
    labelled tokens of ``n`` (seed 0, the first quarter unlabelled), as the step of section 1 takes them."""
    torch.manual_seed(0)
    hidden = torch.randn(n, D, device="cuda").bfloat16()
    weight = (torch.randn(V, D, device="cuda") * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (n,), device="cuda")
    labels[: n // 4] = -100
    keep = labels != -100
    h = hidden[keep].detach().requires_grad_()
    return h, weight, labels[keep], torch.randn(h.shape[0], device="cuda")


def median_ms(fn, reps: int = 7) -> tuple[float, list]:
    """Median CUDA-event time of ``fn`` in ms after 3 warm-up calls, and every repetition's."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def kernel_ms(fn, calls: int = 10) -> float:
    """The GPU's kernel time per call of ``fn`` (ms), from torch.profiler over ``calls`` calls after one warm-up:
    a compiled tile call's kernels take less than the host's ~0.1-0.2 ms to make the call, so CUDA events around
    calls would time the host instead."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    field = "self_device_time_total" if hasattr(prof.key_averages()[0], "self_device_time_total") else "self_cuda_time_total"
    return sum(getattr(e, field) for e in prof.key_averages()) / 1e3 / calls


def idle_stretches(intervals: list) -> tuple[list, float]:
    """``(stretches, end)`` of time-sorted ``(start, end, item)`` intervals (overlapping ones count once): each
    stretch in which none ran as ``(length, its start, the item whose end began it, the item after it)``, and the
    end of the last interval."""
    stretches, covered, last = [], intervals[0][1], intervals[0][2]
    for start, end, item in intervals[1:]:
        if start > covered:
            stretches.append((start - covered, covered, last, item))
        if end >= covered:
            covered, last = end, item
    return stretches, covered


def print_idle_gaps(prof, top: int = 8, kinds_top: int = 30) -> None:
    """The GPU's idle time within a profiled step: the span from its first activity's start to its last's end, the
    time some activity (kernel, copy, fill) ran, and the longest stretches in which none did, with the activities on
    either side (where the host, not the GPU, set the pace), and the activities by kind, most frequent first.
    Overlapping activities (several streams) count once."""
    activities = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
    if not activities:
        return
    gaps, covered = idle_stretches([(e.time_range.start, e.time_range.end, e.name) for e in activities])
    span = covered - activities[0].time_range.start
    idle = sum(g[0] for g in gaps)
    print(f"GPU span {span / 1e3:.2f} ms: busy {(span - idle) / 1e3:.2f} ms ({len(activities)} activities), idle "
          f"{idle / 1e3:.2f} ms in {len(gaps)} gaps; the longest:")
    for gap, _, before, after in sorted(gaps, key=lambda g: g[0], reverse=True)[:top]:
        print(f"  {gap:8.1f} us between {before[:60]!r} and {after[:60]!r}")
    # Every activity is a launch (or copy) and a gap after it: how many of each kind there are says which
    # launches a step could do without.
    kinds: dict = {}
    for e in activities:
        count, total = kinds.get(e.name[:70], (0, 0.0))
        kinds[e.name[:70]] = (count + 1, total + e.time_range.end - e.time_range.start)
    print("activities by kind (count, GPU time):")
    for name, (count, total) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:kinds_top]:
        print(f"  {count:5d} {total / 1e3:8.3f} ms  {name}")


def print_gap_sources(prof, top: int = 8) -> None:
    """Who left the GPU idle, from a step profiled with the host's ops and their Python stacks (``with_stack=True``):
    for the longest stretches in which no activity ran, the activity after each, the host op that launched it, when
    the host made that launch relative to the stretch's start (after it: the host set the pace) and the innermost
    Python function of ``align_losses`` (or of this script) running when it did. Recording the host slows it, so the
    stretches are longer than in `print_idle_gaps`' GPU-only profile; their order is what this is for. Kineto's
    records link a GPU activity to its host op (``linked_correlation_id``) and record Python calls as events of their
    own (named ``file(line): function``); a profiler without them prints why not."""
    try:
        events = prof.profiler.kineto_results.events()
        cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
        ops = {e.correlation_id(): e for e in events if e.device_type() == cpu and e.correlation_id() > 0}
        calls = [(e.start_ns(), e.end_ns(), e.start_thread_id(), e.name()) for e in events
                 if e.device_type() == cpu and ".py(" in e.name()
                 and ("align_losses" in e.name() or "torch_profile" in e.name())]
        activities = sorted((e for e in events if e.device_type() == cuda), key=lambda e: e.start_ns())
    except (AttributeError, RuntimeError) as error:
        print(f"gap sources: not available from this profiler ({type(error).__name__}: {error})")
        return
    if not activities:
        return
    gaps, _ = idle_stretches([(e.start_ns(), e.end_ns(), e) for e in activities])
    print(f"the longest idle stretches of a step profiled with the host's ops ({len(gaps)} stretches, "
          f"{sum(g[0] for g in gaps) / 1e6:.2f} ms), by what came after each:")
    for gap, idle_from, _, after in sorted(gaps, key=lambda g: g[0], reverse=True)[:top]:
        op = ops.get(after.linked_correlation_id())
        if op is None:
            print(f"  {gap / 1e3:8.1f} us before {after.name()[:50]!r} (no host op linked)")
            continue
        at, thread = op.start_ns(), op.start_thread_id()
        inside = [c for c in calls if c[2] == thread and c[0] <= at <= c[1]]
        where = max(inside)[3] if inside else "(no Python call recorded)"  # the latest to start: the innermost
        where = where[where.find("align_losses"):] if "align_losses" in where else where
        print(f"  {gap / 1e3:8.1f} us before {after.name()[:50]!r}: {op.name()} launched "
              f"{(op.start_ns() - idle_from) / 1e3:+.1f} us after the GPU went idle, from {where}")


def relative_difference(x: torch.Tensor, reference: torch.Tensor) -> float:
    """max |x - reference| / max |reference| over the reference's finite entries; inf where the two differ in
    which entries are NaN or infinite, or in the infinities themselves."""
    x, reference = x.float(), reference.float()
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(x)):
        return math.inf
    if not torch.equal(x[~finite].nan_to_num(), reference[~finite].nan_to_num()):  # +inf against -inf
        return math.inf
    if not finite.any():
        return 0.0
    return ((x - reference)[finite].abs().max() / reference[finite].abs().max().clamp(min=1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_commit_arg(parser)
    parser.add_argument("--tokens", type=int, default=N,
                        help=f"tokens, a quarter of them unlabelled (default {N}; head.py's long shape: 32768)")
    parser.add_argument("--sections", default="1,2,3,4", help="which sections to run (default all: 1,2,3,4)")
    parser.add_argument("--code-dir", help="section 4: write Inductor's generated code of each variant here")
    args = parser.parse_args()
    sections = {int(x) for x in args.sections.split(",")}
    if not sections <= {1, 2, 3, 4}:
        raise SystemExit(f"--sections takes numbers from 1 to 4 separated by commas; got {args.sections!r}")
    if args.tokens < 4:
        raise SystemExit(f"--tokens must be at least 4 (a quarter of them are unlabelled); got {args.tokens}")
    n = args.tokens
    if not torch.cuda.is_available():
        raise SystemExit("torch_profile.py profiles CUDA kernels: no CUDA device is visible")
    print(f"# torch backend profile: {_common.utc_now()}, commit {args.commit or _common.git_commit()}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    h, weight, y, up = problem(n)
    m = h.shape[0]

    def ours(options: dict):
        def step():
            logprobs = align_losses.linear_logprobs(h, weight, y, impl="torch", backend_options=options)
            (logprobs * up).sum().backward()
        return step

    def trl():
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

        def step():
            logprobs = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, chunk, None, 1.0, ())[0]
            (logprobs.float() * up).sum().backward()
        return step

    # The default budget (512 MiB of tile temporaries: 28 vocabulary blocks here) and twice it (14 blocks, half
    # the tile calls: how much of the time is per call rather than per element).
    cases = [("ours impl='torch'", ours({})), ("ours impl='torch', compiled tiles", ours({"compile_tiles": True})),
             ("ours impl='torch', 1 GiB budget", ours({"memory_budget": 2**30})),
             ("ours impl='torch', compiled tiles, 1 GiB budget", ours({"compile_tiles": True, "memory_budget": 2**30}))]
    try:
        cases.append(("TRL 1.16 chunked head", trl()))
    except ImportError as e:
        print(f"TRL's chunked head unavailable: {e}")
    print(f"\n## 1. forward + backward, {m} labelled tokens, D {D}, V {V}")
    for name, step in (cases if 1 in sections else []):
        try:
            ms, times = median_ms(step)
        except ValueError as e:  # an option this checkout does not have
            print(f"\n{name}: not run ({e})")
            continue
        print(f"\n== {name}: median {ms:.2f} ms ({', '.join(f'{t:.1f}' for t in times)})", flush=True)
        host = []
        for _ in range(5):  # the host's time to return from a step, before waiting for the GPU
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        print(f"host time to return: median {statistics.median(host):.2f} ms (a step that waits for the GPU "
              f"inside, as the torch backend's backward does once, returns after its GPU work up to there)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as stacked:
            step()
            torch.cuda.synchronize()
        # The gaps from a step profiled on the GPU side only: recording the host's ops too slows the host (37 ms of
        # host time against 18 in the kept run), and a first profile's buffer request opens a gap of its own.
        with profile(activities=[ProfilerActivity.CUDA]) as gpu_only:
            step()
            torch.cuda.synchronize()
        print_idle_gaps(gpu_only)
        print_gap_sources(stacked)
        averages = prof.key_averages()
        print(averages.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=90))
        # The host side: Dynamo's cache lookups and compiled regions, launches, synchronisations.
        print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=90))

    block = default_plan(m).backward_walk(row_scaled=True).vocab  # one token block at this size
    blocks = -(-V // block)
    w = weight.detach()[:block]
    a = torch.randn(m, block, device="cuda").bfloat16()
    acc_h = torch.zeros(m, D, device="cuda")
    forms = {
        "logits, bf16 out: h @ w.T": lambda: h.detach() @ w.t(),
        "logits, fp32 out: mm(out_dtype)": lambda: torch.mm(h.detach(), w.t(), out_dtype=torch.float32),
        "grad_h, fp32 out: mm(a, w, out_dtype)": lambda: torch.mm(a, w, out_dtype=torch.float32),
        "grad_h += mm(a, w, out_dtype) (then add)": lambda: acc_h.add_(torch.mm(a, w, out_dtype=torch.float32)),
        "grad_h: addmm(acc, a, w, out_dtype, out=acc)": lambda: torch.addmm(acc_h, a, w, out_dtype=torch.float32,
                                                                            out=acc_h),
        "grad_w, fp32 out: mm(a.T, h, out_dtype)": lambda: torch.mm(a.t(), h.detach(), out_dtype=torch.float32),
        "grad_w, bf16 out: a.T @ h": lambda: a.t() @ h.detach(),
    }
    print(f"\n## 2. GEMM forms alone: one block of {block} ids over {m} tokens ({blocks} blocks per pass)")
    for name, form in (forms.items() if 2 in sections else []):
        ms, _ = median_ms(form, reps=21)
        print(f"{name:46s} {ms:.3f} ms  {2 * m * block * D / ms / 1e9:.0f} TFLOP/s  x{blocks} = {ms * blocks:.1f} ms")

    z = torch.randn(m, block, device="cuda") * 4
    out32 = torch.empty_like(z)
    out16 = torch.empty(m, block, device="cuda", dtype=torch.bfloat16)
    row = torch.randn(m, device="cuda")
    column = torch.randint(0, block, (m, 1), device="cuda")
    passes = {
        "z.max(dim=1) (values and indices)": lambda: z.max(dim=1),
        "z.amax(dim=1)": lambda: z.amax(dim=1),
        "z - row[:, None] (a new tile)": lambda: z - row[:, None],
        "sub(z, row[:, None], out=)": lambda: torch.sub(z, row[:, None], out=out32),
        "exp(z) (a new tile)": lambda: torch.exp(z),
        "exp(z, out=bf16 tile)": lambda: torch.exp(z, out=out16),
        "z.sum(dim=1)": lambda: z.sum(dim=1),
        "logsumexp(z, dim=1)": lambda: torch.logsumexp(z, dim=1),
        "softmax(z, dim=1)": lambda: torch.softmax(z, dim=1),
        "mul_(row[:, None])": lambda: out32.mul_(row[:, None]),
        "z.to(bf16)": lambda: z.to(torch.bfloat16),
        "z.gather(1, column)": lambda: z.gather(1, column),
        f"zeros [{block}, {D}] fp32": lambda: torch.zeros(block, D, device="cuda"),
    }
    print(f"\n## 3. elementwise passes alone over one fp32 tile [{m}, {block}] ({m * block * 4 / 2**20:.0f} MiB)")
    for name, op in (passes.items() if 3 in sections else []):
        ms, _ = median_ms(op, reps=21)
        print(f"{name:46s} {ms:.3f} ms  x{blocks} = {ms * blocks:.1f} ms")
    if 4 in sections:
        tile_functions(m, args.code_dir)


def tile_functions(m: int, code_dir) -> None:
    """Section 4: the compiled tile functions alone, under Inductor option variants, on the tiles of the default
    plan's walks (`default_plan`: the forward's for `fold_tile`, the backward's for `tile_grad`) at ``m`` labelled
    tokens and at head.py's long shape (24576)."""
    from torch._inductor.utils import run_and_get_code

    from align_losses.ops import tiles
    from align_losses.ops.stats import Stats
    from align_losses.problem import LogitTransform

    long_m = 24576
    print(f"\n## 4. compiled tile functions alone (losses' case), the default plan's tiles at {m} and {long_m} tokens; "
          f"GB/s of fp32 tile read (+ bf16 written by tile_grad)")
    for fn, walk in ((tiles.fold_tile, "forward"), (tiles.tile_grad, "backward")):
        for tokens in (m, long_m):
            plan = default_plan(tokens)
            t, w = plan.forward if walk == "forward" else plan.backward_walk(row_scaled=True)
            tile_count = -(-tokens // t) * -(-V // w)
            z = torch.randn(t, w, device="cuda") * 4
            y = torch.randint(0, V, (t,), device="cuda") % (2 * w)  # half the labels inside this tile
            first = torch.zeros((), dtype=torch.int64, device="cuda")
            identity = LogitTransform()
            if fn is not tiles.tile_grad:
                state = Stats.empty(t, z.device, frozenset({"logprobs"}))
                state = tiles.RowStats(*(f.clone() if f is not None else None for f in state.take(slice(0, t))))
                # Statistics of earlier tiles, some above this tile's logits and some below, so the merge is checked.
                state = state._replace(max=torch.randn(t, device="cuda") * 4 + 8,
                                       sum_exp=torch.rand(t, device="cuda") + 1,
                                       label_logit=torch.randn(t, device="cuda"))
                args = (state, None, y, first, identity)
                moved = t * w * 4
            else:
                up = tiles.Upstream(torch.randn(t, device="cuda"), None, None, None)
                shift = torch.randn(t, device="cuda") + 4
                args = (None, y, first, shift.clone(), None, up, identity, V, torch.bfloat16, True, False, shift)
                moved = t * w * 6
            with torch.no_grad():  # eagerly: the compiled fold's softmax form against the two-pass form
                reference = fn(z, *args)
            for name, (options, static) in INDUCTOR_VARIANTS.items():
                torch._dynamo.reset()
                compiled = compile_tile(fn, options, static)
                a = z.clone()
                try:
                    with torch.no_grad():
                        result, code = run_and_get_code(compiled, a, *args)
                        ms = kernel_ms(lambda: compiled(a, *args))
                except Exception as e:  # an option this torch lacks
                    print(f"{fn.__name__} [{t}, {w}] {name}: failed ({type(e).__name__}: {str(e)[:200]})")
                    continue
                diff = max(relative_difference(x, r) for x, r in zip(result, reference)
                           if r is not None and r.is_floating_point())
                text = "\n".join(code)
                online = "online_softmax" in text
                print(f"{fn.__name__:10s} [{t}, {w}] {name:34s} {ms * 1e3:7.1f} us  {moved / ms / 1e6:6.0f} GB/s  "
                      f"x{tile_count}  online softmax: {online}  max |compiled - eager| / max |eager| {diff:.1e}",
                      flush=True)
                if code_dir:
                    os.makedirs(code_dir, exist_ok=True)
                    slug = name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
                    with open(os.path.join(code_dir, f"{fn.__name__}-{t}x{w}-{slug}.py"), "w") as f:
                        f.write(text)


if __name__ == "__main__":
    main()
