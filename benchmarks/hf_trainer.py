"""A plain `transformers.Trainer` SFT run, four ways: peak memory and tokens/s of the LM head as users meet it.

A Qwen3-1.7B-shaped model (random weights), bf16, batch 1, gradient checkpointing, 8 gradient-accumulation
micro-batches per optimizer step, every token scored, at sequence 4096 and 16384; for each configuration one
warm-up optimizer step and 2 timed ones, each (configuration, length) in a fresh subprocess so that peaks do not
mix (``torch.cuda.max_memory_allocated`` over the whole run, weights and AdamW state included):

- ``unpatched``: the model's own forward (full logits, transformers' ``ForCausalLMLoss``);
- ``ours``: the same script after ``trainers.apply_fused_head(model)``;
- ``liger``: after Liger's ``apply_liger_kernel_to_qwen3`` with only ``fused_linear_cross_entropy`` on (rope,
  RMSNorm, SwiGLU and plain cross-entropy off: the comparison is the head);
- ``trl-sft``: TRL 1.16's ``SFTTrainer`` as it is, with its own chunked head (it also computes its entropy and
  token-accuracy metrics).

The first optimizer step's loss of each run is recorded too: the same seed, data and weights, so the four agree
to bf16 rounding. Writes ``hf-trainer-latest.json`` and ``.md`` (date, commit, device) to ``--out`` after each run.

    python benchmarks/hf_trainer.py --commit COMMIT --out benchmarks/results
    python benchmarks/hf_trainer.py --quick            # CPU smoke test: a tiny model, lengths 64 and 128

A configuration that fails (out of memory, a missing package) is recorded with its error; the others run.
On the GPU machine, carry `.whl/` (TRL 1.16, datasets and what it needs, liger-kernel, the newer transformers;
benchmarks/README.md) and, from the repo root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/hf_trainer.py --commit COMMIT --out $OUT

About 4-6 minutes on one H100 (8 runs, each importing, building the model and training 24 micro-batches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py

from _common import (  # noqa: E402
    GiB, QUICK_MODEL, QWEN3_1_7B, add_commit_arg, add_output_args, build_model, command_line, device_name,
    doc_parser, fmt, load_tokenizer, log, md_escape, model_desc, run_meta, setup_torch, sync, versions, write_outputs,
)

CONFIGS = ("unpatched", "ours", "liger", "trl-sft")
VERSIONS = ("torch", "transformers", "trl", "accelerate", "liger-kernel", "triton")


def parse_args(argv=None):
    p = doc_parser(__doc__)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS))
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 4096,16384; --quick 64,128)")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step (default %(default)s)")
    p.add_argument("--timed-steps", type=int, default=2, help="optimizer steps timed after one warm-up (default %(default)s)")
    p.add_argument("--impl", default="auto", help="our backend (default %(default)s)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default cuda (cpu with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny model and short lengths (CPU smoke test)")
    p.add_argument("--worker-timeout", type=int, default=300, help="seconds per run before it is killed")
    add_output_args(p, "file stem (default hf-trainer-latest)", "hf-trainer-latest")
    add_commit_arg(p)
    # one run, in the subprocess
    p.add_argument("--worker", default=None, help=argparse_hidden())
    p.add_argument("--length", type=int, default=None, help=argparse_hidden())
    p.add_argument("--result", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown --configs {bad}; expected some of {list(CONFIGS)}")
    default = "64,128" if args.quick else "4096,16384"
    try:
        args.lengths = [int(x) for x in (args.lengths or default).split(",")]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if any(n < 8 for n in args.lengths) or args.grad_accum < 1 or args.timed_steps < 1:
        p.error("lengths must be >= 8, --grad-accum and --timed-steps >= 1")
    return args


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


# ---------------------------------------------------------------------------------------------------------------------
# One run (a subprocess)


class _Rows:
    """``n`` rows of ``length`` random token ids (seeded per row); every token is a label."""

    def __init__(self, n: int, length: int, vocab: int, seed: int):
        self.n, self.length, self.vocab, self.seed = n, length, vocab, seed

    def __len__(self):
        return self.n

    def ids(self, i):
        import torch

        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        return torch.randint(0, self.vocab, (self.length,), generator=g)

    def __getitem__(self, i):
        ids = self.ids(i)
        return {"input_ids": ids, "labels": ids.clone()}


def run_one(args) -> dict:
    torch = setup_torch(args.device)
    import transformers

    name, length = args.worker, args.length
    model_kwargs = QUICK_MODEL if args.quick else QWEN3_1_7B
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if name == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False)
    model = build_model(model_kwargs, args.device, dtype, args.seed, args.attn, train=True)
    backend = None
    if name == "ours":
        from trainers import apply_fused_head, fused_head_backend

        apply_fused_head(model, impl=args.impl)
        backend = fused_head_backend(model)
    weights_gib = torch.cuda.memory_allocated() / GiB if args.device == "cuda" else None

    steps = 1 + args.timed_steps
    rows = _Rows(steps * args.grad_accum, length, model_kwargs["vocab_size"], args.seed)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-bench-"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        seed=args.seed,
    )
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            sync(args.device)
            times.append(time.perf_counter())

    if name == "trl-sft":
        import trl
        from datasets import Dataset

        dataset = Dataset.from_dict({"input_ids": [rows.ids(i).tolist() for i in range(len(rows))]})
        config = trl.SFTConfig(**common, max_length=length, packing=False)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=load_tokenizer(),
                                 callbacks=[Clock()])
    else:
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common), train_dataset=rows,
                                       data_collator=transformers.default_data_collator, callbacks=[Clock()])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    timed = times[-1] - times[0]
    return {
        "config": name,
        "length": length,
        "tokens_per_s": args.timed_steps * args.grad_accum * length / timed,
        "step_s": timed / args.timed_steps,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if args.device == "cuda" else None,
        "weights_gib": weights_gib,
        "first_loss": float(losses[0]) if losses else None,
        "backend": backend,
        "error": None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def run_in_subprocess(args, name: str, length: int) -> dict:
    """Run one configuration in a fresh interpreter; a failure becomes a row with its error."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--length", str(length), "--result", result,
               "--device", args.device, "--grad-accum", str(args.grad_accum), "--timed-steps", str(args.timed_steps),
               "--impl", args.impl, "--attn", args.attn, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            return {"config": name, "length": length, "error": f"timed out after {args.worker_timeout} s"}
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(result):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return {"config": name, "length": length, "error": md_escape(" / ".join(tail))[-400:] or f"rc {proc.returncode}"}
        with open(result) as f:
            row = json.load(f)
        row["wall_s"] = wall
        return row


def render(rows: list, meta: dict) -> str:
    lines = [f"# `transformers.Trainer` SFT: the LM head four ways ({meta['model_desc']})", ""]
    lines += [f"- {k}: {v}" for k, v in (("date", meta["date"]), ("commit", meta["commit"]), ("device", meta["device"]))]
    lines += [f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(meta['versions'].items()))}",
              f"- command: `{meta['command']}`",
              f"- per run: batch 1, {meta['grad_accum']} micro-batches per optimizer step, gradient checkpointing, "
              f"{meta['dtype']}, AdamW; 1 warm-up + {meta['timed_steps']} timed optimizer steps; peak = "
              "`torch.cuda.max_memory_allocated` over the run (weights, gradients, AdamW state included)", ""]
    lines += ["| length | config | peak GiB | tokens/s | vs ours: peak | vs ours: tokens/s | first-step loss | note |",
              "|---|---|---|---|---|---|---|---|"]
    for length in sorted({r["length"] for r in rows}):
        group = [r for r in rows if r["length"] == length]
        ours = next((r for r in group if r["config"] == "ours" and not r.get("error")), None)
        for r in group:
            if r.get("error"):
                lines.append(f"| {length} | {r['config']} | - | - | - | - | - | {md_escape(r['error'])} |")
                continue
            rel_peak = rel_tps = "-"
            if ours is not None and r is not ours:
                if r.get("peak_gib") and ours.get("peak_gib"):
                    rel_peak = f"{r['peak_gib'] - ours['peak_gib']:+.2f} GiB"
                rel_tps = f"{r['tokens_per_s'] / ours['tokens_per_s']:.2f}x"
            note = f"backend {r['backend']}" if r.get("backend") else ""
            lines.append(f"| {length} | {r['config']} | {fmt(r.get('peak_gib'), '.2f')} | {fmt(r['tokens_per_s'], ',.0f')} "
                         f"| {rel_peak} | {rel_tps} | {fmt(r.get('first_loss'), '.4f')} | {note} |")
    lines += ["", "\"vs ours\": the configuration's peak minus ours, its tokens/s over ours (below 1.00x: slower than ours).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        row = run_one(args)
        with open(args.result, "w") as f:
            json.dump(row, f)
        return 0
    torch = setup_torch(args.device)
    model_kwargs = QUICK_MODEL if args.quick else QWEN3_1_7B
    meta = run_meta(args.commit, device_name(args.device), versions(VERSIONS), command_line(__file__, argv),
                    model_desc=model_desc(model_kwargs, args.quick, ""), grad_accum=args.grad_accum,
                    timed_steps=args.timed_steps, dtype="bf16" if args.device == "cuda" else "fp32")
    del torch
    rows = []
    for length in args.lengths:
        for name in args.configs:
            log(f"{name} at {length} tokens ...")
            row = run_in_subprocess(args, name, length)
            row.update(date=meta["date"], commit=meta["commit"], device=meta["device"])
            rows.append(row)
            if row.get("error"):
                log(f"  failed: {row['error']}")
            else:
                log(f"  peak {fmt(row.get('peak_gib'), '.2f')} GiB, {row['tokens_per_s']:,.0f} tokens/s, "
                    f"first loss {fmt(row.get('first_loss'), '.4f')} ({row['wall_s']:.0f} s)")
            paths = write_outputs(rows, meta, args, render)
    log(f"wrote {paths['json']} and {paths['md']}")
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
