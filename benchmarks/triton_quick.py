"""Quick H200 measurements of the "triton" head backend (see benchmarks/NOTES-triton.md).

    python benchmarks/triton_quick.py sweep            # kernel configs vs cuBLAS, Qwen3-1.7B shape
    python benchmarks/triton_quick.py bench [shapes]   # op vs 3-GEMM floor, memory, grad errors

Shapes: qwen (8192, 2048, 151936), llama (8192, 4096, 128256), long (32768, 2048, 151936).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from align_losses.backends.base import HeadProblem, LogitTransform  # noqa: E402
from align_losses.ops import triton_head as th  # noqa: E402
from align_losses.ops import triton_kernels as tk  # noqa: E402
from align_losses.ops.tiled_head import tiled_head  # noqa: E402

SHAPES = {"qwen": (8192, 2048, 151936), "llama": (8192, 4096, 128256), "long": (32768, 2048, 151936)}
GiB = 2**30


def inputs(n, d, v, std, seed, grad=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(v, d, device="cuda", generator=g) * (std / math.sqrt(d))).to(torch.bfloat16)
    lbl = torch.randint(0, v, (n,), device="cuda", generator=g)
    up = torch.randn(n, device="cuda", generator=g) * 0.5 + torch.rand(n, device="cuda", generator=g)
    return h.requires_grad_(grad), w.requires_grad_(grad), lbl, up


def problem(h, w, lbl, outputs=()):
    return HeadProblem(hidden=h, weight=w, bias=None, labels=lbl, transform=LogitTransform(),
                       outputs=frozenset(("logprobs", *outputs)))


def run_phases(h, w, lbl, up):
    """(forward ms, backward ms) of the triton op."""
    p = problem(h, w, lbl)
    s, m, e = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    t0 = time.perf_counter()
    s.record()
    out = th.triton_head(p)
    m.record()
    t1 = time.perf_counter()
    torch.autograd.grad((out["logprobs"] * up).sum(), (h, w))
    e.record()
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    HOST.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
    return s.elapsed_time(m), m.elapsed_time(e)


HOST = []


def run_op(kind, h, w, lbl, up):
    p = problem(h, w, lbl)
    if kind == "triton":
        out = th.triton_head(p)
    else:
        out = tiled_head(p, memory_budget=512 * 2**20)
    return torch.autograd.grad((out["logprobs"] * up).sum(), (h, w))


def floor_once(h, w, g):
    torch.mm(h, w.t())
    torch.mm(g, w)
    torch.mm(g.t(), h)


def timed(fn):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    r = fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e), r


def fp32_reference(h, w, lbl, up, chunk=2048):
    """grad_hidden and grad_weight in fp32 (no TF32) from the same bf16 inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, wf = h.detach().float(), w.detach().float()
    gh = torch.empty_like(hf)
    gw = torch.zeros_like(wf)
    for t0 in range(0, hf.shape[0], chunk):
        x = hf[t0 : t0 + chunk]
        z = x @ wf.t()
        gz = torch.softmax(z, 1).mul_(-up[t0 : t0 + chunk, None])
        del z
        gz[torch.arange(x.shape[0], device="cuda"), lbl[t0 : t0 + chunk]] += up[t0 : t0 + chunk]
        gh[t0 : t0 + chunk] = gz @ wf
        gw.addmm_(gz.t(), x)
        del gz
    return gh, gw


def rel(a, b):
    return float((a.float() - b).norm() / b.norm())


def bench(names, reps=8, with_torch=True):
    rows = []
    for name in names:
        n, d, v = SHAPES[name]
        for regime, std in (("flat", 2.0), ("peaky", 8.0)):
            times = {"floor": [], "triton": [], "torch": [], "fwd": [], "bwd": []}
            HOST.clear()
            g = torch.randn(n, v, device="cuda").to(torch.bfloat16)
            # warm-up (compiles)
            h, w, lbl, up = inputs(n, d, v, std, 0)
            run_op("triton", h, w, lbl, up)
            floor_once(h.detach(), w.detach(), g)
            for r in range(reps):
                h, w, lbl, up = inputs(n, d, v, std, r + 1)
                torch.cuda.synchronize()
                times["floor"].append(timed(lambda: floor_once(h.detach(), w.detach(), g))[0])
                times["triton"].append(timed(lambda: run_op("triton", h, w, lbl, up))[0])
                f, b = run_phases(h, w, lbl, up)
                times["fwd"].append(f)
                times["bwd"].append(b)
                if with_torch and r < 3:
                    times["torch"].append(timed(lambda: run_op("torch", h, w, lbl, up))[0])
            del g
            # memory above inputs, and errors
            h, w, lbl, up = inputs(n, d, v, std, 99)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            gh, gw = run_op("triton", h, w, lbl, up)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / GiB
            grads = (gh.numel() + gw.numel()) * 2 / GiB
            target = grads + 0.15 + 4 * n * d / GiB
            rgh, rgw = fp32_reference(h, w, lbl, up)
            eh, ew = rel(gh, rgh), rel(gw, rgw)
            del gh, gw, rgh, rgw
            torch.cuda.empty_cache()
            fl = statistics.median(times["floor"])
            tt = statistics.median(times["triton"])
            to = statistics.median(times["torch"]) if times["torch"] else float("nan")
            row = dict(shape=name, regime=regime, floor_ms=fl, triton_ms=tt, torch_ms=to,
                       triton_ratio=tt / fl, torch_ratio=to / fl,
                       fwd_ms=statistics.median(times["fwd"]), bwd_ms=statistics.median(times["bwd"]),
                       host_fwd_ms=statistics.median(x[0] for x in HOST), host_bwd_ms=statistics.median(x[1] for x in HOST), peak_gib=peak, target_gib=target,
                       grads_gib=grads, err_h=eh, err_w=ew, floor_all=times["floor"], triton_all=times["triton"])
            rows.append(row)
            print(json.dumps({k: (round(x, 5) if isinstance(x, float) else x) for k, x in row.items()
                              if not k.endswith("_all")}), flush=True)
    return rows


def sweep(n=8192, d=2048, v=151936):
    """Forward and backward kernels alone, per config, against cuBLAS GEMMs of the same shapes."""
    import triton

    h, w, lbl, up = inputs(n, d, v, 2.0, 0, grad=False)
    res = {}
    ms = lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")
    res["cublas_fwd_gemm"] = ms(lambda: torch.mm(h, w.t()))
    vc = th.vocab_chunk(n, d, v, 2, 256, None)
    wc = w[:vc]
    res["vc"] = vc
    res["cublas_chunk_gemm"] = ms(lambda: torch.mm(h, wc.t()))
    da = torch.empty(n, vc, dtype=torch.bfloat16, device="cuda")
    acc = torch.empty(n, d, device="cuda")
    res["cublas_gradh_chunk_addmm"] = ms(lambda: torch.addmm(acc, da, wc, out_dtype=torch.float32, out=acc))
    res["cublas_gradw_chunk"] = ms(lambda: torch.mm(da.t(), h))
    K = th.KernelConfig
    cfgs = [(True, K(128, 256, 64, 16, 8, 3)), (True, K(128, 256, 64, 16, 8, 3, persistent=True)),
            (True, K(128, 128, 64, 16, 8, 4, persistent=True)), (False, K(128, 256, 64, 16, 8, 3, persistent=True))]
    lse = torch.zeros(n, device="cuda")
    coef = -up
    for tma, c in cfgs:
        th.USE_TMA = tma
        key = (f"{'tma_' if tma else ''}{c.BM}x{c.BN}x{c.BK}_g{c.GROUP_M}_w{c.num_warps}_s{c.num_stages}"
               f"{'_persistent' if c.persistent else ''}")
        try:
            t0 = time.time()
            p = problem(h, w, lbl)
            f = lambda: th._forward_stats(h, w, None, lbl, LogitTransform(), p.outputs, None, c)
            f()
            res["fwd_" + key] = ms(f)
            zero = torch.zeros(n, device="cuda")
            entry = torch.zeros(n, device="cuda")

            hd, wd = th._descs(h, wc, c) if tma else (None, None)
            dad = th._desc(da, [c.BM, c.BN // 2]) if tma else None
            programs = c.programs(triton.cdiv(n, c.BM) * triton.cdiv(vc, c.BN), h.device)

            def b():
                tk.bwd_kernel[(programs,)](
                    h, wc, hd, wd, dad, h, lse, zero, coef, zero, zero, da, lse,
                    n, vc, d, h.stride(0), wc.stride(0), da.stride(0), programs,
                    1.0, 1.0, 1.0, 1.0, 1.0,
                    HAS_BIAS=False, SOFTCAP=False, SCALED=False, HAS_ENT=False, HAS_MEAN=False, NEED_GB=False,
                    EVEN_K=True, DOT_PREC="ieee", USE_TMA=tma, **c.launch())
                tk.label_entry_kernel[(triton.cdiv(n, th._LABEL_ROWS),)](
                    lbl, lse, lse, zero, coef, zero, zero, up, da, lse, entry, n, vc, da.stride(0), 0, 1.0, 1.0,
                    SOFTCAP=False, HAS_ENT=False, HAS_MEAN=False, NEED_GB=False,
                    BR=th._LABEL_ROWS, num_warps=4)
            b()
            res["bwd_chunk_" + key] = ms(b)
            res["compile_s_" + key] = time.time() - t0
        except Exception as e:  # noqa: BLE001
            res["err_" + key] = repr(e)[:300]
        print(key, {k: v for k, v in res.items() if key in k}, flush=True)
    flops_f = 2 * n * d * v
    flops_c = 2 * n * d * vc
    res["tflops_cublas_fwd"] = flops_f / res["cublas_fwd_gemm"] / 1e9
    for k in list(res):
        if k.startswith("fwd_"):
            res["tflops_" + k] = flops_f / res[k] / 1e9
        if k.startswith("bwd_chunk_"):
            res["tflops_" + k] = flops_c / res[k] / 1e9
    print(json.dumps(res, indent=1), flush=True)
    return res


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "bench"
    if os.environ.get("CFG"):  # e.g. CFG=tma,128,256,64,16,8,3,persistent
        parts = os.environ["CFG"].split(",")
        th.USE_TMA = parts[0] == "tma"
        cfg = th.KernelConfig(*map(int, parts[1:7]), persistent=parts[7:8] == ["persistent"])
        th.FWD_CONFIGS[torch.bfloat16] = th.BWD_CONFIGS[torch.bfloat16] = cfg
    out = os.environ.get("OUT", ".")
    if what == "profile":
        from torch.profiler import ProfilerActivity, profile

        n, d, v = SHAPES[sys.argv[2] if len(sys.argv) > 2 else "qwen"]
        h, w, lbl, up = inputs(n, d, v, 2.0, 0)
        run_op("triton", h, w, lbl, up)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                run_op("triton", h, w, lbl, up)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        sys.exit(0)
    if what == "sweep":
        r = sweep()
        json.dump(r, open(os.path.join(out, "sweep.json"), "w"), indent=1)
    else:
        names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES)
        r = bench(names, with_torch=os.environ.get("WITH_TORCH", "1") == "1")
        json.dump(r, open(os.path.join(out, f"bench_{'_'.join(names)}.json"), "w"), indent=1)
        print("\nshape regime  floor_ms triton_ms (fwd+bwd) ratio torch_ratio peak/target err_h err_w")
        for x in r:
            print(f"{x['shape']:6s} {x['regime']:6s} {x['floor_ms']:8.2f} {x['triton_ms']:8.2f} ({x['fwd_ms']:.2f}+{x['bwd_ms']:.2f}) "
                  f"{x['triton_ratio']:.3f} "
                  f"{x['torch_ratio']:.2f} {x['peak_gib']:.3f}/{x['target_gib']:.3f} {x['err_h']:.2e} {x['err_w']:.2e}")
