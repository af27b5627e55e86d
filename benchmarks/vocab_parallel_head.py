"""The vocabulary-parallel LM head across P GPUs against the unsharded head on one GPU, in one torchrun job.

A Gemma-2-9B-like head (V 256000, D 3584, final logit soft-cap 30.0, bf16) is split by rows: rank r holds
its contiguous shard ``W[start_r:stop_r]`` (``V // P`` rows, one more on the first ``V % P`` ranks) and calls
``align_losses.linear_logprobs(hidden, shard, labels, softcap=30.0, process_group=WORLD)``; the hidden states
``[N, D]`` and labels ``[N]`` (global ids) are the same on every rank (same seed). The first quarter of the
tokens is prompt (label -100), as in head.py (the core drops ignored tokens before any work, so where they sit
does not matter). ``W`` ~ N(0, std^2 / D) with std ``--logit-std`` (8, head.py's "peaky"): raw logits of std 8,
whose top the cap of 30 bends.

    torchrun --standalone --nproc_per_node 2 benchmarks/vocab_parallel_head.py --commit COMMIT   # 2 GPUs
    torchrun --standalone --nproc_per_node 4 benchmarks/vocab_parallel_head.py --commit COMMIT   # 4 GPUs
    torchrun --standalone --nproc_per_node 8 benchmarks/vocab_parallel_head.py --commit COMMIT   # 8 GPUs
    for P in 2 4 8; do torchrun --standalone --nproc_per_node $P benchmarks/vocab_parallel_head.py \\
        --commit COMMIT --append; done                                    # 8 GPUs: P = 2, 4, 8 in one table
    torchrun --standalone --nproc_per_node 2 benchmarks/vocab_parallel_head.py --quick --device cpu --out /tmp/vp

(``python3 -m torch.distributed.run`` where there is no ``torchrun`` script; ``--commit`` where the copy has no
``.git``.) ``--quick``: V 1000, D 64,
96 tokens, 1 + 3 steps; on CPU (gloo, impl torch, seconds) unless ``--device cuda`` (NCCL, triton); ``--device
cpu`` implies ``--quick``. Exit status 1 when a row fails its check or its reference, 2 on a bad argument.

Per token count (``--tokens``, default 8192 and 32768), in this order:

1. the unsharded reference: rank 0 alone runs the full head (full ``W`` on its GPU) with the same inputs, while
   the other ranks wait at a barrier; its peak and time are measured as below, then the full ``W`` is freed;
2. the correctness check, on one set of labels and upstream gradient: the sharded log-probs against the
   unsharded ones (max abs difference), grad_hidden (relative norm of the difference, rank 0) and each rank's
   grad ``W`` shard against its rows of the unsharded grad ``W`` (sent by rank 0); a row is flagged when the
   log-prob difference exceeds ``LOGPROB_TOL`` nats or a gradient's relative difference ``GRAD_TOL`` (2^-8, bf16's
   unit roundoff: both sides round their gradients to bf16 once, from fp32 sums taken in different orders);
3. the sharded head on every rank.

One step = ``linear_logprobs`` + ``torch.autograd.grad((logprobs * upstream).sum(), (hidden, W))`` with fresh
random labels and a random N(0, 1) per-token upstream gradient at every repetition. After ``--warmup`` steps,
``--reps`` steps are timed with the wall clock between device synchronisations; for the sharded head every
repetition starts after a barrier, so the ranks run it together. Reported:

* ``peak_gib``: ``max_memory_allocated`` over the timed steps above ``memory_allocated`` with the inputs (hidden,
  ``W`` or its shard, the labels and upstream gradients) in place; the returned gradients are in it. Per rank,
  and the max over ranks (CPU: "-", no allocator statistics);
* ``ms``: the median over repetitions of the slowest rank's time (``rank_ms``: each rank's own median);
* ``ref_peak_gib``, ``ref_ms``: the same for the unsharded head on rank 0; ``peak_ratio``, ``time_ratio``:
  sharded / unsharded;
* ``weight_gib``: each rank's shard of ``W`` (``weight_full_gib``: the whole head), inputs, not in the peak.

Rank 0 writes ``--out``/``--name``.{json,md} (default ``benchmarks/results/vocab-parallel-head-latest``;
``vocab-parallel-head-quick`` with ``--quick``) after every token count. ``--append`` keeps the rows already in
that JSON except those this run replaces (same GPU count, impl, shape and token count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, however this is run
import _common  # noqa: E402 - puts the checkout on sys.path too
from _common import GiB, fmt, log, md_escape, meta_lines  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import align_losses  # noqa: E402
from align_losses import backends  # noqa: E402
from align_losses.backends.base import HeadProblem, LogitTransform, VocabShard  # noqa: E402

IGNORE = -100
PROMPT_FRACTION = 0.25
#: Gemma-2-9B's head (config.json of google/gemma-2-9b: vocab_size, hidden_size, final_logit_softcapping).
GEMMA2_9B = dict(vocab=256000, hidden=3584, softcap=30.0, tokens="8192,32768", reps=10, warmup=2)
QUICK = dict(vocab=1000, hidden=64, tokens="96", reps=3, warmup=1)
LOGIT_STD = 8.0
LOGPROB_TOL = 1e-3  # nats; both sides keep the softmax statistics in fp32
GRAD_TOL = 2.0**-8  # bf16's unit roundoff: each side rounds its fp32 gradient sums to bf16 once
VERSIONS = ("torch", "triton")

Sets = list  # [(labels [N] int64, upstream [N] fp32)]
Step = Callable[[torch.Tensor, torch.Tensor], tuple]


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = _common.doc_parser(__doc__)
    p.add_argument("--tokens", help=f"comma-separated token counts N (default {GEMMA2_9B['tokens']}; --quick "
                                    f"{QUICK['tokens']}); the first quarter of each is ignored (label -100)")
    p.add_argument("--impl", help="backend (default triton on CUDA, torch on CPU); it must take a vocabulary shard")
    p.add_argument("--vocab", type=int, help=f"V (default {GEMMA2_9B['vocab']}; --quick {QUICK['vocab']})")
    p.add_argument("--hidden", type=int, help=f"D (default {GEMMA2_9B['hidden']}; --quick {QUICK['hidden']})")
    p.add_argument("--softcap", type=float, default=GEMMA2_9B["softcap"],
                   help=f"final logit soft-cap (default {GEMMA2_9B['softcap']}, Gemma-2's; 0 for none)")
    p.add_argument("--logit-std", type=float, default=LOGIT_STD, help=f"std of the raw logits (default {LOGIT_STD})")
    p.add_argument("--reps", type=int, help=f"timed steps (default {GEMMA2_9B['reps']}; --quick {QUICK['reps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {GEMMA2_9B['warmup']}; --quick "
                                              f"{QUICK['warmup']})")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in the output JSON but those this run replaces")
    _common.add_run_args(p, quick_help=f"V {QUICK['vocab']}, D {QUICK['hidden']}, {QUICK['tokens']} tokens, on CPU "
                                       "unless --device cuda: a smoke test",
                         name_help="output file stem (default vocab-parallel-head-latest; vocab-parallel-head-quick "
                                   "with --quick)")
    return p


def resolve_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on ``--quick`` / ``--device`` (``--device cpu`` implies ``--quick``)."""
    args.quick = args.quick or args.device == "cpu"
    args.device = args.device or ("cpu" if args.quick else "cuda")
    base = QUICK if args.quick else GEMMA2_9B
    for key in ("vocab", "hidden", "tokens", "reps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.impl = args.impl or ("triton" if args.device == "cuda" else "torch")
    args.name = args.name or ("vocab-parallel-head-quick" if args.quick else "vocab-parallel-head-latest")
    args.softcap = args.softcap or None


def validate(args: argparse.Namespace, world: int) -> list[int]:
    """Check the arguments before any work; returns the token counts. Raises ValueError with the reason."""
    if world < 2:
        raise ValueError("launch under torchrun with --nproc_per_node P, P >= 2 "
                         "(torchrun --standalone --nproc_per_node 2 benchmarks/vocab_parallel_head.py ...)")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--tokens must be comma-separated integers; got {args.tokens!r}") from None
    if not tokens or min(tokens) < 1:
        raise ValueError(f"--tokens must list positive token counts; got {args.tokens!r}")
    if args.vocab < world:
        raise ValueError(f"{world} ranks but a vocabulary of {args.vocab} rows: every rank needs at least one row")
    for key in ("hidden", "reps", "warmup"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1; got {getattr(args, key)}")
    if not args.logit_std > 0:
        raise ValueError(f"--logit-std must be > 0; got {args.logit_std}")
    if args.softcap is not None and args.softcap < 0:
        raise ValueError(f"--softcap must be >= 0 (0: none); got {args.softcap}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available (use --quick or --device cpu)")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local > torch.cuda.device_count():
            raise ValueError(f"{local} processes on this host but {torch.cuda.device_count()} GPUs: "
                             "one GPU per process")
    return tokens


def check_impl(args: argparse.Namespace, device: torch.device) -> str:
    """The backend ``--impl`` names, checked as the core checks a sharded call (ValueError if it cannot run it)."""
    probe = HeadProblem(
        hidden=torch.empty(0, args.hidden, dtype=torch.bfloat16, device=device),
        weight=torch.empty(0, args.hidden, dtype=torch.bfloat16, device=device),
        bias=None,
        labels=torch.empty(0, dtype=torch.long, device=device),
        transform=LogitTransform(softcap=args.softcap),
        outputs=frozenset({"logprobs"}),
        shard=VocabShard(start=0, size=args.vocab, group=None),
    )
    return backends.check(args.impl, probe).name


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def shard_bounds(vocab: int, world: int) -> list[tuple[int, int]]:
    """Each rank's rows ``[start, stop)``: ``vocab // world`` rows, one more on the first ``vocab % world`` ranks."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def make_hidden(tokens: int, hidden: int, device: torch.device, seed: int) -> torch.Tensor:
    """Hidden states ``[tokens, hidden]`` bf16 ~ N(0, 1), a leaf that requires grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tokens, hidden, device=device, generator=g, dtype=torch.bfloat16).requires_grad_(True)


def make_weight(vocab: int, hidden: int, std: float, device: torch.device, seed: int) -> torch.Tensor:
    """The full head ``[vocab, hidden]`` bf16 ~ N(0, std^2 / hidden): raw logits of std ``std`` on N(0, 1) inputs.

    Drawn whole on every rank (same seed, same values) so that each rank can cut its shard from it.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(vocab, hidden, device=device, generator=g, dtype=torch.bfloat16).mul_(std / hidden**0.5)


def make_sets(count: int, tokens: int, vocab: int, device: torch.device, seed: int) -> Sets:
    """``count`` pairs of labels ``[tokens]`` int64 (first quarter -100) and upstream gradients ``[tokens]`` fp32."""
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
        labels[: int(tokens * PROMPT_FRACTION)] = IGNORE
        sets.append((labels, torch.randn(tokens, device=device, generator=g)))
    return sets


# ---------------------------------------------------------------------------------------------------------------------
# Measurement


def head_step(labels: torch.Tensor, upstream: torch.Tensor, *, hidden: torch.Tensor, weight: torch.Tensor, impl: str,
              softcap: Optional[float], group=None) -> tuple:
    """One forward + backward: log-probs ``[N]`` fp32 (detached), grad hidden ``[N, D]`` and grad W ``[V_local, D]``
    (bf16). ``group`` None: ``weight`` is the whole head."""
    logprobs = align_losses.linear_logprobs(hidden, weight, labels, softcap=softcap, impl=impl, process_group=group)
    grad_h, grad_w = torch.autograd.grad((logprobs * upstream).sum(), (hidden, weight))
    return logprobs.detach(), grad_h, grad_w


def measure(step: Step, warm: Sets, timed: Sets, device: torch.device, together: bool) -> tuple:
    """Warm-up steps, then ``(peak GiB above the allocation before the timed steps or None on CPU, [ms per step])``.

    ``together``: a barrier before every timed step (all ranks run it); otherwise this rank runs alone.
    """
    cuda = device.type == "cuda"
    for labels, upstream in warm:
        step(labels, upstream)
    _common.free_memory(device.type)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for labels, upstream in timed:
        if together:
            dist.barrier()
        _common.sync(device.type)
        t0 = time.perf_counter()
        step(labels, upstream)
        _common.sync(device.type)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / GiB if cuda else None
    return peak, times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32."""
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def gather_floats(values: list, device: torch.device) -> list:
    """Every rank's ``values`` (same length on each), as ``[[rank 0's], [rank 1's], ...]``."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank."""
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def scatter_rows(full: Optional[torch.Tensor], bounds: list, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of rank 0's ``full [V, D]``, shaped like ``like [V_local, D]`` (point to point from rank 0)."""
    if dist.get_rank() == 0:
        for r, (start, stop) in enumerate(bounds[1:], start=1):
            dist.send(full[start:stop].contiguous(), dst=r)
        return full[bounds[0][0]: bounds[0][1]]
    out = torch.empty_like(like)
    dist.recv(out, src=0)
    return out


def run_reference(step: Step, sets: Sets, warmup: int, device: torch.device) -> dict:
    """Rank 0 alone: the unsharded head's peak and times, then its outputs on ``sets[0]`` (the check set).

    A failure (e.g. out of memory) is returned as ``{"error": ...}`` so that the sharded rows still run.
    """
    try:
        peak, times = measure(step, sets[1: 1 + warmup], sets[1 + warmup:], device, together=False)
        logprobs, grad_h, grad_w = step(*sets[0])
        return {"peak": peak, "times": times, "logprobs": logprobs, "grad_h": grad_h, "grad_w": grad_w, "error": None}
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        return {"error": f"unsharded reference: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def check_shard(step: Step, check_set: tuple, ref: Optional[dict], bounds: list,
                device: torch.device) -> Optional[dict]:
    """The sharded outputs on the check set against the unsharded ``ref`` (rank 0's; None elsewhere).

    Returns, on rank 0, ``logprob_max_abs_diff``, ``grad_h_rel`` and every rank's ``rank_grad_w_rel``; None on
    the other ranks and when the reference failed.
    """
    logprobs, grad_h, grad_w = step(*check_set)
    if not broadcast_flag(ref is not None and ref["error"] is None, device):
        return None
    ref_rows = scatter_rows(ref["grad_w"] if ref else None, bounds, like=grad_w)
    rank_grad_w_rel = [r[0] for r in gather_floats([rel(grad_w, ref_rows)], device)]
    if dist.get_rank() != 0:
        return None
    return {
        "logprob_max_abs_diff": float((logprobs - ref["logprobs"]).abs().max()),
        "grad_h_rel": rel(grad_h, ref["grad_h"]),
        "rank_grad_w_rel": rank_grad_w_rel,
    }


def run_tokens(tokens: int, args: argparse.Namespace, impl: str, device: torch.device) -> Optional[dict]:
    """Reference, check and sharded measurement for one token count; the result row on rank 0 (None elsewhere)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    bounds = shard_bounds(args.vocab, world)
    start, stop = bounds[rank]
    hidden = make_hidden(tokens, args.hidden, device, args.seed)
    full = make_weight(args.vocab, args.hidden, args.logit_std, device, args.seed + 1)
    shard = full[start:stop].clone().requires_grad_(True)
    full = full.requires_grad_(True) if rank == 0 else None
    sets = make_sets(1 + args.warmup + args.reps, tokens, args.vocab, device, args.seed + 2)
    step = partial(head_step, hidden=hidden, impl=impl, softcap=args.softcap)

    ref = run_reference(partial(step, weight=full), sets, args.warmup, device) if rank == 0 else None
    del full
    dist.barrier()
    errors = check_shard(partial(step, weight=shard, group=dist.group.WORLD), sets[0], ref, bounds, device)
    ref_summary = {k: ref[k] for k in ("peak", "times", "error") if k in ref} if ref else None
    del ref
    _common.free_memory(device.type)

    peak, times = measure(partial(step, weight=shard, group=dist.group.WORLD), sets[1: 1 + args.warmup],
                          sets[1 + args.warmup:], device, together=True)
    rank_times = gather_floats(times, device)
    rank_peaks = [p[0] for p in gather_floats([peak], device)] if peak is not None else None
    if rank != 0:
        return None
    return result_row(tokens, args, impl, bounds, rank_peaks, rank_times, ref_summary, errors)


def result_row(tokens: int, args: argparse.Namespace, impl: str, bounds: list, rank_peaks: Optional[list],
               rank_times: list, ref: dict, errors: Optional[dict]) -> dict:
    """One JSON row from the gathered measurements (rank 0)."""
    slowest = [max(rep) for rep in zip(*rank_times)]
    ms = statistics.median(slowest)
    peak = max(rank_peaks) if rank_peaks else None
    ref_ms = statistics.median(ref["times"]) if ref.get("times") else None
    ref_peak = ref.get("peak")
    row = {
        "world_size": len(bounds), "impl": impl, "tokens": tokens, "labelled": tokens - int(tokens * PROMPT_FRACTION),
        "vocab": args.vocab, "hidden": args.hidden, "softcap": args.softcap, "logit_std": args.logit_std,
        "dtype": "bfloat16", "warmup": args.warmup, "reps": args.reps,
        "shard_rows": [stop - start for start, stop in bounds],
        "weight_gib": [2 * (stop - start) * args.hidden / GiB for start, stop in bounds],
        "weight_full_gib": 2 * args.vocab * args.hidden / GiB,
        "rank_peak_gib": rank_peaks, "peak_gib": peak,
        "rank_ms": [statistics.median(t) for t in rank_times], "rank_ms_all": rank_times,
        "ms": ms, "ms_all": slowest, "time_stat": "median over repetitions of the slowest rank's time",
        "ref_peak_gib": ref_peak, "ref_ms": ref_ms, "ref_ms_all": ref.get("times"),
        "peak_ratio": peak / ref_peak if peak is not None and ref_peak else None,
        "time_ratio": ms / ref_ms if ref_ms else None,
        "logprob_max_abs_diff": None, "grad_h_rel": None, "rank_grad_w_rel": None, "grad_w_rel": None,
        "tolerances": {"logprob_max_abs_diff": LOGPROB_TOL, "grad_rel": GRAD_TOL},
        "check_ok": None, "error": ref.get("error"),
    }
    if errors:
        row.update(errors, grad_w_rel=max(errors["rank_grad_w_rel"]))
        row["check_ok"] = (row["logprob_max_abs_diff"] <= LOGPROB_TOL and row["grad_h_rel"] <= GRAD_TOL
                           and row["grad_w_rel"] <= GRAD_TOL)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Output


def row_key(row: dict) -> tuple:
    """What a row measured: ``(world_size, impl, vocab, hidden, softcap, tokens)``."""
    return row["world_size"], row["impl"], row["vocab"], row["hidden"], row["softcap"], row["tokens"]


def kept_rows(args: argparse.Namespace, world: int, impl: str, tokens: list) -> list:
    """With ``--append``, the rows of the existing output JSON that this run does not measure again."""
    path = os.path.join(args.out, f"{args.name}.json")
    if not args.append or not os.path.exists(path):
        return []
    replaced = {(world, impl, args.vocab, args.hidden, args.softcap, n) for n in tokens}
    with open(path) as f:
        return [r for r in json.load(f) if row_key(r) not in replaced]


def _gib(x) -> str:
    return fmt(x, ".3f", " GiB")


def _ms(x) -> str:
    return fmt(x, ".2f", " ms")


def _check(row: dict) -> str:
    return {None: "-", True: "✓", False: "✗ over tolerance"}[row.get("check_ok")]


def render_markdown(rows: list, meta: dict) -> str:
    """One table of the sharded head against the unsharded one per shape, then the per-rank figures."""
    rows = sorted(rows, key=lambda r: (r["vocab"], r["hidden"], r["tokens"], r["world_size"], r["impl"]))
    out = [
        "# Vocabulary-parallel LM head: per-GPU memory and time against the unsharded head on one GPU",
        "",
        *meta_lines(meta),
        "",
        "bf16 hidden `[N, D]` and head, labels in global ids (first quarter -100), the same on every rank; each rank",
        "holds a contiguous shard of W. One step = `linear_logprobs(..., softcap, process_group)` + autograd.grad of",
        "(log-probs x a random upstream gradient) w.r.t. hidden and the W shard, fresh labels every repetition.",
        "Peak = max_memory_allocated above the inputs in place (W or its shard, hidden, labels; the returned",
        "gradients are in it), max over ranks. Time = median over repetitions of the slowest rank (a barrier starts",
        "each repetition). Unsharded = the full head on rank 0's GPU alone, same inputs, same run. Check: sharded",
        f"against unsharded, log-prob max abs diff <= {LOGPROB_TOL:g} nats, grad_h and grad_W (worst rank) relative",
        f"difference <= {GRAD_TOL:.2g}. Rows of other runs (`--append`) carry their own date and commit in the JSON.",
        "",
        "| GPUs | impl | N (labelled) | W per GPU | peak above inputs | unsharded: W, peak | peak ratio "
        "| time | unsharded time | time ratio | log-prob diff | grad_h rel | grad_W rel | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            str(r["world_size"]), r["impl"], f"{r['tokens']} ({r['labelled']})", _gib(max(r["weight_gib"])),
            _gib(r.get("peak_gib")), f"{_gib(r['weight_full_gib'])}, {_gib(r.get('ref_peak_gib'))}",
            fmt(r.get("peak_ratio"), ".2f"), _ms(r.get("ms")), _ms(r.get("ref_ms")), fmt(r.get("time_ratio"), ".2f"),
            fmt(r.get("logprob_max_abs_diff"), ".1e"), fmt(r.get("grad_h_rel"), ".1e"), fmt(r.get("grad_w_rel"), ".1e"),
            _check(r),
        ]
        out.append("| " + " | ".join(cells) + " |")
        if r.get("error"):
            out.append(f"| | error | {md_escape(r['error'])} | | | | | | | | | | | |")
    out += ["", "## Per rank", "", "| GPUs | impl | N | rank | vocab rows | W shard | peak above inputs | median time "
            "| grad_W rel |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, rows_i in enumerate(r["shard_rows"]):
            cells = [str(r["world_size"]), r["impl"], str(r["tokens"]), str(i), str(rows_i), _gib(r["weight_gib"][i]),
                     _gib((r.get("rank_peak_gib") or [None] * len(r["shard_rows"]))[i]), _ms(r["rank_ms"][i]),
                     fmt((r.get("rank_grad_w_rel") or [None] * len(r["shard_rows"]))[i], ".1e")]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def local_device(device_type: str) -> torch.device:
    """This process's device: GPU ``$LOCAL_RANK`` (made current) on CUDA, else the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    resolve_args(args)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)  # P processes share the host's cores; the CPU run is 2 processes on 2 cores
    try:
        tokens = validate(args, world)
        device = local_device(args.device)
        impl = check_impl(args, device)
    except ValueError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2

    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    launcher = f"torchrun --standalone --nproc_per_node {world}"
    command = _common.command_line(__file__, argv).replace("python", launcher, 1)
    try:
        return run(args, tokens, impl, device, command)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, tokens: list, impl: str, device: torch.device, command: str) -> int:
    """Every token count in turn; rank 0 logs and writes the outputs after each."""
    world, rank = dist.get_world_size(), dist.get_rank()
    say = log if rank == 0 else (lambda msg: None)
    meta = _common.run_meta(
        args.commit, f"{world} x {_common.device_name(args.device)}", _common.versions(VERSIONS), command,
        world_size=world, impl=impl,
        model_desc=(f"Gemma-2-9B-like head{' (--quick: tiny)' if args.quick else ''}: V {args.vocab}, D {args.hidden}, "
                    f"soft-cap {args.softcap}, bf16, raw logits of std {args.logit_std:g}; sharded over {world} ranks"),
    )
    previous = kept_rows(args, world, impl, tokens) if rank == 0 else []
    say(f"device {meta['device']} x {world}; impl {impl}; V {args.vocab}, D {args.hidden}; shards "
        f"{[b - a for a, b in shard_bounds(args.vocab, world)]}; tokens {tokens}; {args.warmup} + {args.reps} steps; "
        f"out {args.out}/{args.name}.{{json,md}}")
    rows = []
    for n in tokens:
        say(f"N {n}: unsharded on rank 0, check, sharded on {world} ranks ...")
        row = run_tokens(n, args, impl, device)
        _common.free_memory(device.type)
        if rank != 0:
            continue
        rows.append({**_common.row_meta(meta), "command": meta["command"], **row})
        say(f"  sharded peak {_gib(row['peak_gib'])}, {_ms(row['ms'])} (rank medians "
            f"{[round(t, 2) for t in row['rank_ms']]}); unsharded peak {_gib(row['ref_peak_gib'])}, "
            f"{_ms(row['ref_ms'])}; log-prob diff {fmt(row['logprob_max_abs_diff'], '.1e')}, grad_h rel "
            f"{fmt(row['grad_h_rel'], '.1e')}, grad_W rel {fmt(row['grad_w_rel'], '.1e')}: {_check(row)}"
            + (f"; {row['error']}" if row["error"] else ""))
        paths = _common.write_outputs(previous + rows, meta, args, render_markdown)
    if rank == 0:
        say(f"wrote {paths['json']} and {paths['md']}")
        print(render_markdown(previous + rows, meta), flush=True)
    ok = all(r["check_ok"] and not r["error"] for r in rows)
    return 0 if broadcast_flag(ok, device) else 1


if __name__ == "__main__":
    sys.exit(main())
