"""Where the time of one head step goes, on a CUDA GPU (benchmarks/NOTES-triton.md, version 7).

The step is head.py's: hidden [4, T, D] bf16 with the first quarter of each row ignored ->
``linear_logprobs(impl="triton")`` -> DPO sigmoid loss -> ``autograd.grad`` of hidden and W.

    python benchmarks/triton_step.py timeline [shapes]   # one step under torch.profiler: kernels, GPU idle gaps
    python benchmarks/triton_step.py modes [shapes]      # step and floor after a pause, from idle, back-to-back
    python benchmarks/triton_step.py widths              # backward chunk widths A/B, interleaved, in those modes
    python benchmarks/triton_step.py clocks              # nvidia-smi clocks / power / throttle reasons meanwhile
    python benchmarks/triton_step.py paths [shapes]      # eager, compiled and sync-free steps: modes + timelines

Shapes: qwen (2 pairs x 2048, D 2048, V 151936), llama (D 4096, V 128256), long (2 pairs x 8192).
Writes ``triton-step-<what>.json`` into ``$OUT`` (default: the current directory), with the date, the
device and ``$ALIGN_LOSSES_COMMIT`` (the GPU machine's copy has no ``.git``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import align_losses  # noqa: E402

SHAPES = {"qwen": (2, 2048, 2048, 151936), "llama": (2, 2048, 4096, 128256), "long": (2, 8192, 2048, 151936)}
#: (default width before version 7, the wave-filling width) per shape, for `widths`
WIDTHS = {"qwen": (8704, 8448), "llama": (10240, 8448), "long": (3584, 2048)}


def make(shape, std, seed):
    pairs, seq, d, v = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(2 * pairs, seq, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, d, device="cuda", generator=g) * (std / math.sqrt(d))).to(torch.bfloat16).requires_grad_(True)
    return h, w


def labels(shape, seed):
    pairs, seq, _, v = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    lab = torch.randint(0, v, (2 * pairs, seq), device="cuda", generator=g)
    lab[:, : seq // 4] = -100
    return lab


def dpo(h, w, lab, pairs, options=None):
    lp = align_losses.linear_logprobs(h, w, lab, impl="triton", backend_options=options)
    seq = lp.float().sum(-1)
    return -torch.nn.functional.logsigmoid(0.1 * (seq[:pairs] - seq[pairs:])).mean()


def step(h, w, lab, pairs, options=None):
    return torch.autograd.grad(dpo(h, w, lab, pairs, options), (h, w))


_compiled_dpo = None


def compiled_step(h, w, lab, pairs):
    """`step` with the forward and loss under ``torch.compile(fullgraph=True)``: the head runs through the
    registered operators (`align_losses.ops.library`), as head.py's ``ours-triton-compiled`` row."""
    global _compiled_dpo
    if _compiled_dpo is None:
        _compiled_dpo = torch.compile(dpo, fullgraph=True)
    return torch.autograd.grad(_compiled_dpo(h, w, lab, pairs), (h, w))


def sync_free_step(h, w, lab, pairs):
    """`step` eagerly on the operators' sync-free path, as captured in head.py's CUDA-graph row (the labelled
    count as ``max_labelled``; no graph, so the host's launches stay visible)."""
    with align_losses.no_host_sync():
        return step(h, w, lab, pairs, {"max_labelled": int((lab != -100).sum())})


#: The paths through the head that `paths` compares, each a step function ``(h, w, labels, pairs)``.
PATHS = {"eager": step, "compiled": compiled_step, "sync-free": sync_free_step}


def floor_fn(shape, h, w, lab):
    """head.py's floor: the three bf16 GEMMs over the labelled tokens, into preallocated outputs."""
    v = shape[3]
    hl = h.detach().reshape(-1, h.shape[-1])[lab.reshape(-1) != -100].contiguous()
    wd = w.detach()
    gz = (torch.randn(hl.shape[0], v, device="cuda") * 1e-3).to(torch.bfloat16)
    z, gh, gw = torch.empty(hl.shape[0], v, device="cuda", dtype=torch.bfloat16), torch.empty_like(hl), torch.empty_like(wd)

    def floor():
        torch.mm(hl, wd.t(), out=z)
        torch.mm(gz, wd, out=gh)
        torch.mm(gz.t(), hl, out=gw)
    return floor


def timed(fn, mode: str) -> float:
    """ms of ``fn`` by CUDA events: after a 100 ms pause, from an idle GPU, or per call of three back-to-back."""
    torch.cuda.synchronize()
    if mode == "pause":
        time.sleep(0.1)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 3 if mode == "b2b" else 1
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


def timeline(name, fn=step):
    """One step of ``fn`` under torch.profiler, after three warm-ups: GPU busy time, idle gaps, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    shape = SHAPES[name]
    h, w = make(shape, 2.0, 1)
    for i in range(3):
        fn(h, w, labels(shape, 10 + i), shape[0])
    lab = labels(shape, 99)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(h, w, lab, shape[0])
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, gaps, last = 0.0, [], kernels[0][0]
    by_name = {}
    for s, e, n in kernels:
        if s > last + 5:  # microseconds
            gaps.append((round((s - last) / 1e3, 3), n[:60]))
        busy += max(0.0, e - max(s, last))
        last = max(last, e)
        entry = by_name.setdefault(n[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += (e - s) / 1e3
    return {"span_ms": (kernels[-1][1] - kernels[0][0]) / 1e3, "busy_ms": busy / 1e3,
            "gaps_ms": sum(g[0] for g in gaps), "largest_gaps": sorted(gaps, reverse=True)[:10],
            "kernels_ms": sorted(((round(t, 3), c, n) for n, (c, t) in by_name.items()), reverse=True)[:12]}


def modes(name, variants: dict, reps: int):
    """Median ms and ratio to the floor of each variant (a step function ``(h, w, labels, pairs)``) in each
    timing mode, interleaved."""
    shape = SHAPES[name]
    pairs = shape[0]
    h, w = make(shape, 2.0, 4)
    floor = floor_fn(shape, h, w, labels(shape, 5))
    for fn in variants.values():
        fn(h, w, labels(shape, 6), pairs)
    floor()
    times = {(k, m): [] for k in ("floor", *variants) for m in ("pause", "idle", "b2b")}
    for r in range(reps):
        lab = labels(shape, 200 + r)
        order = ["floor", *variants]
        for k in (order if r % 2 == 0 else order[::-1]):
            fn = floor if k == "floor" else (lambda f=variants[k]: f(h, w, lab, pairs))
            for m in ("pause", "idle", "b2b"):
                times[(k, m)].append(timed(fn, m))
    out = {}
    for m in ("pause", "idle", "b2b"):
        f = statistics.median(times[("floor", m)])
        out[m] = {"floor_ms": round(f, 3), **{k: {"ms": round(statistics.median(times[(k, m)]), 3),
                                                  "ratio": round(statistics.median(times[(k, m)]) / f, 4)}
                                              for k in variants}}
    return out


def clocks():
    """Floor and step runs with and without pauses while nvidia-smi logs clocks every 20 ms."""
    out = os.environ.get("OUT", ".")
    log_path = os.path.join(out, "triton-step-smi.csv")
    with open(log_path, "w") as log:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,"
                                "clocks_event_reasons.active", "--format=csv,noheader", "-lms", "20"],
                               stdout=log, stderr=subprocess.STDOUT)
        shape = SHAPES["qwen"]
        h, w = make(shape, 2.0, 3)
        floor = floor_fn(shape, h, w, labels(shape, 5))
        step(h, w, labels(shape, 6), shape[0])
        phases = {}
        for name, fn, n, pause in (("floor_pause", floor, 10, 0.1), ("step_pause", None, 10, 0.1),
                                   ("floor_b2b", floor, 30, 0), ("step_b2b", None, 30, 0)):
            time.sleep(0.5)
            t0, ts = time.time(), []
            for i in range(n):
                f = fn or (lambda i=i: step(h, w, labels(shape, 100 + i), shape[0]))
                ts.append(timed(f, "idle"))
                time.sleep(pause)
            phases[name] = {"start": t0, "end": time.time(), "median_ms": statistics.median(ts)}
        time.sleep(0.3)
        smi.terminate()
    return {"phases": phases, "log": log_path}


def main(argv):
    what = argv[0] if argv else "modes"
    names = argv[1].split(",") if len(argv) > 1 else list(SHAPES)
    if what == "timeline":
        res = {n: timeline(n) for n in names}
    elif what == "modes":
        res = {n: modes(n, {"triton": step}, 11 if n != "long" else 7) for n in names}
    elif what == "widths":
        res = {}
        for n in names:
            pairs, seq, _, _ = SHAPES[n]
            m = 2 * pairs * (seq - seq // 4)
            res[n] = modes(n, {f"{c} columns": (lambda h, w, lab, p, o={"memory_budget": m * c * 2}: step(h, w, lab, p, o))
                               for c in WIDTHS[n]}, 11 if n != "long" else 7)
    elif what == "paths":
        res = {n: {"modes": modes(n, PATHS, 11 if n != "long" else 7),
                   "timelines": {p: timeline(n, fn) for p, fn in PATHS.items()}} for n in names}
    elif what == "clocks":
        res = clocks()
    else:
        raise SystemExit(f"unknown {what!r}: expected timeline, modes, widths, clocks or paths")
    res = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "commit": os.environ.get("ALIGN_LOSSES_COMMIT", "unknown"),
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__}, **res}
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), f"triton-step-{what}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
