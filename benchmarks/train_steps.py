"""Whole training steps: TRL 1.16's DPO / ORPO trainers against ours, side by side in one process.

The "Whole training steps" table of ../shared/TARGETS.md: a Qwen3-1.7B-shaped model (random init, bf16),
one preference pair per step (per_device_train_batch_size=1), gradient checkpointing, AdamW (torch), a
reference model copy (DPO: passed as ``ref_model``; ORPO: kept in memory but unused, as TARGETS.md's
"base" holds it in every row; ``--no-ref-copy`` drops it for ORPO), ``precompute_ref_log_probs=False``,
``report_to="none"``, logging every step, constant learning rate.

    python benchmarks/train_steps.py --commit $(git rev-parse --short HEAD)   # H200: ~3-4 min
    python benchmarks/train_steps.py --lengths 512+1536,1024+3072,2048+6144   # the full table (~5 min)
    python benchmarks/train_steps.py --quick                                   # tiny model on CPU, < 1 min

Trainers (``--trainers``, comma-separated): ``trl-dpo`` (`trl.DPOTrainer`, its chunked head),
``fused-dpo`` (`trainers.FusedDPOTrainer`), ``trl-orpo`` (`trl.experimental.orpo.ORPOTrainer`, full
logits), ``fused-orpo`` (`trainers.orpo.FusedORPOTrainer`). Lengths (``--lengths``): ``P+C`` = prompt +
completion tokens of every sequence (chosen and rejected have the same length, so nothing is padded).

Data: random text made of words that are single tokens of the shipped tokenizer (``examples/tokenizer``,
372 tokens; the model's vocabulary is still 151936), so the trainers' own tokenisation gives exactly P
prompt and C completion tokens: TRL's DPO appends EOS to the completions, TRL's ORPO adds BOS to the prompt
and EOS to the completions, and the word counts allow for it. The lengths the trainers actually produced
are read back from their tokenised datasets and recorded (``prompt_tokens``, ``completion_tokens``); the
row's ``tokens_per_step`` counts them. ``max_length`` is P + C + 8 (nothing is truncated).
For each length, every trainer starts from the same random weights (seed) and the same data, so the
DPO (and ORPO) loss curves of TRL and ours can be compared step by step.

Measured per (trainer, length), the model built directly on the GPU:
- ``step_ms``: median wall time of the timed steps (``--steps``, default 4) after ``--warmup`` (default 1)
  untimed steps, from ``on_step_begin`` to ``on_step_end`` of a TrainerCallback with
  ``torch.cuda.synchronize()`` at both ends (forward + backward + optimizer step; data loading and
  logging outside); ``step_ms_all`` all steps;
- ``tokens_per_s``: (prompt + completion) x 2 sequences / median step time;
- ``base_gib``: ``memory_allocated`` after the model (and reference copy) is built;
- ``peak_gib``: ``max_memory_allocated`` from then to the end of training: the total, model and reference
  included, as TARGETS.md reports it; ``step_peak_gib``: per-step peaks;
- ``losses`` (and ``grad_norms``, ``metrics``: everything the trainer logged) of every step.
Between configs everything is freed (trainer, models, gc, ``torch.cuda.empty_cache``); ``leftover_gib``
is what remained allocated after that. A failing config (OOM, anything) gives a row with ``error``.

Outputs in ``--out`` (default ``benchmarks/results/``; ``--quick``: ``train-steps-quick.*``): ``train-steps-latest.json`` (a list of rows) and
``train-steps-latest.md`` (tables like TARGETS.md, the TARGETS.md reference figures beside the TRL rows,
ours against TRL at the same length, loss curves), rewritten after every config.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, however this is run
import _common  # noqa: E402 - puts the checkout on sys.path too
from _common import GiB, QUICK_MODEL, QWEN3_1_7B, free_memory, load_tokenizer, log, md_escape, meta_lines  # noqa: E402
from _common import fmt as _fmt  # noqa: E402

TRAINERS = ("trl-dpo", "fused-dpo", "trl-orpo", "fused-orpo")
LABELS = {
    "trl-dpo": "trl.DPOTrainer (its chunked head)",
    "fused-dpo": "FusedDPOTrainer (ours)",
    "trl-orpo": "trl.experimental ORPOTrainer (full logits)",
    "fused-orpo": "FusedORPOTrainer (ours)",
}
DEFAULT_LENGTHS = "512+1536,2048+6144"
QUICK_LENGTHS = "32+96,48+144"
#: TARGETS.md "Whole training steps": (trainer, P, C) -> (peak GiB, step ms, tokens/s)
TARGETS = {
    ("trl-dpo", 512, 1536): (16.7, 260, 15.8e3),
    ("trl-dpo", 1024, 3072): (17.1, 455, 18.0e3),
    ("trl-dpo", 2048, 6144): (18.2, 921, 17.8e3),
    ("trl-orpo", 512, 1536): (19.2, 258, 15.9e3),
    ("trl-orpo", 1024, 3072): (25.5, 388, 21.1e3),
    ("trl-orpo", 2048, 6144): (38.1, 799, 20.5e3),
}
VERSIONS = ("torch", "transformers", "trl", "accelerate", "datasets", "triton")


# ---------------------------------------------------------------------------------------------------------------------
# Data


def parse_lengths(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            p, c = item.split("+")
            p, c = int(p), int(c)
        except ValueError:
            raise SystemExit(f"bad length {item!r}: expected PROMPT+COMPLETION, e.g. 512+1536")
        if p < 2 or c < 2:
            raise SystemExit(f"bad length {item!r}: prompt and completion need at least 2 tokens each")
        out.append((p, c))
    if not out:
        raise SystemExit("no lengths given")
    return out


def single_token_words(tok) -> list[str]:
    """Words ``" xyz"`` that the tokenizer maps to exactly one token (a space-separated run of them: one each)."""
    words = []
    for piece in tok.get_vocab():
        if piece.startswith("\u0120") and piece[1:].isalpha():
            word = " " + piece[1:]
            if len(tok(word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    if len(words) < 2:
        raise RuntimeError("the tokenizer has fewer than 2 single-token words")
    return sorted(words)


def random_text(words: list[str], n: int, rng: random.Random) -> str:
    return "".join(rng.choice(words) for _ in range(n))


def make_dataset(tok, words, rows: int, prompt_words: int, completion_words: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    data = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(rows):
        data["prompt"].append(random_text(words, prompt_words, rng))
        data["chosen"].append(random_text(words, completion_words, rng))
        data["rejected"].append(random_text(words, completion_words, rng))
    # check the premise: n words -> n tokens
    probe = data["prompt"][0] + data["chosen"][0]
    got = len(tok(probe, add_special_tokens=False)["input_ids"])
    if got != prompt_words + completion_words:
        raise RuntimeError(f"text of {prompt_words + completion_words} words gave {got} tokens")
    return Dataset.from_dict(data)


def tokenized_lengths(name: str, dataset) -> tuple[int, int, int]:
    """``(prompt, completion, tokens of the two sequences)`` of the trainer's tokenised row 0 (max over rows)."""
    rows = [dataset[i] for i in range(len(dataset))]
    if name.endswith("dpo"):
        p = max(len(r["prompt_ids"]) for r in rows)
        c = max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
        total = max(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    else:
        p = max(len(r["prompt_input_ids"]) for r in rows)
        c = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) - len(r["prompt_input_ids"]) for r in rows)
        total = max(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    return p, c, total


# ---------------------------------------------------------------------------------------------------------------------
# Model


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------------
# One config


def make_timer(device: str):
    import torch
    from transformers import TrainerCallback

    cuda = device == "cuda"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.peaks, self.fwd_bwd_peaks = [], [], []
            self._t0 = None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            # The AdamW step's own temporaries can top every head: record forward + backward apart.
            if cuda:
                torch.cuda.synchronize()
                self.fwd_bwd_peaks.append(torch.cuda.max_memory_allocated() / GiB)

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)
            self.peaks.append(torch.cuda.max_memory_allocated() / GiB if cuda else None)

    return StepTimer()


def trainer_and_config(name: str, args, P: int, C: int, out_dir: str):
    """``(trainer class, config)`` for one trainer name."""
    import trl

    common = dict(
        output_dir=out_dir,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        gradient_checkpointing=not args.no_gradient_checkpointing,
        bf16=args.dtype == "bfloat16",
        use_cpu=args.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
        beta=args.beta,
        max_length=P + C + 8,
    )
    if name == "trl-dpo":
        return trl.DPOTrainer, trl.DPOConfig(**common, precompute_ref_log_probs=False)
    if name == "fused-dpo":
        from trainers import FusedDPOConfig, FusedDPOTrainer

        return FusedDPOTrainer, FusedDPOConfig(**common, precompute_ref_log_probs=False, lce_impl=args.impl)
    if name == "trl-orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig(**common)
    if name == "fused-orpo":
        from trainers.orpo import FusedORPOConfig, FusedORPOTrainer

        return FusedORPOTrainer, FusedORPOConfig(**common, lce_impl=args.impl)
    raise ValueError(name)


def run_config(name: str, P: int, C: int, args, tok, words, model_kwargs, refs: list) -> dict:
    """One (trainer, length) row; ``refs`` gets weak references to the models (to check they are freed)."""
    import torch

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    row: dict = {}
    dpo = name.endswith("dpo")
    # word counts: DPO adds EOS to completions; ORPO adds BOS to the prompt and EOS to completions
    prompt_words = P if dpo else P - 1
    completion_words = C - 1
    dataset = make_dataset(tok, words, args.warmup + args.steps, prompt_words, completion_words, args.seed + P + C)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    model = _common.build_model(model_kwargs, args.device, dtype, args.seed, args.attn, train=True)
    ref = copy.deepcopy(model) if (dpo or not args.no_ref_copy) else None
    if ref is not None:
        ref.eval()
    refs.extend(weakref.ref(m) for m in (model, ref) if m is not None)
    if cuda:
        torch.cuda.synchronize()
    row["build_s"] = time.perf_counter() - t_build
    row["model_gib"] = model_bytes(model) / GiB
    row["ref_copy"] = ref is not None
    row["params"] = sum(p.numel() for p in model.parameters())
    row["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    row["base_gib"] = torch.cuda.memory_allocated() / GiB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    out_dir = tempfile.mkdtemp(prefix=f"train-steps-{name}-")
    try:
        cls, config = trainer_and_config(name, args, P, C, out_dir)
        timer = make_timer(args.device)
        kwargs = dict(model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[timer])
        if dpo:
            kwargs["ref_model"] = ref
        t_init = time.perf_counter()
        trainer = cls(**kwargs)
        row["init_s"] = time.perf_counter() - t_init
        p, c, total = tokenized_lengths(name, trainer.train_dataset)
        row.update(prompt_tokens=p, completion_tokens=c, tokens_per_step=total)
        if (p, c) != (P, C):
            log(f"  WARNING: {name} tokenised to {p}+{c}, not {P}+{C}")
        if hasattr(trainer, "lce_backend"):
            try:
                row["backend"] = trainer.lce_backend
            except Exception as exc:  # informative only
                row["backend"] = f"? ({exc})"
        pre_peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
        t_train = time.perf_counter()
        trainer.train()
        row["train_s"] = time.perf_counter() - t_train

        times = timer.times
        timed = times[args.warmup:]
        if not timed:
            raise RuntimeError(f"no timed steps ({len(times)} steps ran)")
        row["step_ms"] = statistics.median(timed) * 1e3
        row["step_ms_all"] = [t * 1e3 for t in times]
        row["tokens_per_s"] = total / statistics.median(timed)
        if cuda:
            row["step_peak_gib"] = timer.peaks
            row["fwd_bwd_peak_gib"] = max(timer.fwd_bwd_peaks) if timer.fwd_bwd_peaks else None
            row["peak_gib"] = max([pre_peak] + [x for x in timer.peaks if x is not None])
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        row["losses"] = [e["loss"] for e in logs]
        row["grad_norms"] = [e.get("grad_norm") for e in logs]
        row["metrics"] = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in logs]
        row["steps_run"] = trainer.state.global_step
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Output


def _tok(x):
    return "-" if x is None else f"{x / 1e3:.1f}k"


def _find(rows, trainer, P, C):
    for r in rows:
        if r["trainer"] == trainer and r["P"] == P and r["C"] == C and not r.get("error"):
            return r
    return None


def render_markdown(rows: list, meta: dict) -> str:
    lines = [
        "# Whole training steps: TRL 1.16 trainers against ours",
        "",
        *meta_lines(meta),  # date, commit, device, versions, command, model
        f"- {meta['setup']}",
        "",
        "Peak = `max_memory_allocated` from model creation to the end of training (model and reference copy "
        "included, as TARGETS.md); fwd+bwd = the same peak read before each optimizer step (AdamW's own "
        "temporaries can exceed the head's); base = allocated after the model (and reference copy) is built. "
        "Step = median of the timed steps (forward + backward + AdamW step, `cuda.synchronize` at both ends). "
        "tokens/s = 2 x (prompt + completion) / step. TARGETS.md = the reference figures of TARGETS.md's table.",
        "",
        "| trainer | prompt+completion | peak | fwd+bwd | base | step | tokens/s | TARGETS.md (peak / step / tokens/s) | losses | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tgt = TARGETS.get((r["trainer"], r["P"], r["C"]))
        tgt_s = f"{tgt[0]} GiB / {tgt[1]} ms / {tgt[2] / 1e3:.1f}k" if tgt else ""
        length = f"{r['P']}+{r['C']}"
        if r.get("prompt_tokens") is not None and (r["prompt_tokens"], r["completion_tokens"]) != (r["P"], r["C"]):
            length += f" (got {r['prompt_tokens']}+{r['completion_tokens']})"
        losses = ", ".join(f"{x:.4f}" for x in r.get("losses") or [])
        err = md_escape(r.get("error") or "")[:160]
        lines.append(
            f"| {LABELS.get(r['trainer'], r['trainer'])} | {length} | {_fmt(r.get('peak_gib'), '.1f', ' GiB')} | "
            f"{_fmt(r.get('fwd_bwd_peak_gib'), '.2f', ' GiB')} | "
            f"{_fmt(r.get('base_gib'), '.1f', ' GiB')} | {_fmt(r.get('step_ms'), '.0f', ' ms')} | "
            f"{_tok(r.get('tokens_per_s'))} | {tgt_s} | {losses} | {err} |"
        )
    lines += ["", "## Ours against TRL at the same length", ""]
    lines += [
        "DPO target: peak and tokens/s no worse than TRL's. ORPO target: peak within 1 GiB of trl.DPOTrainer's "
        "peak at that length (this run's; minus the reference model when the ORPO rows hold no reference copy) "
        "and at least TRL ORPO's tokens/s. Loss diff = max |ours - TRL| over the steps (same weights, same data; "
        "step 1 of DPO is log 2 for both).",
        "",
        "| pair | prompt+completion | peak ours / TRL | speed ours / TRL | loss diff (max abs) | checks |",
        "|---|---|---|---|---|---|",
    ]
    for P, C in sorted({(r["P"], r["C"]) for r in rows}):
        for algo in ("dpo", "orpo"):
            ours, theirs = _find(rows, f"fused-{algo}", P, C), _find(rows, f"trl-{algo}", P, C)
            if not ours:
                continue
            checks = []
            peak_s = speed_s = diff_s = "-"
            if theirs:
                if ours.get("peak_gib") is not None:
                    peak_s = f"{ours['peak_gib']:.1f} / {theirs['peak_gib']:.1f} GiB ({ours['peak_gib'] - theirs['peak_gib']:+.1f})"
                speed_s = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
                n = min(len(ours["losses"]), len(theirs["losses"]))
                if n:
                    diff_s = f"{max(abs(a - b) for a, b in zip(ours['losses'][:n], theirs['losses'][:n])):.2e}"
                checks.append(f"speed {'ok' if ours['tokens_per_s'] >= theirs['tokens_per_s'] else 'FAIL'}")
            if ours.get("peak_gib") is not None:
                if algo == "dpo" and theirs:
                    checks.append(f"memory {'ok' if ours['peak_gib'] <= theirs['peak_gib'] else 'FAIL'}")
                if algo == "orpo":
                    dpo_ref = _find(rows, "trl-dpo", P, C)
                    dpo_peak = dpo_ref["peak_gib"] if dpo_ref else (TARGETS.get(("trl-dpo", P, C)) or (None,))[0]
                    if dpo_peak is not None:
                        limit = dpo_peak + 1.0 - (0.0 if ours.get("ref_copy") else ours["model_gib"])
                        checks.append(f"memory {'ok' if ours['peak_gib'] <= limit else 'FAIL'} (limit {limit:.1f} GiB)")
            lines.append(f"| {algo.upper()} | {P}+{C} | {peak_s} | {speed_s} | {diff_s} | {', '.join(checks)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _common.doc_parser(__doc__)
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {list(TRAINERS)} (default all)")
    p.add_argument("--lengths", help=f"comma-separated PROMPT+COMPLETION token lengths (default {DEFAULT_LENGTHS}; "
                   f"with --quick {QUICK_LENGTHS}); TARGETS.md also has 1024+3072")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 4; 2 with --quick)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate, constant (default 1e-5)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO / ORPO beta (default 0.1)")
    p.add_argument("--impl", default="auto", help="lce_impl of our trainers (default auto)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="model dtype (default bfloat16; float32 on CPU; bf16=True in the trainer config when bfloat16)")
    p.add_argument("--no-ref-copy", action="store_true",
                   help="ORPO rows: do not keep an (unused) reference copy in memory (TARGETS.md's rows keep one)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    _common.add_run_args(
        p, quick_help=f"tiny Qwen3-shaped model ({QUICK_MODEL['num_hidden_layers']} layers, width "
                      f"{QUICK_MODEL['hidden_size']}, vocab {QUICK_MODEL['vocab_size']}), lengths {QUICK_LENGTHS}, "
                      "1 + 2 steps, on CPU unless --device cuda: a smoke test",
        name_help="output file stem (default train-steps-latest; train-steps-quick with --quick)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.name = args.name or ("train-steps-quick" if args.quick else "train-steps-latest")
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    bad = [t for t in trainers if t not in TRAINERS]
    if bad:
        raise SystemExit(f"unknown trainers {bad}; choose from {list(TRAINERS)}")
    lengths = parse_lengths(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    _common.resolve_device_dtype(args)
    _common.setup_torch(args.device)

    model_kwargs = QUICK_MODEL if args.quick else QWEN3_1_7B
    meta = _common.run_meta(
        args.commit, _common.device_name(args.device), _common.versions(VERSIONS),
        _common.command_line(__file__, argv),
        model_desc=_common.model_desc(model_kwargs, args.quick, f", random init, {args.dtype}, attn {args.attn}"),
        setup=(f"batch 1 pair, gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, "
                  f"AdamW (adamw_torch) lr {args.lr:g} constant, beta {args.beta:g}, {args.warmup} warm-up + "
                  f"{args.steps} timed steps; reference copy: DPO passed as ref_model, ORPO "
                  f"{'none' if args.no_ref_copy else 'kept in memory, unused'}; lce_impl {args.impl}"),
    )
    row_meta = _common.row_meta(meta)
    log(f"device {meta['device']}; versions {meta['versions']}")
    log(f"trainers {trainers}; lengths {['%d+%d' % pc for pc in lengths]}; {args.warmup}+{args.steps} steps; out {args.out}/{args.name}.{{json,md}}")

    tok = load_tokenizer()
    words = single_token_words(tok)
    rows = []
    t_all = time.perf_counter()
    for P, C in lengths:
        for name in trainers:
            log(f"{name} {P}+{C} ...")
            row = {"trainer": name, "label": LABELS[name], "P": P, "C": C, **row_meta, "error": None}
            t0 = time.perf_counter()
            refs: list = []
            try:
                row.update(run_config(name, P, C, args, tok, words, model_kwargs, refs))
            except Exception as exc:  # OOM or anything else: an error row, the run goes on
                row["error"] = ("OOM: " if _common.is_oom(exc) else "") + f"{type(exc).__name__}: {str(exc)[:500]}"
                traceback.print_exc()
                del exc
            row["wall_s"] = time.perf_counter() - t0
            row["leftover_gib"] = free_memory(args.device)
            row["models_freed"] = all(r() is None for r in refs)
            if not row["models_freed"]:
                log("  note: a model of this config is still referenced after freeing (memory of later rows may include it)")
            rows.append(row)
            if row["error"]:
                log(f"  ERROR {row['error'][:300]}")
            else:
                log(f"  step {row['step_ms']:.0f} ms (all {', '.join(f'{t:.0f}' for t in row['step_ms_all'])}), "
                    f"{row['tokens_per_s']:,.0f} tokens/s, tokens {row['prompt_tokens']}+{row['completion_tokens']}, "
                    f"peak {_fmt(row.get('peak_gib'), '.2f', ' GiB')}, base {_fmt(row.get('base_gib'), '.2f', ' GiB')}, "
                    f"losses {[round(x, 4) for x in row['losses']]}"
                    + (f", backend {row['backend']}" if row.get("backend") else "")
                    + f"; {row['wall_s']:.1f}s wall")
            if row["leftover_gib"] is not None and row["leftover_gib"] > 0.05:
                log(f"  note: {row['leftover_gib']:.2f} GiB still allocated after freeing")
            _common.write_outputs(rows, meta, args, render_markdown)
    paths = _common.write_outputs(rows, meta, args, render_markdown)
    log(f"done in {time.perf_counter() - t_all:.0f}s; wrote {paths['json']} and {paths['md']}")
    print(render_markdown(rows, meta), flush=True)
    return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
