"""The loss head of one DPO step, our backends beside the anchors of docs/targets.md, in one process.

Hidden states ``[2 x pairs, seq, D]`` (bf16) -> per-token log-probs of ``W [V, D]`` (bf16) -> DPO sigmoid
loss (beta 0.1, no reference model) -> ``torch.autograd.grad`` of ``hidden`` and ``W``. The first
quarter of every sequence is prompt (label -100); chosen rows come first, then rejected. Every impl
starts from the same full ``[N, D]`` hidden states and ``[N]`` labels and does its own masking, as its
library is used: "tokens" in the results are the labelled tokens (3/4 of N), over which the floor is
measured.

Per shape and logit regime ("flat": logits of std 2, "peaky": std 8) it measures:

* the floor: the three bf16 GEMMs any exact head does over the labelled tokens (logits, grad_hidden,
  grad_weight), timed once per round, interleaved with the impls (it drifts), median;
* each impl's median forward + backward time after warm-up, new random labels at every repetition
  (so new upstream gradients), impls rotated from round to round;
* the four-GEMM bound, in the same rotation: the floor's GEMMs and the logits GEMM again, all cuBLAS,
  which is what an exact head that keeps no ``[N, V]`` tensor must at least do (the logits twice);
* peak memory above the inputs (``max_memory_allocated`` minus the allocation with the inputs in place)
  and the bytes of the returned gradients;
* relative errors of grad_hidden and grad_weight against the same computation in fp32 (no TF32) from
  the same bf16 inputs, computed once per shape and regime in token chunks.

Each impl runs under try/except: a failure (OOM, missing package, unsupported GPU) records a row with
``error`` and the run goes on. Writes ``head-latest.json`` (a list of rows), ``head-latest.md`` and,
when matplotlib is there, ``head-latest.png`` (see ``plot_head.py``) under ``--out``.

    python benchmarks/head.py --commit $(git rev-parse --short HEAD)       # everything, H200: ~5 min
    python benchmarks/head.py --quick                                      # smoke test, small shapes
    python benchmarks/head.py --shapes qwen3-1.7b --impls ours-torch,trl --reps 5
    python benchmarks/head.py --dry-run                                    # validate arguments, print the plan
    python benchmarks/head.py --captured runs/convergence/captured.pt      # a trained model's head (convergence.py)
    python benchmarks/head.py --device cpu --shapes cpu-small --name head-cpu-latest   # CPU, torch's own chunked head

See benchmarks/README.md for what to install on a GPU machine (pip install ".[gpu]": Liger and CCE).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, however this is run
import _common  # noqa: E402 - puts the checkout on sys.path too
from _common import GiB, git_commit, md_escape as _md_escape, meta_lines  # noqa: E402

BETA = 0.1
PROMPT_FRACTION = 0.25
IGNORE = -100

# Targets of docs/targets.md for our GPU path.
TARGET_RATIO = 1.40
TARGET_RATIO_STRETCH = 1.35
TARGET_RATIO_FILTER_PEAKY = 1.15
TARGET_PEAK_SLACK_GIB = 0.15
TARGET_ERR = {"flat": 2.5e-3, "peaky": 3e-3}


@dataclass(frozen=True)
class Shape:
    pairs: int  # preference pairs: 2 * pairs rows (chosen rows first)
    seq: int  # tokens per row, the first PROMPT_FRACTION of them prompt
    hidden: int
    vocab: int
    reps: int  # default timed repetitions (--reps overrides; the long shape takes half)

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def tokens_total(self) -> int:
        return self.rows * self.seq

    @property
    def prompt(self) -> int:
        return int(self.seq * PROMPT_FRACTION)

    @property
    def tokens(self) -> int:
        """Labelled tokens (the floor and the 4 B x tokens x D allowance are over these)."""
        return self.rows * (self.seq - self.prompt)


#: docs/targets.md: "N = 2 pairs x 2 x 2048 = 8192 tokens".
SHAPES = {
    "qwen3-1.7b": Shape(pairs=2, seq=2048, hidden=2048, vocab=151936, reps=10),
    "llama3-8b": Shape(pairs=2, seq=2048, hidden=4096, vocab=128256, reps=10),
    "long": Shape(pairs=2, seq=8192, hidden=2048, vocab=151936, reps=5),
}
QUICK_SHAPES = {
    "quick": Shape(pairs=1, seq=512, hidden=1024, vocab=16384, reps=3),
}
#: Shapes for --device cpu: a tiny one, the default (tests the harness itself, no GPU), and a small one for the
#: impls that run only on this machine's torch (``torch-lce``: the GPU machine's torch has no chunked
#: ``F.linear_cross_entropy``), with the peak read from the process's resident memory.
CPU_SHAPES = {
    "cpu-tiny": Shape(pairs=1, seq=64, hidden=64, vocab=1000, reps=3),
    "cpu-small": Shape(pairs=1, seq=1024, hidden=1024, vocab=32768, reps=5),
}
CPU_DEFAULT_SHAPES = ("cpu-tiny",)
LOGITS = {"flat": 2.0, "peaky": 8.0}
#: --captured PATH: a trained model's hidden states, labels and head as one more regime (benchmarks/captured_head.py)
CAPTURED = "captured"

#: Impl name -> one-line description (the markdown table's first column).
IMPLS = {
    "full-logits": "full logits, fp32 log_softmax",
    "trl-chunked": "TRL 1.16 chunked head (ChunkedLogProbFunction, labelled tokens only)",
    "torch-lce": "torch's chunked F.linear_cross_entropy (LinearCrossEntropyOptions() defaults), reduction none",
    "cce": "cut-cross-entropy `cce` (default filter_eps='high')",
    "cce-exact": "cut-cross-entropy `cce`, filter_eps=None (exact)",
    "cce-torch-compile": "cut-cross-entropy `torch_compile`",
    "liger-flce": "liger fused linear CE, reduction none",
    "liger-cute": "liger fused scaled CE, CuTe DSL sm90 kernel",
    "ours-torch": "ours impl='torch'",
    "ours-triton": "ours impl='triton'",
    "ours-triton-filter": "ours impl='triton', filtering mode",
    "ours-torch-compiled": "ours impl='torch' under torch.compile(fullgraph=True)",
    "ours-triton-compiled": "ours impl='triton' under torch.compile(fullgraph=True)",
    "ours-triton-cudagraph": "ours impl='triton', forward + DPO + backward replayed from a CUDA graph",
}
OURS = ("ours-torch", "ours-triton", "ours-triton-filter", "ours-torch-compiled", "ours-triton-compiled",
        "ours-triton-cudagraph")
#: Timed in the rotation like an impl: the floor's three cuBLAS GEMMs plus the logits GEMM again, the
#: four GEMMs of an exact head that keeps no [N, V] tensor (its time / floor is where such a head can get).
BOUND = "four-gemm-bound"


# --------------------------------------------------------------------------------------------------
# Pure-python parts (importable and testable without a GPU)


def parse_list(text: Optional[str], known, what: str) -> Optional[list]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``known``; None stays None (= all)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}: expected a subset of {list(known)}")
    if not items:
        raise ValueError(f"--{what} is empty")
    return items


def parse_option(text: Optional[str]) -> Optional[dict]:
    """``"KEY=VALUE"`` (VALUE as JSON, else a string) -> ``{KEY: VALUE}``."""
    if text is None:
        return None
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return {key.strip(): parsed}


def filter_options_for(option_names, override: Optional[dict] = None) -> Optional[dict]:
    """``backend_options`` that switch a backend to its filtering mode, from the option names it declares.

    ``override`` (``--triton-filter KEY=VALUE``) wins. Otherwise the first declared option whose name
    contains "filter": ``"auto"`` for a name ending in "eps" (CCE's convention), else True. None when
    the backend declares no such option.
    """
    if override:
        return dict(override)
    for key in sorted(option_names):
        if "filter" in key.lower():
            return {key: "auto" if key.lower().endswith("eps") else True}
    return None


def target_peak_gib(shape: Shape, grads_gib: float) -> float:
    """docs/targets.md: peak <= grads + 0.15 GiB + 4 bytes x labelled tokens x D."""
    return grads_gib + TARGET_PEAK_SLACK_GIB + 4.0 * shape.tokens * shape.hidden / GiB


def expected_grads_gib(shape: Shape, itemsize: int = 2) -> float:
    return itemsize * (shape.tokens_total * shape.hidden + shape.vocab * shape.hidden) / GiB


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def select_shapes(args) -> dict:
    if getattr(args, "captured", None):
        import captured_head

        shape = captured_head.shape_of(captured_head.load(args.captured))
        return {CAPTURED: Shape(reps=10, **shape)}
    table = CPU_SHAPES if args.device == "cpu" else (QUICK_SHAPES if args.quick else SHAPES)
    default = list(CPU_DEFAULT_SHAPES) if args.device == "cpu" else list(table)
    names = parse_list(args.shapes, table, "shapes") if args.shapes else default
    return {n: table[n] for n in names}


def reps_for(shape: Shape, args) -> int:
    if args.reps is None:
        return shape.reps
    reps = args.reps if shape.tokens_total <= 8192 else max(3, args.reps // 2)
    return max(3, reps)


def estimate_input_gib(shape: Shape) -> float:
    """Inputs, fp32 reference grads, floor buffers: what stays allocated while the impls run."""
    n, m, d, v = shape.tokens_total, shape.tokens, shape.hidden, shape.vocab
    inputs = 2 * (n * d + v * d)
    ref = 4 * (n * d + v * d)
    floor = 2 * (2 * m * v + m * d + v * d + m * d)
    return (inputs + ref + floor) / GiB


def fmt_gib(x):
    return "-" if x is None else (f"{x:.3f} GiB" if x < 10 else f"{x:.1f} GiB")


def fmt_ms(x):
    return "-" if x is None else (f"{x:.1f} ms" if x >= 10 else f"{x:.2f} ms")


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def fmt_err(x):
    return "-" if x is None else f"{x:.1e}"


def _mark(ok):
    return "" if ok is None else ("✓" if ok else "✗")


def row_checks(row: dict) -> dict:
    """Which docs/targets.md criteria one result row meets (None where it has no number)."""
    ratio = row.get("ratio")
    peak, target = row.get("peak_gib"), row.get("target_peak_gib")
    errs = [row.get(k) for k in ("grad_h_rel", "head_grad_h_rel", "grad_w_rel", "head_grad_w_rel")
            if row.get(k) is not None]
    err = max(errs) if errs else None
    limit = TARGET_RATIO_FILTER_PEAKY if (row.get("filtering") and row.get("logits") == "peaky") else TARGET_RATIO
    return {
        "time": None if ratio is None else ratio <= limit,
        "peak": None if peak is None or target is None else peak <= target,
        "err": None if err is None else err <= TARGET_ERR.get(row.get("logits"), 3e-3),
    }


def render_markdown(rows: list, meta: dict) -> str:
    """The results as markdown: one table per shape, flat and peaky side by side, like docs/targets.md."""
    out = [
        "# Loss head of one DPO step: our backends and the anchors",
        "",
        *meta_lines(meta),
        "",
        "bf16 inputs; hidden -> per-token log-probs -> DPO sigmoid loss (beta 0.1, no reference), forward + backward;",
        "the first quarter of every sequence is prompt (label -100); every impl starts from all N hidden states.",
        "time = median after warm-up (new labels every repetition); floor = the three bf16 GEMMs over the labelled",
        "tokens, measured in the same run, interleaved, median. Peak = max_memory_allocated above the inputs",
        "(on CPU: the process's resident memory at its peak above what was resident before the call)",
        "(includes the returned gradients). Errors: relative norm against fp32 (no TF32) from the same bf16 inputs:",
        "through the DPO loss (each impl's own log-probs make its upstream gradient, so forward log-prob errors count,",
        "amplified by the sums over the sequence), and for the head alone (fixed upstream: the fp32 reference's).",
        f"Targets (docs/targets.md): time/floor <= {TARGET_RATIO} ({TARGET_RATIO_FILTER_PEAKY} peaky for a filtering mode); "
        "peak <= grads + 0.15 GiB + 4 B x tokens x D; grad errors <= 2.5e-3 flat, 3e-3 peaky. "
        "Marks: t = time, m = memory, e = all four grad errors (hidden and weight, both upstreams; flat/peaky).",
        "",
    ]
    configs = []
    for r in rows:
        if r["config"] not in configs:
            configs.append(r["config"])
    for config in configs:
        crow = [r for r in rows if r["config"] == config]
        any_row = crow[0]
        floors = {lg: next((r.get("floor_ms") for r in crow if r["logits"] == lg and r.get("floor_ms")), None) for lg in LOGITS}
        bounds = {lg: next((r.get("bound_ratio") for r in crow if r["logits"] == lg and r.get("bound_ratio")), None)
                  for lg in LOGITS}
        grads = next((r["grads_gib"] for r in crow if r.get("grads_gib")), any_row.get("expected_grads_gib"))
        target = any_row.get("target_peak_gib")
        out += [
            f"## {config}: N = {any_row.get('tokens_total')} tokens ({any_row['tokens']} labelled), "
            f"D = {any_row['hidden']}, V = {any_row['vocab']}",
            "",
            f"floor {fmt_ms(floors.get('flat'))} flat / {fmt_ms(floors.get('peaky'))} peaky; grads {fmt_gib(grads)}; "
            f"peak target {fmt_gib(target)}; four-GEMM bound (the floor and the logits GEMM again) "
            f"{fmt_ratio(bounds.get('flat'))}x flat / {fmt_ratio(bounds.get('peaky'))}x peaky of the floor",
            "",
            "| impl | peak above inputs | time flat | time / floor flat | time peaky | time / floor peaky "
            "| grad_h err flat | grad_h err peaky | grad_h err flat, fixed upstream | grad_h err peaky, fixed upstream "
            "| grad_w err flat | grad_w err peaky | targets |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        impls = []
        for r in crow:
            if r["impl"] not in impls:
                impls.append(r["impl"])
        for impl in impls:
            by = {r["logits"]: r for r in crow if r["impl"] == impl}
            f, p = by.get("flat", {}), by.get("peaky", {})
            errors = [by[lg]["error"] for lg in by if by[lg].get("error")]
            errors = [e if errors.count(e) == len(by) else f"{lg}: {e}"
                      for lg, e in ((lg, by[lg]["error"]) for lg in by if by[lg].get("error"))]
            errors = list(dict.fromkeys(errors))
            peaks = [r.get("peak_gib") for r in (f, p) if r.get("peak_gib") is not None]
            peak = max(peaks) if peaks else None
            marks = []
            for key, label in (("time", "t"), ("peak", "m"), ("err", "e")):
                vals = [row_checks(r)[key] for r in (f, p) if r and not r.get("error")]
                vals = [v for v in vals if v is not None]
                if vals:
                    marks.append(label + "".join(_mark(v) for v in vals))
            label = IMPLS.get(impl, impl)
            cells = [
                label, fmt_gib(peak),
                fmt_ms(f.get("ms")), fmt_ratio(f.get("ratio")), fmt_ms(p.get("ms")), fmt_ratio(p.get("ratio")),
                fmt_err(f.get("grad_h_rel")), fmt_err(p.get("grad_h_rel")),
                fmt_err(f.get("head_grad_h_rel")), fmt_err(p.get("head_grad_h_rel")),
                fmt_err(f.get("grad_w_rel")), fmt_err(p.get("grad_w_rel")),
                " ".join(marks),
            ]
            out.append("| " + " | ".join(cells) + " |")
            for e in errors:
                out.append(f"| &nbsp;&nbsp;error | {_md_escape(e)[:300]} | | | | | | | | | | | |")
        out.append("")
    if any(r.get("logits") == CAPTURED for r in rows):
        import captured_head

        out += captured_head.render(rows)
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = _common.doc_parser(__doc__, epilog=False)
    p.add_argument("--shapes", help=f"comma-separated subset of {list(SHAPES)} (with --quick: {list(QUICK_SHAPES)})")
    p.add_argument("--impls", help=f"comma-separated subset of {list(IMPLS)}")
    p.add_argument("--logits", help=f"comma-separated subset of {list(LOGITS)}")
    p.add_argument("--reps", type=int, help="timed repetitions per impl (default 10; the long shape takes half; at least 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per impl before measuring (default 2)")
    _common.add_output_args(p, "output file stem (default head-latest)", "head-latest")
    p.add_argument("--quick", action="store_true", help="small shapes, 3 repetitions: a smoke test")
    _common.add_commit_arg(p)
    p.add_argument("--triton-filter", metavar="KEY=VALUE",
                   help="backend_options that put the triton backend in its filtering mode (default: detected "
                        "from its declared options: the first with 'filter' in its name)")
    p.add_argument("--register-triton", action="store_true",
                   help="register align_losses.backends.triton as 'triton' for this run if the registry lacks it "
                        "(to try the backend before it is registered)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: the impls that run on CPU, peaks from resident memory; a tiny shape by default (tests the "
                        "harness), --shapes cpu-small for a measurement")
    p.add_argument("--captured", metavar="PATH",
                   help="a trained model's hidden states, labels and head (benchmarks/convergence.py --capture): "
                        "its shape only, regimes flat, peaky and captured, with their distribution statistics")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--dry-run", action="store_true", help="validate the arguments, print the plan, run nothing")
    return p


def validate(args) -> dict:
    """Checked arguments -> the plan (raises ValueError on a bad argument)."""
    shapes = select_shapes(args)
    impls = parse_list(args.impls, IMPLS, "impls") or list(IMPLS)
    regimes = [*LOGITS, CAPTURED] if args.captured else list(LOGITS)
    logits = parse_list(args.logits, regimes, "logits") or regimes
    if args.reps is not None and args.reps < 1:
        raise ValueError("--reps must be >= 1 (at least 3 are run)")
    if args.warmup < 1:
        raise ValueError("--warmup must be >= 1")
    override = parse_option(args.triton_filter)
    return {
        "shapes": shapes,
        "impls": impls,
        "logits": logits,
        "reps": {name: reps_for(s, args) for name, s in shapes.items()},
        "triton_filter_override": override,
    }


def print_plan(plan: dict, args) -> None:
    print(f"device {args.device}; out {args.out}/{args.name}.{{json,md,png}}; commit {args.commit or git_commit()}")
    for name, s in plan["shapes"].items():
        print(f"  {name}: {s.rows} rows x {s.seq} = {s.tokens_total} tokens ({s.tokens} labelled), D {s.hidden}, "
              f"V {s.vocab}; reps {plan['reps'][name]}; resident ~{estimate_input_gib(s):.1f} GiB; "
              f"grads {expected_grads_gib(s):.3f} GiB; peak target {target_peak_gib(s, expected_grads_gib(s)):.3f} GiB")
    print(f"  logits: {plan['logits']}")
    print(f"  impls: {plan['impls']}")
    if plan["triton_filter_override"]:
        print(f"  triton filter options: {plan['triton_filter_override']}")


# --------------------------------------------------------------------------------------------------
# Torch parts


def _torch():
    import torch

    return torch


class Impls:
    """Builds each impl's ``fn(hidden [B, T, D], weight, labels [B, T]) -> per-token log-probs [B, T] fp32``.

    ``build(name)`` returns (fn, info) or raises with the reason the impl cannot run here.
    """

    def __init__(self, device: str, triton_filter_override: Optional[dict]):
        self.device = device
        self.triton_filter_override = triton_filter_override

    def build(self, name: str):
        return getattr(self, "_" + name.replace("-", "_"))()

    # -- anchors
    def _full_logits(self):
        torch = _torch()

        def fn(h, w, labels):
            logits = torch.matmul(h, w.t())  # bf16 [B, T, V], as a model's lm_head
            logp = torch.log_softmax(logits.float(), dim=-1)
            mask = labels != IGNORE
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return torch.where(mask, picked, 0.0)

        return fn, {}

    def _trl_chunked(self):
        import trl
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        try:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except Exception as exc:  # noqa: BLE001 - the backward needs trl.trainer.utils; say so in the row
            raise RuntimeError(
                f"trl.trainer.utils does not import ({type(exc).__name__}: {exc}); ChunkedLogProbFunction's "
                "backward imports it: install the package's dependencies (benchmarks/README.md)"
            ) from exc

        def fn(h, w, labels):
            mask = labels != IGNORE
            hs = h.reshape(-1, h.shape[-1])
            flat_mask = mask.reshape(-1)
            # As trl.trainer.utils' fused LM head on CUDA: only the labelled positions are projected.
            logp = ChunkedLogProbFunction.apply(hs[flat_mask], w, None, labels.reshape(-1)[flat_mask], 1.0, chunk,
                                                None, 1.0, ())[0]
            return logp.new_zeros(mask.shape).masked_scatter(mask, logp)

        return fn, {"chunk_size": chunk, "trl": trl.__version__}

    def _torch_lce(self):
        torch = _torch()
        fn_lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if fn_lce is None or options_cls is None:
            raise RuntimeError(f"torch {torch.__version__} has no chunked F.linear_cross_entropy (torch 2.13 has)")
        options = options_cls()  # its defaults: chunking and accumulation chosen per device and dtype

        def fn(h, w, labels):
            # reduction "none": the chunked path recomputes the logits in its backward, for any upstream gradient
            nll = fn_lce(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), reduction="none", ignore_index=IGNORE,
                         options=options)
            return torch.where(labels != IGNORE, -nll.float().view(labels.shape), 0.0)

        return fn, {"options": repr(options), "torch": torch.__version__}

    def _cce_common(self, **kwargs):
        torch = _torch()
        from cut_cross_entropy import linear_cross_entropy

        def fn(h, w, labels):
            nll = linear_cross_entropy(h, w, labels, ignore_index=IGNORE, reduction="none", **kwargs)
            return torch.where(labels != IGNORE, -nll.float(), 0.0)

        return fn, {"kwargs": {k: str(v) for k, v in kwargs.items()}}

    def _cce(self):
        return self._cce_common()  # CCE's own defaults: impl "cce", filter_eps "high"

    def _cce_exact(self):
        return self._cce_common(filter_eps=None)

    def _cce_torch_compile(self):
        return self._cce_common(impl="torch_compile")

    def _liger_flce(self):
        torch = _torch()
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F

        def fn(h, w, labels):
            # Liger's defaults otherwise (bias None, ce_weight None, ignore_index -100, no z-loss, ...).
            loss = F.apply(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), None, None, IGNORE, 0.0, 0.0, "none")[0]
            return torch.where(labels != IGNORE, -loss.float().view(labels.shape), 0.0)

        return fn, {}

    def _liger_cute(self):
        torch = _torch()
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as mod

        if self.device != "cuda" or torch.cuda.get_device_capability() != (9, 0):
            raise RuntimeError("liger's CuTe DSL scaled-CE kernel runs on sm_90 only")
        impl = mod._resolve_implementation(torch.device("cuda"))  # ImportError without nvidia-cutlass-dsl
        if impl is mod._FusedLinearPPOFallbackFunction:
            raise RuntimeError("liger resolved its PyTorch fallback, not the CuTe sm90 kernel")
        F = mod.LigerFusedLinearScaledCrossEntropyFunction

        def fn(h, w, labels):
            nll = F.apply(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), 1.0, IGNORE)
            return torch.where(labels != IGNORE, -nll.float().view(labels.shape), 0.0)

        import cutlass

        return fn, {"kernel": impl.__name__, "cutlass": getattr(cutlass, "__version__", "?")}

    # -- ours
    def _ours(self, impl: str, options: Optional[dict] = None):
        import align_losses

        def fn(h, w, labels):
            return align_losses.linear_logprobs(h, w, labels, impl=impl, backend_options=options)

        return fn, {"backend_options": options} if options else {}

    def _ours_torch(self):
        return self._ours("torch")

    def _ours_triton(self):
        from align_losses import backends

        if "triton" not in backends.names():
            raise RuntimeError("backend 'triton' is not registered (align_losses.backends.names())")
        return self._ours("triton")

    def _ours_triton_filter(self):
        from align_losses import backends

        if "triton" not in backends.names():
            raise RuntimeError("backend 'triton' is not registered (align_losses.backends.names())")
        options = filter_options_for(backends.get("triton").capabilities.options, self.triton_filter_override)
        if options is None:
            raise RuntimeError("backend 'triton' declares no filtering option (none with 'filter' in its name); "
                               "pass --triton-filter KEY=VALUE")
        fn, info = self._ours("triton", options)
        return fn, {**info, "filtering": True}

    # -- ours under torch.compile and CUDA graphs (the registered ops, align_losses/ops/library.py); the
    # anchor of the compiled column is CCE's own `torch_compile` impl ("cce-torch-compile").
    def _ours_compiled(self, impl: str):
        torch = _torch()
        fn, _ = self._ours(impl)
        return torch.compile(fn, fullgraph=True), {"torch.compile": "fullgraph=True, the head call only"}

    def _ours_torch_compiled(self):
        return self._ours_compiled("torch")

    def _ours_triton_compiled(self):
        self._ours_triton()  # the same availability check
        return self._ours_compiled("triton")

    def _ours_triton_cudagraph(self):
        if self.device != "cuda":
            raise RuntimeError("a CUDA graph needs --device cuda")
        self._ours_triton()
        return GraphedStep("triton"), {"cuda_graph": "captured per shape after 2 sync-free warm-ups, max_labelled = "
                                                     "the labelled count; each step copies hidden and labels into "
                                                     "the static inputs, then replays"}


class GraphedStep:
    """One training step of the head (log-probs, `dpo_loss`, gradients of hidden and W) captured in a CUDA graph.

    ``whole_step(h, w, labels, pairs)`` copies ``h`` and ``labels`` into the graph's static inputs and replays
    it (capturing first for a new shape or weight), returning ``(loss, grad_h, grad_w, sequence log-probs)``,
    static tensors that the next replay overwrites. Calling the object runs the head eagerly (the harness's
    head-alone error columns). ``graph_gib``: the peak of the capture's allocations (the graph's private pool,
    held between replays), reported as the row's peak. While captured, the head checks the labels on the device
    and runs ``max_labelled`` rows (a graph has fixed shapes; the bound is the labelled count, the same at every
    repetition here), found by ``nonzero_static``.
    """

    def __init__(self, impl: str):
        self.impl = impl
        self.graph_gib = None
        self.release()

    def __call__(self, h, w, labels):
        import align_losses

        return align_losses.linear_logprobs(h, w, labels, impl=self.impl)

    def release(self) -> None:
        """Drop the graph and its pool (at the end of a shape's runs)."""
        self.key = self.graph = self.out = self.static_h = self.static_labels = None

    def whole_step(self, h, w, labels, pairs: int):
        torch = _torch()
        key = (tuple(h.shape), h.dtype, w.data_ptr(), tuple(w.shape), pairs)
        if key != self.key:
            self._capture(h, w, labels, pairs)
            self.key = key
        with torch.no_grad():
            self.static_h.copy_(h)
        self.static_labels.copy_(labels)
        self.graph.replay()
        return self.out

    def _capture(self, h, w, labels, pairs: int) -> None:
        torch = _torch()
        import align_losses
        from align_losses.ops import library

        self.release()  # the previous shape's pool goes first
        _common.free_memory("cuda")
        static_h = h.detach().clone().requires_grad_(True)
        static_labels = labels.clone()
        # The harness's labels hold the same number of labelled tokens at every repetition (the prompt share is
        # fixed): with that bound the graph runs those rows only, as an eager call does, not every row.
        options = {"max_labelled": int((labels != IGNORE).sum())}

        def go():
            per_token = align_losses.linear_logprobs(static_h, w, static_labels, impl=self.impl,
                                                     backend_options=options)
            loss = dpo_loss(per_token, pairs)
            gh, gw = torch.autograd.grad(loss, (static_h, w))
            return loss.detach(), gh, gw, per_token.detach().float().sum(-1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), library.no_host_sync():  # compile the captured path's kernels first
            for _ in range(2):
                go()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = go()
        torch.cuda.synchronize()
        self.graph_gib = (torch.cuda.max_memory_allocated() - before) / GiB
        self.graph, self.out, self.static_h, self.static_labels = graph, out, static_h, static_labels


def dpo_loss(per_token, pairs: int):
    """DPO sigmoid loss without a reference model: -logsigmoid(beta (chosen - rejected)), mean over pairs."""
    torch = _torch()
    seq = per_token.float().sum(-1)
    return -torch.nn.functional.logsigmoid(BETA * (seq[:pairs] - seq[pairs:])).mean()


def make_inputs(shape: Shape, std: float, device: str, seed: int):
    """bf16 hidden ``[rows, seq, D]`` ~ N(0, 1) and W ``[V, D]`` ~ N(0, std^2 / D): logits of std ``std``."""
    torch = _torch()
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(shape.rows, shape.seq, shape.hidden, device=device, generator=g).to(torch.bfloat16)
    w = torch.randn(shape.vocab, shape.hidden, device=device, generator=g).mul_(std / math.sqrt(shape.hidden))
    w = w.to(torch.bfloat16)
    return h.requires_grad_(True), w.requires_grad_(True)


def make_labels(shape: Shape, device: str, seed: int):
    torch = _torch()
    g = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, shape.vocab, (shape.rows, shape.seq), device=device, generator=g)
    labels[:, : shape.prompt] = IGNORE
    return labels


def fp32_reference(h, w, labels, pairs: int, chunk_bytes: int = 2**30):
    """DPO loss and grads of hidden [B, T, D] and W [V, D] in fp32 (TF32 off) from the bf16 inputs.

    Token chunks of at most ``chunk_bytes`` of fp32 logits; only labelled tokens are projected.
    Returns ``(loss, grad_hidden, grad_weight, upstream [B, T], sequence log-probs [B])``; the upstream
    is the loss's gradient with respect to each token's log-prob.
    """
    torch = _torch()
    # The precision API that both of PyTorch's TF32 settings agree with (torch >= 2.9 raises on a read of the legacy
    # allow_tf32 once the two disagree); "highest" is IEEE fp32 matmuls. The reference has no convolutions.
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            d = h.shape[-1]
            hf = h.detach().reshape(-1, d).float()
            wf = w.detach().float()
            flat = labels.reshape(-1)
            idx = torch.nonzero(flat != IGNORE).squeeze(1)
            lab = flat[idx]
            chunk = max(1, chunk_bytes // (4 * wf.shape[0]))
            logp = torch.zeros(flat.shape[0], dtype=torch.float32, device=h.device)
            for s in range(0, idx.numel(), chunk):
                rows = idx[s: s + chunk]
                z = hf[rows] @ wf.t()
                lse = torch.logsumexp(z, dim=1)
                logp[rows] = z.gather(1, lab[s: s + chunk, None]).squeeze(1) - lse
                del z
        per_token = logp.view(labels.shape).requires_grad_(True)
        loss = dpo_loss(per_token, pairs)
        (upstream,) = torch.autograd.grad(loss, per_token)
        with torch.no_grad():
            up = upstream.reshape(-1)
            gh = torch.zeros_like(hf)
            gw = torch.zeros_like(wf)
            for s in range(0, idx.numel(), chunk):
                rows = idx[s: s + chunk]
                u = up[rows]
                x = hf[rows]
                gz = torch.softmax(x @ wf.t(), dim=1).mul_(-u[:, None])
                gz[torch.arange(rows.numel(), device=h.device), lab[s: s + chunk]] += u
                gh[rows] = gz @ wf
                gw.addmm_(gz.t(), x)
                del gz
        return float(loss.detach()), gh.view(h.shape), gw, upstream.detach(), per_token.detach().sum(-1)
    finally:
        torch.set_float32_matmul_precision(prev)


def rel_err(g, ref) -> float:
    torch = _torch()
    with torch.no_grad():
        num = torch.zeros((), dtype=torch.float64, device=ref.device)
        den = torch.zeros((), dtype=torch.float64, device=ref.device)
        a, b = g.reshape(-1, g.shape[-1]), ref.reshape(-1, ref.shape[-1])
        step = max(1, (1 << 26) // a.shape[1])
        for s in range(0, a.shape[0], step):
            diff = a[s: s + step].float() - b[s: s + step]
            num += diff.double().square().sum()
            den += b[s: s + step].double().square().sum()
        return float((num / den).sqrt()) if float(den) > 0 else float("nan")


class Clock:
    """Times GPU work with CUDA events (CPU: perf_counter) and reads the allocator's peak."""

    def __init__(self, device: str):
        self.torch = _torch()
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn):
        if self.cuda:
            t = self.torch.cuda
            self.sync()
            start, end = t.Event(enable_timing=True), t.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out

    def peak(self, fn):
        """(result, GiB allocated above what was allocated before ``fn``, at the peak). On CPU: the process's
        resident memory at its peak above what was resident before (Linux; None elsewhere)."""
        gc.collect()
        if not self.cuda:
            base = _resident_kib("VmRSS") if _reset_resident_peak() else None
            out = fn()
            return out, ((_resident_kib("VmHWM") - base) * 1024 / GiB if base is not None else None)
        t = self.torch.cuda
        self.sync()
        t.reset_peak_memory_stats()
        base = t.memory_allocated()
        out = fn()
        self.sync()
        return out, (t.max_memory_allocated() - base) / GiB


def _reset_resident_peak() -> bool:
    """Reset the process's resident-memory high-water mark (VmHWM) to its current size; False where Linux's
    /proc/self/clear_refs is not there to do it. Large tensors are mapped and unmapped by the C allocator, so the
    mark follows the tensors (a CPU peak of the same meaning as the CUDA allocator's, within a few MiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _resident_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:400] if "\n" in text and "OutOfMemory" in text else text[:600]


def _cleanup(device: str):
    _common.free_memory(device)


def run_config(config: str, shape: Shape, regime: str, impl_names: list, reps: int, args, builders: dict, meta: dict,
               log: Callable) -> list:
    """All impls on one shape and logit regime; returns the result rows."""
    torch = _torch()
    device = args.device
    clock = Clock(device)
    if regime == CAPTURED:  # the real next tokens, the same at every repetition (captured_head.py says why)
        import captured_head

        data = captured_head.load(args.captured, device)
        h, w = data["hidden"].requires_grad_(True), data["weight"].requires_grad_(True)
        labels_ref = data["labels"].clone()
        labels_ref[:, : shape.prompt] = IGNORE
        label_sets = [labels_ref] * (args.warmup + reps)
        extra = {"captured_path": args.captured, "captured_meta": {k: v for k, v in data.get("meta", {}).items()
                                                                    if k != "corpus"}}
        del data
    else:
        seed = 1234 + 17 * list(LOGITS).index(regime)
        h, w = make_inputs(shape, LOGITS[regime], device, seed)
        labels_ref = make_labels(shape, device, seed + 1)
        label_sets = [make_labels(shape, device, seed + 100 + i) for i in range(args.warmup + reps)]
        extra = {}
    if args.captured:  # how peaked each regime's distributions are, to compare the synthetic ones with the real
        import captured_head

        extra["dist"] = captured_head.distribution_stats(h.detach(), w.detach(), labels_ref)
        log(f"  distributions: {extra['dist']}")

    t0 = time.time()
    ref_loss, ref_gh, ref_gw, ref_up, ref_seq = fp32_reference(h, w, labels_ref, shape.pairs)
    log(f"  fp32 reference {time.time() - t0:.1f}s (loss {ref_loss:.4g})")

    # The floor: three bf16 GEMMs over the labelled tokens, into preallocated outputs.
    mask = labels_ref.reshape(-1) != IGNORE
    hl = h.detach().reshape(-1, shape.hidden)[mask].contiguous()
    wd = w.detach()
    gz = (torch.randn(hl.shape[0], shape.vocab, device=device) * 1e-3).to(torch.bfloat16)
    z_out = torch.empty(hl.shape[0], shape.vocab, device=device, dtype=torch.bfloat16)
    gh_out = torch.empty_like(hl)
    gw_out = torch.empty_like(wd)

    def floor():
        torch.mm(hl, wd.t(), out=z_out)
        torch.mm(gz, wd, out=gh_out)
        torch.mm(gz.t(), hl, out=gw_out)

    def bound():
        """The floor and the logits GEMM once more: the least a head that keeps no [N, V] tensor does."""
        floor()
        torch.mm(hl, wd.t(), out=z_out)

    for _ in range(2):
        clock.time(floor)
        clock.time(bound)
    floor_ms, bound_ms = [], []

    base = {
        "config": config, "logits": regime, "logit_std": LOGITS.get(regime), "tokens": shape.tokens,
        "tokens_total": shape.tokens_total, "rows": shape.rows, "seq": shape.seq, "hidden": shape.hidden,
        "vocab": shape.vocab, "loss_ref": ref_loss, "expected_grads_gib": expected_grads_gib(shape), **meta, **extra,
    }
    results = {}
    fns = {}

    def step(fn, labels):
        whole_step = getattr(fn, "whole_step", None)  # GraphedStep: the whole step is one graph replay
        if whole_step is not None:
            return lambda: whole_step(h, w, labels, shape.pairs)

        def go():
            per_token = fn(h, w, labels)
            loss = dpo_loss(per_token, shape.pairs)
            gh, gw = torch.autograd.grad(loss, (h, w))
            return loss.detach(), gh, gw, per_token.detach().float().sum(-1)
        return go

    def fixed_upstream(fn):
        """The head alone: grads of sum(log-prob x the fp32 reference's upstream), whose fp32 grads are ref_gh/ref_gw."""
        per_token = fn(h, w, labels_ref)
        return torch.autograd.grad((per_token.float() * ref_up).sum(), (h, w))

    def measure(fn) -> dict:
        """Warm-up runs, then peak memory and gradient errors on the reference labels."""
        for i in range(args.warmup):
            clock.time(step(fn, label_sets[i]))
        (loss, gh, gw, seq), peak = clock.peak(step(fn, labels_ref))
        if getattr(fn, "graph_gib", None) is not None:  # a replay allocates nothing; its graph holds its pool
            peak = max(peak or 0.0, fn.graph_gib)
        out = {
            "peak_gib": peak,
            "grads_gib": (gh.numel() * gh.element_size() + gw.numel() * gw.element_size()) / GiB,
            "grad_h_rel": rel_err(gh, ref_gh),
            "grad_w_rel": rel_err(gw, ref_gw),
            "seq_logp_err": float((seq - ref_seq).abs().max()),
            "loss": float(loss),
            "grad_dtype": str(gh.dtype).replace("torch.", ""),
        }
        del loss, gh, gw, seq
        gh, gw = fixed_upstream(fn)
        out["head_grad_h_rel"] = rel_err(gh, ref_gh)
        out["head_grad_w_rel"] = rel_err(gw, ref_gw)
        return out

    # Phase 1, impl by impl: warm-up, then one run on the reference labels for peak memory and errors.
    for name in impl_names:
        row = {**base, "impl": name, "label": IMPLS[name], "error": None, "ms": None, "ms_all": [],
               "peak_gib": None, "grads_gib": None, "grad_h_rel": None, "grad_w_rel": None, "loss": None,
               "head_grad_h_rel": None, "head_grad_w_rel": None, "seq_logp_err": None,
               "filtering": name == "ours-triton-filter"}
        results[name] = row
        built = builders.get(name)
        if isinstance(built, BaseException):
            row["error"] = _short_error(built)
            continue
        fn, info = built
        if info:
            row["info"] = info
        t1 = time.time()
        try:
            row.update(measure(fn))
            fns[name] = fn
            log(f"  {name}: warm-up + measure {time.time() - t1:.1f}s; peak {fmt_gib(row['peak_gib'])}, "
                f"grad_h err {fmt_err(row['grad_h_rel'])} (fixed upstream {fmt_err(row['head_grad_h_rel'])}), "
                f"grad_w err {fmt_err(row['grad_w_rel'])} ({fmt_err(row['head_grad_w_rel'])}), "
                f"max |seq log-prob err| {row['seq_logp_err']:.2g}")
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["error"] = _short_error(exc)
            log(f"  {name}: FAILED {row['error'][:200]}")
            if os.environ.get("HEAD_BENCH_TRACEBACK"):
                traceback.print_exc()
        finally:
            _cleanup(device)

    # Phase 2: timed rounds, the floor once per round, impls and the bound rotated; new labels every repetition.
    active = [n for n in impl_names if n in fns] + [BOUND]
    for r in range(reps):
        floor_ms.append(clock.time(floor)[0])
        order = active[r % len(active):] + active[: r % len(active)]
        for name in order:
            if name == BOUND:
                bound_ms.append(clock.time(bound)[0])
                continue
            if results[name]["error"]:
                continue
            try:
                ms, out = clock.time(step(fns[name], label_sets[args.warmup + r]))
                del out
                results[name]["ms_all"].append(ms)
            except Exception as exc:  # noqa: BLE001
                results[name]["error"] = "while timing: " + _short_error(exc)
                log(f"  {name}: FAILED while timing {results[name]['error'][:200]}")
                _cleanup(device)
    floor_ms.append(clock.time(floor)[0])
    for fn in fns.values():
        getattr(fn, "release", lambda: None)()  # a CUDA graph's pool, held between its replays
    fl, bd = median(floor_ms), median(bound_ms)
    log(f"  floor {fmt_ms(fl)} (runs: {', '.join(f'{x:.2f}' for x in floor_ms)})")
    log(f"  four-GEMM bound {fmt_ms(bd)} = x{bd / fl:.2f} (runs: {', '.join(f'{x:.2f}' for x in bound_ms)})")

    rows = []
    for name in impl_names:
        row = results[name]
        row["floor_ms"] = fl
        row["floor_ms_all"] = floor_ms
        row["bound_ms"] = bd
        row["bound_ms_all"] = bound_ms
        row["bound_ratio"] = bd / fl if fl else None
        if row["ms_all"] and not row["error"]:
            row["ms"] = median(row["ms_all"])
            row["ratio"] = row["ms"] / fl if fl else None
        else:
            row["ratio"] = None
        g = row["grads_gib"] if row["grads_gib"] is not None else expected_grads_gib(shape)
        row["target_peak_gib"] = target_peak_gib(shape, g)
        row["checks"] = row_checks(row)
        rows.append(row)
        if row["ms"] is not None:
            log(f"  {name:20s} {fmt_ms(row['ms']):>9s}  x{row['ratio']:.2f}  peak {fmt_gib(row['peak_gib'])}")
    return rows


def versions() -> dict:
    out = _common.versions(
        ("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "nvidia-cutlass-dsl", "transformers"), cuda=False)
    if "nvidia-cutlass-dsl" not in out:
        try:
            import cutlass  # noqa: F401 - from an unpacked tree (PYTHONPATH), no dist-info

            out["nvidia-cutlass-dsl"] = getattr(cutlass, "__version__", "present")
        except Exception:  # noqa: BLE001
            pass
    torch = _torch()
    out["cuda"] = torch.version.cuda
    return out


def write_outputs(rows: list, meta: dict, args) -> dict:
    paths = _common.write_outputs(rows, meta, args, render_markdown)
    if not args.no_plot:
        paths["png"] = os.path.join(args.out, f"{args.name}.png")
        try:
            from plot_head import plot  # benchmarks/ is on sys.path (above)

            if plot(rows, paths["png"]) is None:
                paths.pop("png")
        except ImportError as exc:
            print(f"no plot ({exc}); run `python benchmarks/plot_head.py {paths['json']}` where matplotlib is", flush=True)
            paths.pop("png")
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = validate(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(plan, args)
        return 0

    torch = _torch()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu to test the harness)", file=sys.stderr)
        return 2
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    print_plan(plan, args)
    meta = _common.run_meta(args.commit, _common.device_name(args.device, cores=False), versions(),
                            "python benchmarks/head.py " + " ".join(sys.argv[1:] if argv is None else argv))
    log(f"device {meta['device']}; versions {meta['versions']}")

    # CCE's torch_compile impl: compile each shape statically (no automatic dynamic shapes after the
    # first shape, which would time a dynamic-shape kernel on the later ones).
    try:
        import torch._dynamo

        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    except Exception:  # noqa: BLE001
        pass

    if args.register_triton:
        from align_losses import backends

        if "triton" not in backends.names():
            backends._MODULES["triton"] = "align_losses.backends.triton"
            log("registered align_losses.backends.triton as 'triton' for this run (--register-triton)")

    impls = Impls(args.device, plan["triton_filter_override"])
    builders = {}
    for name in plan["impls"]:
        try:
            builders[name] = impls.build(name)
        except BaseException as exc:  # noqa: BLE001 - ImportError, RuntimeError, ...
            if isinstance(exc, KeyboardInterrupt):
                raise
            builders[name] = exc
            log(f"{name}: unavailable: {_short_error(exc)[:300]}")

    rows = []
    row_meta = _common.row_meta(meta)
    for config, shape in plan["shapes"].items():
        for regime in plan["logits"]:
            log(f"{config} / {regime}: N {shape.tokens_total} ({shape.tokens} labelled), D {shape.hidden}, "
                f"V {shape.vocab}, reps {plan['reps'][config]}")
            try:
                rows += run_config(config, shape, regime, plan["impls"], plan["reps"][config], args, builders,
                                   row_meta, log)
                _cleanup(args.device)  # run_config's tensors are gone with its frame
            except Exception as exc:  # noqa: BLE001 - e.g. OOM in the reference: record every impl as failed
                log(f"{config} / {regime}: FAILED {_short_error(exc)}")
                traceback.print_exc()
                for name in plan["impls"]:
                    rows.append({**row_meta, "config": config, "impl": name, "logits": regime, "tokens": shape.tokens,
                                 "tokens_total": shape.tokens_total, "hidden": shape.hidden, "vocab": shape.vocab,
                                 "ms": None, "floor_ms": None, "peak_gib": None, "grads_gib": None,
                                 "grad_h_rel": None, "grad_w_rel": None,
                                 "error": "config failed: " + _short_error(exc)})
                _cleanup(args.device)
            # Write after every config so a run cut short still leaves results.
            write_outputs(rows, meta, argparse.Namespace(**{**vars(args), "no_plot": True}))
    paths = write_outputs(rows, meta, args)
    log(f"wrote {', '.join(paths.values())}; total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
