"""Whole training steps: TRL 1.16's DPO / ORPO trainers against ours, side by side, in one process or under FSDP2.

One process (``python``): the "Whole training steps" table of docs/targets.md: a Qwen3-1.7B-shaped model
(random init, bf16), one preference pair per step (per_device_train_batch_size=1), gradient checkpointing, AdamW
(torch), a reference model copy (DPO: passed as ``ref_model``; ORPO: kept in memory but unused, as docs/targets.md's
"base" holds it in every row; ``--no-ref-copy`` drops it for ORPO), ``precompute_ref_log_probs=False``,
``report_to="none"``, logging every step, constant learning rate.

    python benchmarks/train_steps.py --commit $(git rev-parse --short HEAD)   # H200: ~3-4 min
    python benchmarks/train_steps.py --lengths 512+1536,1024+3072,2048+6144   # the full table (~5 min)
    python benchmarks/train_steps.py --quick                                   # tiny model on CPU, < 1 min

Several processes (``accelerate launch``, WORLD_SIZE > 1; its config chooses FSDP2 or DDP): the same rows, one
pair per process per step (the global batch is N pairs), e.g. the Qwen3-8B shape (``--model qwen3-8b``: 8.2B
parameters, head not tied) under FSDP2 on 2, 4 or 8 H200s (benchmarks/README.md: the GPU machine's commands;
2 H200s: 6 min for five trainers at three lengths, results/fsdp2-x2-summary.md), or the tiny model on 2 CPU
processes as a smoke test (< 1 min):

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 benchmarks/train_steps.py \\
        --model qwen3-8b --lengths 512+1536,2048+6144,4096+12288 --commit HASH
    accelerate launch --config_file examples/accelerate/fsdp2_cpu.yaml --num_processes 2 benchmarks/train_steps.py \\
        --quick --out /tmp/train-steps-smoke

Every process builds the model (and the DPO reference copy) whole on its own device (``cuda:LOCAL_RANK``; CPU
processes on the CPU, gloo) from the same seed; the trainer then shards it. With ``fsdp2.yaml`` accelerate puts
``fully_shard`` on every decoder layer, the input embedding, the final norm with the LM head, and the root, and
its ``mixed_precision: bf16`` upcasts the trained weights to fp32 (bf16 compute, fp32 gradients and AdamW
states); that policy's ``output_dtype`` also rounds the model's outputs to bf16, TRL's per-token log-probs
included (the fused trainers drop it, so ours stay fp32: docs/distributed.md). The DPO reference copy is passed as
``ref_model`` and sharded the way TRL does it: ``DPOTrainer.__init__`` (which FusedDPOTrainer runs unchanged)
calls ``trl.models.utils.prepare_fsdp``, one ``fully_shard`` over the whole reference model (eval mode, bf16,
not upcast, the plugin's ``reshard_after_forward``): 1/N of it per GPU at rest, all of it gathered on every GPU
for each reference forward. The ORPO rows hold no reference copy under FSDP (TRL's ORPOTrainer takes none; the
unused copy is docs/targets.md's one-GPU convention and would only add a model to every GPU). CPU processes:
accelerate 1.15 turns FSDP into DDP off accelerators; the shim of the CPU tests (``allow_fsdp_on_cpu`` in
tests/dist_scripts/train_trainer.py) switches it back.

Trainers (``--trainers``, comma-separated): ``trl-dpo`` (`trl.DPOTrainer`, its chunked head),
``fused-dpo`` (`trainers.FusedDPOTrainer`), ``trl-orpo`` (`trl.experimental.orpo.ORPOTrainer`, full
logits), ``fused-orpo`` (`trainers.orpo.FusedORPOTrainer`), and with several processes also the control
``trl-dpo-fp32out`` (`trl.DPOTrainer` with FSDP2's bf16 ``output_dtype`` dropped as our trainers drop it: how far
the DPO curve moves when only that rounding changes; under DDP, which rounds nothing, it is ``trl-dpo`` again).
Lengths (``--lengths``): ``P+C`` = prompt +
completion tokens of every sequence (chosen and rejected have the same length, so nothing is padded).
Models (``--model``): ``qwen3-1.7b`` (default), ``qwen3-8b``, ``tiny`` (``--quick``'s).

Data: random text made of words that are single tokens of the shipped tokenizer (``examples/tokenizer``,
372 tokens; the model's vocabulary is still 151936), so the trainers' own tokenisation gives exactly P
prompt and C completion tokens: TRL's DPO appends EOS to the completions, TRL's ORPO adds BOS to the prompt
and EOS to the completions, and the word counts allow for it. The lengths the trainers actually produced
are read back from their tokenised datasets and recorded (``prompt_tokens``, ``completion_tokens``). The
dataset has N x (warm-up + timed steps) pairs, dealt out by the trainer's seeded sampler (the same
permutation on every process, and for TRL's trainer and ours). ``max_length`` is P + C + 8 (nothing is
truncated). For each length, every trainer starts from the same random weights (seed) and the same data, so
the DPO (and ORPO) loss curves of TRL and ours can be compared step by step.

Measured per (trainer, length), each process on its own device, then gathered (in one process: as it is):
- ``step_ms``: median wall time of the timed steps (``--steps``, default 4) after ``--warmup`` (default 1)
  untimed steps, from ``on_step_begin`` to ``on_step_end`` of a TrainerCallback that synchronises its GPU at
  both ends (forward + backward + optimizer step; data loading and logging outside); a step lasts as long as
  its slowest process; ``step_ms_all`` all steps;
- ``tokens_per_s``: ``tokens_per_step`` ((prompt + completion) x 2 sequences x N pairs) / median step time;
- ``base_gib``: ``memory_allocated`` after the model (and reference copy) is built (before any sharding);
- ``peak_gib``: ``max_memory_allocated`` from then to the end of training: the total, model and reference
  included, as docs/targets.md reports it; ``setup_peak_gib`` the part before the first step (trainer set-up,
  FSDP's upcast and sharding), ``fwd_bwd_peak_gib`` the peak before each optimizer step, ``step_peak_gib``
  per-step peaks. Every memory figure is the largest over the processes (per GPU), ``*_ranks`` each one's;
- ``losses`` (and ``grad_norms``, ``metrics``: everything the trainer logged, averaged over the processes
  by the trainers) of every step; ``world_size``, ``distributed_type`` (accelerate's: NO, FSDP, MULTI_GPU,
  ...), ``fsdp_version``, ``mixed_precision``, ``train_dtype`` (of the trained weights).
Between configs everything is freed (trainer, models, gc, ``torch.cuda.empty_cache``); ``leftover_gib``
is what remained allocated after that. A failing config (OOM, anything) gives a row with ``error`` when
every process fails alike; a failure on one process only leaves the others waiting in a collective until
the launcher's time limit (NCCL's default timeout is 10 minutes). Every process runs the same configs in
the same order (their collectives must match); only process 0 logs and writes.

Outputs in ``--out`` (default ``benchmarks/results/``), rewritten after every config: ``NAME.json`` (a list of
rows) and ``NAME.md`` (tables like docs/targets.md, the docs/targets.md reference figures beside the one-process
Qwen3-1.7B TRL rows, ours against TRL at the same length with the checks, the loss curves side by side);
NAME is ``train-steps-latest`` (``--quick``: ``train-steps-quick``), with several processes
``train-steps-fsdp2-latest`` (``train-steps-fsdp2-quick``). The multi-process checks are the FSDP2 issue's:
DPO loss within 1% of TRL's at every step, ours no more memory per GPU than TRL's; ORPO running where TRL's
does not, or saving at least the memory that the one-process run of ``--one-gpu-results`` saved at that
length.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
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
from _common import GiB, MODELS, free_memory, load_tokenizer, log, md_escape, meta_lines  # noqa: E402
from _common import fmt as _fmt  # noqa: E402

TRAINERS = ("trl-dpo", "fused-dpo", "trl-orpo", "fused-orpo", "trl-dpo-fp32out")
#: The default ``--trainers`` of one process: the control only matters where FSDP2 rounds outputs.
ONE_PROCESS_TRAINERS = TRAINERS[:4]
LABELS = {
    "trl-dpo": "trl.DPOTrainer (its chunked head)",
    "trl-dpo-fp32out": "trl.DPOTrainer, FSDP2 outputs kept fp32 (control)",
    "fused-dpo": "FusedDPOTrainer (ours)",
    "trl-orpo": "trl.experimental ORPOTrainer (full logits)",
    "fused-orpo": "FusedORPOTrainer (ours)",
}
DEFAULT_LENGTHS = "512+1536,2048+6144"
QUICK_LENGTHS = "32+96,48+144"
DEFAULT_MODEL = "qwen3-1.7b"
QUICK_MODEL_NAME = "tiny"
#: docs/targets.md "Whole training steps" (the Qwen3-1.7B shape, one GPU): (trainer, P, C) -> (peak GiB, step ms, tokens/s)
TARGETS = {
    ("trl-dpo", 512, 1536): (16.7, 260, 15.8e3),
    ("trl-dpo", 1024, 3072): (17.1, 455, 18.0e3),
    ("trl-dpo", 2048, 6144): (18.2, 921, 17.8e3),
    ("trl-orpo", 512, 1536): (19.2, 258, 15.9e3),
    ("trl-orpo", 1024, 3072): (25.5, 388, 21.1e3),
    ("trl-orpo", 2048, 6144): (38.1, 799, 20.5e3),
}
TARGETS_MODEL = "qwen3-1.7b"
#: Several processes: ours within this relative distance of TRL's DPO loss at every step (the FSDP2 issue).
DPO_LOSS_RTOL = 0.01
#: The one-process run whose ORPO memory gap (TRL's peak - ours) the multi-process ORPO check asks for.
ONE_GPU_RESULTS = os.path.join(_common.RESULTS_DIR, "train-steps-latest.json")
#: The memory figures of a row that each process measures on its own device (gathered as the max over processes).
MEMORY_KEYS = ("base_gib", "setup_peak_gib", "fwd_bwd_peak_gib", "peak_gib", "peak_reserved_gib", "leftover_gib")
VERSIONS = ("torch", "transformers", "trl", "accelerate", "datasets", "triton")


# ---------------------------------------------------------------------------------------------------------------------
# Data


def algo_of(name: str) -> str:
    """``"dpo"`` or ``"orpo"``: the loss a trainer name trains with."""
    return "orpo" if "orpo" in name else "dpo"


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
    if algo_of(name) == "dpo":
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
# Processes


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process in its launch: ``rank`` of ``world`` processes, and the device it builds and measures on
    (``cuda:LOCAL_RANK`` or ``cpu`` when launched; ``cuda`` or ``cpu`` alone)."""

    rank: int
    world: int
    device: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def allow_fsdp_on_cpu() -> None:
    """accelerate's FSDP path on CPU processes, through the shim of the CPU tests (its docstring says why)."""
    sys.path.insert(0, os.path.join(_common.REPO, "tests", "dist_scripts"))
    from train_trainer import allow_fsdp_on_cpu as shim

    shim()


def start_ranks(kind: str) -> Ranks:
    """This process: alone (``python``), or one of the ``WORLD_SIZE`` processes of ``accelerate launch`` /
    ``torchrun``, whose process group accelerate starts here (NCCL on GPUs, gloo on CPU) for the trainers
    to reuse."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(0, 1, kind)
    cpu = kind == "cpu"
    if cpu:
        allow_fsdp_on_cpu()
    from accelerate import PartialState

    state = PartialState(cpu=cpu, backend="gloo" if cpu else None)
    return Ranks(state.process_index, state.num_processes, str(state.device))


def all_ranks(ranks: Ranks, obj) -> list:
    """``obj`` of every process, in rank order (a collective: every process calls it)."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def merge_ranks(rows: list[dict], warmup: int) -> dict:
    """The row of one config from every process's: process 0's (the trainers log losses and metrics averaged
    over the processes), each memory figure the largest over the processes (``*_ranks``: each one's), each step
    as long as its slowest process's, the tokens of all processes."""
    row = dict(rows[0])
    errors = [(rank, r["error"]) for rank, r in enumerate(rows) if r.get("error")]
    if len({error for _, error in errors}) > 1 or 0 < len(errors) < len(rows):
        row["error"] = "; ".join(f"rank {rank}: {error}" for rank, error in errors)
    elif errors:
        row["error"] = errors[0][1]  # every process failed alike
    for key in MEMORY_KEYS:
        if not any(key in r for r in rows):
            continue
        values = [r.get(key) for r in rows]
        known = [v for v in values if v is not None]
        row[key] = max(known) if known else None
        if len(rows) > 1:
            row[f"{key}_ranks"] = values
    if all(r.get("step_peak_gib") for r in rows):
        row["step_peak_gib"] = [max(step) for step in zip(*(r["step_peak_gib"] for r in rows))]
    if all(r.get("step_ms_all") for r in rows):
        row["step_ms_all"] = [max(step) for step in zip(*(r["step_ms_all"] for r in rows))]
        row["step_ms"] = statistics.median(row["step_ms_all"][warmup:])
        row["tokens_per_step"] = sum(r["tokens_per_step"] for r in rows)
        row["tokens_per_s"] = row["tokens_per_step"] / (row["step_ms"] / 1e3)
    row["models_freed"] = all(r.get("models_freed") for r in rows)
    return row


def main_log(ranks: Ranks):
    """``log`` on process 0; a no-op on the others (they run the same configs and would repeat every line)."""
    return log if ranks.main else (lambda msg: None)


# ---------------------------------------------------------------------------------------------------------------------
# One config


def make_timer(device: str):
    """A TrainerCallback timing each step (its device synchronised at both ends) and reading this process's peak
    memory (CUDA): up to the first step (set-up), before each optimizer step, and over each step."""
    import torch
    from transformers import TrainerCallback

    cuda = device.startswith("cuda")

    def peak():
        return torch.cuda.max_memory_allocated(device) / GiB if cuda else None

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.peaks, self.fwd_bwd_peaks = [], [], []
            self.setup_peak = None
            self._t0 = None

        def on_train_begin(self, args, state, control, **kwargs):
            # Everything since the model was built: the trainer's set-up and, under FSDP, the upcast and sharding.
            self.setup_peak = peak()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            # The AdamW step's own temporaries can top every head: record forward + backward apart.
            if cuda:
                _common.sync(device)
                self.fwd_bwd_peaks.append(peak())

        def on_step_begin(self, args, state, control, **kwargs):
            _common.sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _common.sync(device)
            self.times.append(time.perf_counter() - self._t0)
            self.peaks.append(peak())

    return StepTimer()


def orpo_ref_copy(args, ranks: Ranks) -> bool:
    """Whether the ORPO rows hold an unused reference copy: docs/targets.md's one-GPU convention, one process only."""
    return ranks.world == 1 and not args.no_ref_copy


def trainer_and_config(name: str, args, ranks: Ranks, P: int, C: int, out_dir: str):
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
        ddp_backend="gloo" if args.device == "cpu" and ranks.world > 1 else None,
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
    if name == "trl-dpo-fp32out":
        return trl_dpo_fp32_outputs(), trl.DPOConfig(**common, precompute_ref_log_probs=False)
    if name == "trl-orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig(**common)
    if name == "fused-orpo":
        from trainers.orpo import FusedORPOConfig, FusedORPOTrainer

        return FusedORPOTrainer, FusedORPOConfig(**common, lce_impl=args.impl)
    raise ValueError(name)


def trl_dpo_fp32_outputs():
    """TRL's DPOTrainer with one change: FSDP2's bf16 ``output_dtype`` dropped as our trainers drop it, so its
    per-token log-probs leave the model unrounded. The control of the loss curves: TRL against TRL with only
    that rounding changed shows how far a bf16-sized difference carries the trajectory."""
    import trl
    from trainers.fused_forward import keep_fused_outputs_fp32

    class DPOTrainerFp32Outputs(trl.DPOTrainer):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            keep_fused_outputs_fp32(self.accelerator)

    return DPOTrainerFp32Outputs


def accelerate_fields(accelerator) -> dict:
    """How accelerate runs the trainer: ``distributed_type`` (NO, MULTI_GPU, FSDP, ...), ``fsdp_version``,
    ``mixed_precision``."""
    fsdp = accelerator.distributed_type.value == "FSDP"
    return {
        "distributed_type": accelerator.distributed_type.value,
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if fsdp else None,
        "mixed_precision": accelerator.mixed_precision,
    }


def run_config(name: str, P: int, C: int, args, ranks: Ranks, tok, words, model_kwargs, refs: list) -> dict:
    """This process's figures of one (trainer, length) config; ``refs`` gets weak references to the models (to
    check they are freed)."""
    import torch

    cuda, device = ranks.cuda, ranks.device
    dtype = getattr(torch, args.dtype)
    row: dict = {}
    dpo = algo_of(name) == "dpo"
    # word counts: DPO adds EOS to completions; ORPO adds BOS to the prompt and EOS to completions
    prompt_words = P if dpo else P - 1
    completion_words = C - 1
    pairs = ranks.world * (args.warmup + args.steps)  # one pair per process per step
    dataset = make_dataset(tok, words, pairs, prompt_words, completion_words, args.seed + P + C)

    _common.sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    model = _common.build_model(model_kwargs, device, dtype, args.seed, args.attn, train=True)
    ref = copy.deepcopy(model) if (dpo or orpo_ref_copy(args, ranks)) else None
    if ref is not None:
        ref.eval()
    refs.extend(weakref.ref(m) for m in (model, ref) if m is not None)
    _common.sync(device)
    row["build_s"] = time.perf_counter() - t_build
    row["model_gib"] = model_bytes(model) / GiB
    row["ref_copy"] = ref is not None
    row["params"] = sum(p.numel() for p in model.parameters())
    row["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    row["base_gib"] = torch.cuda.memory_allocated(device) / GiB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    out_dir = tempfile.mkdtemp(prefix=f"train-steps-{name}-")
    try:
        cls, config = trainer_and_config(name, args, ranks, P, C, out_dir)
        timer = make_timer(device)
        kwargs = dict(model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[timer])
        if dpo:
            kwargs["ref_model"] = ref  # under FSDP, TRL's __init__ shards it (prepare_fsdp)
        t_init = time.perf_counter()
        trainer = cls(**kwargs)
        row["init_s"] = time.perf_counter() - t_init
        row.update(accelerate_fields(trainer.accelerator))
        p, c, pair_tokens = tokenized_lengths(name, trainer.train_dataset)
        row.update(prompt_tokens=p, completion_tokens=c, tokens_per_step=pair_tokens)
        if (p, c) != (P, C) and ranks.main:
            log(f"  WARNING: {name} tokenised to {p}+{c}, not {P}+{C}")
        if hasattr(trainer, "lce_backend"):
            try:
                row["backend"] = trainer.lce_backend
            except Exception as exc:  # informative only
                row["backend"] = f"? ({exc})"
        t_train = time.perf_counter()
        trainer.train()
        row["train_s"] = time.perf_counter() - t_train

        if not timer.times[args.warmup:]:
            raise RuntimeError(f"no timed steps ({len(timer.times)} steps ran)")
        row["step_ms_all"] = [t * 1e3 for t in timer.times]
        if cuda:
            row["setup_peak_gib"] = timer.setup_peak
            row["step_peak_gib"] = timer.peaks
            row["fwd_bwd_peak_gib"] = max(timer.fwd_bwd_peaks) if timer.fwd_bwd_peaks else None
            row["peak_gib"] = max([timer.setup_peak] + timer.peaks)
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
        row["train_dtype"] = str(next(trainer.model.parameters()).dtype).replace("torch.", "")
        logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        row["losses"] = [e["loss"] for e in logs]
        row["grad_norms"] = [e.get("grad_norm") for e in logs]
        row["metrics"] = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in logs]
        row["steps_run"] = trainer.state.global_step
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


def run_row(name: str, P: int, C: int, args, ranks: Ranks, tok, words, model_kwargs, base: dict) -> dict:
    """This process's row of one config (``base`` and the figures, or an ``error``), after freeing everything."""
    row = {**base, "error": None}
    t0 = time.perf_counter()
    refs: list = []
    try:
        row.update(run_config(name, P, C, args, ranks, tok, words, model_kwargs, refs))
    except Exception as exc:  # OOM or anything else: an error row, the run goes on
        row["error"] = ("OOM: " if _common.is_oom(exc) else "") + f"{type(exc).__name__}: {str(exc)[:500]}"
        traceback.print_exc()
        del exc
    row["wall_s"] = time.perf_counter() - t0
    row["leftover_gib"] = free_memory(args.device)
    row["models_freed"] = all(r() is None for r in refs)
    return row


def log_row(row: dict, say) -> None:
    """The summary lines of a finished (merged) row."""
    if not row["models_freed"]:
        say("  note: a model of this config is still referenced after freeing (memory of later rows may include it)")
    if row["error"]:
        say(f"  ERROR {row['error'][:300]}")
    else:
        say(f"  step {row['step_ms']:.0f} ms (all {', '.join(f'{t:.0f}' for t in row['step_ms_all'])}), "
            f"{row['tokens_per_s']:,.0f} tokens/s, tokens {row['prompt_tokens']}+{row['completion_tokens']}, "
            f"peak {_fmt(row.get('peak_gib'), '.2f', ' GiB')}"
            + (f" (ranks {', '.join(_fmt(x, '.2f') for x in row['peak_gib_ranks'])})" if row.get("peak_gib_ranks") else "")
            + f", base {_fmt(row.get('base_gib'), '.2f', ' GiB')}, losses {[round(x, 4) for x in row['losses']]}"
            + (f", backend {row['backend']}" if row.get("backend") else "")
            + f"; {row['wall_s']:.1f}s wall")
    if row["leftover_gib"] is not None and row["leftover_gib"] > 0.05:
        say(f"  note: {row['leftover_gib']:.2f} GiB still allocated after freeing")


# ---------------------------------------------------------------------------------------------------------------------
# Output


def _tok(x):
    return "-" if x is None else f"{x / 1e3:.1f}k"


def _find(rows, trainer, P, C):
    """The row of ``trainer`` at ``P+C`` (failed or not), or None."""
    for r in rows:
        if r["trainer"] == trainer and r["P"] == P and r["C"] == C:
            return r
    return None


def _ok(row) -> bool:
    return row is not None and not row.get("error")


def _rel(ours: float, theirs: float) -> float:
    if not theirs:
        return 0.0 if ours == theirs else float("inf")
    return abs(ours - theirs) / abs(theirs)


def _pct(rel: float) -> str:
    """A relative difference in percent; "> 1000%" beyond (a loss of 0 on the other side gives any size)."""
    return "> 1000%" if rel > 10 else f"{rel:.2%}"


def _vs(ours, theirs) -> str:
    """``ours / theirs GiB (difference, ratio)``, or "-" where either is missing."""
    if ours is None or theirs is None:
        return "-"
    return f"{ours:.1f} / {theirs:.1f} GiB ({ours - theirs:+.2f}, {ours / theirs:.2f}x)"


def one_gpu_orpo_gaps(path: str | None) -> dict:
    """What the multi-process ORPO check compares with: ``{"source": ..., "gaps": {"P+C": GiB}}``, TRL ORPO's peak
    minus ours at each length of the one-process run ``path`` (None: ONE_GPU_RESULTS where it exists)."""
    path = path or (ONE_GPU_RESULTS if os.path.exists(ONE_GPU_RESULTS) else None)
    if path is None:
        return {"source": None, "gaps": {}}
    with open(path) as f:
        rows = json.load(f)
    gaps = {}
    for P, C in sorted({(r["P"], r["C"]) for r in rows}):
        ours, theirs = _find(rows, "fused-orpo", P, C), _find(rows, "trl-orpo", P, C)
        if _ok(ours) and _ok(theirs) and ours.get("peak_gib") is not None and theirs.get("peak_gib") is not None:
            gaps[f"{P}+{C}"] = theirs["peak_gib"] - ours["peak_gib"]
    commit = next((r.get("commit") for r in rows), None)
    params = next((r.get("params") for r in rows if r.get("params")), None)
    return {"source": f"{os.path.relpath(path, _common.REPO)} (commit {commit})", "gaps": gaps, "params": params}


def legend(world: int) -> str:
    """What the main table's figures are."""
    if world == 1:
        return ("Peak = `max_memory_allocated` from model creation to the end of training (model and reference copy "
                "included, as docs/targets.md); fwd+bwd = the same peak read before each optimizer step (AdamW's own "
                "temporaries can exceed the head's); base = allocated after the model (and reference copy) is built. "
                "Step = median of the timed steps (forward + backward + AdamW step, `cuda.synchronize` at both ends). "
                "tokens/s = 2 x (prompt + completion) / step. docs/targets.md = the reference figures of its whole-step table.")
    return (f"Per GPU = the largest of the {world} processes' figures, each on its own GPU (per rank: each one's peak). "
            "Peak = `max_memory_allocated` from model creation to the end of training: the model and the DPO "
            "reference copy, built whole on every GPU and then sharded (accelerate's fp32 upcast of the trained "
            "weights included), and the steps; fwd+bwd = the same peak read before each optimizer step; base = "
            "allocated once the model (and reference copy) is built, before sharding. Step = median over the timed "
            "steps of the slowest process's step (forward + backward + AdamW step, every process synchronising its "
            f"GPU at both ends). tokens/s = {world} pairs x 2 x (prompt + completion) / step: the whole global batch.")


def rows_table(rows: list, meta: dict) -> list[str]:
    """One line per (trainer, length): memory, speed, losses, error."""
    world = meta.get("world_size", 1)
    targets = TARGETS if meta.get("model") == TARGETS_MODEL else {}

    def length(r):
        s = f"{r['P']}+{r['C']}"
        if r.get("prompt_tokens") is not None and (r["prompt_tokens"], r["completion_tokens"]) != (r["P"], r["C"]):
            s += f" (got {r['prompt_tokens']}+{r['completion_tokens']})"
        return s

    def target(r):
        tgt = targets.get((r["trainer"], r["P"], r["C"]))
        return f"{tgt[0]} GiB / {tgt[1]} ms / {tgt[2] / 1e3:.1f}k" if tgt else ""

    columns = [
        ("trainer", lambda r: LABELS.get(r["trainer"], r["trainer"])),
        ("prompt+completion", length),
        ("peak per GPU" if world > 1 else "peak", lambda r: _fmt(r.get("peak_gib"), ".1f", " GiB")),
    ]
    if world > 1:
        columns.append(("per rank", lambda r: ", ".join(_fmt(x, ".1f") for x in r.get("peak_gib_ranks") or [])))
    columns += [
        ("fwd+bwd", lambda r: _fmt(r.get("fwd_bwd_peak_gib"), ".2f", " GiB")),
        ("base", lambda r: _fmt(r.get("base_gib"), ".1f", " GiB")),
        ("step", lambda r: _fmt(r.get("step_ms"), ".0f", " ms")),
        ("tokens/s", lambda r: _tok(r.get("tokens_per_s"))),
    ]
    if world == 1:
        columns.append(("docs/targets.md (peak / step / tokens/s)", target))
    columns += [
        ("losses", lambda r: ", ".join(f"{x:.4f}" for x in r.get("losses") or [])),
        ("error", lambda r: md_escape(r.get("error") or "")[:160]),
    ]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return lines


def one_process_checks(algo: str, ours: dict, theirs, rows: list, meta: dict) -> list[str]:
    """docs/targets.md's targets: DPO no slower and no more memory than TRL's; ORPO at least TRL ORPO's speed, its peak
    within 1 GiB of TRL DPO's (less the reference copy when the ORPO rows hold none)."""
    checks = []
    if _ok(theirs):
        checks.append(f"speed {'ok' if ours['tokens_per_s'] >= theirs['tokens_per_s'] else 'FAIL'}")
    if ours.get("peak_gib") is None:
        return checks
    if algo == "dpo" and _ok(theirs):
        checks.append(f"memory {'ok' if ours['peak_gib'] <= theirs['peak_gib'] else 'FAIL'}")
    if algo == "orpo":
        dpo = _find(rows, "trl-dpo", ours["P"], ours["C"])
        targets = TARGETS if meta.get("model") == TARGETS_MODEL else {}
        dpo_peak = dpo["peak_gib"] if _ok(dpo) else (targets.get(("trl-dpo", ours["P"], ours["C"])) or (None,))[0]
        if dpo_peak is not None:
            limit = dpo_peak + 1.0 - (0.0 if ours.get("ref_copy") else ours["model_gib"])
            checks.append(f"memory {'ok' if ours['peak_gib'] <= limit else 'FAIL'} (limit {limit:.1f} GiB)")
    return checks


def multi_process_checks(algo: str, ours: dict, theirs, meta: dict) -> list[str]:
    """The FSDP2 issue's criteria: DPO within 1% of TRL's loss at every step; no more memory per GPU than TRL's;
    ORPO running where TRL's runs out of memory, or saving at least the one-process run's memory gap."""
    if algo == "orpo" and theirs is not None and not _ok(theirs) and "OOM: " in theirs["error"]:
        return ["fits where TRL's does not: ok"]
    if not _ok(theirs):
        return []
    checks = []
    if algo == "dpo" and ours["losses"] and theirs["losses"]:
        worst = max(_rel(a, b) for a, b in zip(ours["losses"], theirs["losses"]))
        checks.append(f"loss {'ok' if worst <= DPO_LOSS_RTOL else 'FAIL'} (max rel {_pct(worst)})")
    if ours.get("peak_gib") is None or theirs.get("peak_gib") is None:
        return checks
    extra = (ours["peak_gib"] - theirs["peak_gib"]) * 1024
    checks.append(f"memory {'ok' if extra <= 0 else 'FAIL'} ({extra:+.1f} MiB)")
    if algo == "orpo":
        gap = theirs["peak_gib"] - ours["peak_gib"]
        one_gpu = meta.get("one_gpu", {}).get("gaps", {}).get(f"{ours['P']}+{ours['C']}")
        if one_gpu is None:
            checks.append(f"gap: no one-process figure at this length (saves {gap:.2f} GiB)")
        else:
            # Only like for like: the one-process figures may come from another model (the default file holds
            # the Qwen3-1.7B shape), and then the comparison is shown without a verdict.
            same_model = meta["one_gpu"].get("params") == ours.get("params")
            verdict = ("ok" if gap >= one_gpu else "FAIL") if same_model else "not comparable: another model"
            checks.append(f"gap {verdict} (saves {gap:.2f} GiB, one process saved {one_gpu:.2f})")
    return checks


def comparison(rows: list, meta: dict) -> list[str]:
    """Ours against TRL at each length: peaks, speeds, loss differences, checks."""
    world = meta.get("world_size", 1)
    if world == 1:
        criteria = ("DPO target: peak and tokens/s no worse than TRL's. ORPO target: peak within 1 GiB of "
                    "trl.DPOTrainer's peak at that length (this run's; minus the reference model when the ORPO rows "
                    "hold no reference copy) and at least TRL ORPO's tokens/s.")
    else:
        source = meta.get("one_gpu", {}).get("source") or "none found"
        criteria = ("Checks (the FSDP2 issue's): memory = ours no more memory per GPU than TRL's; loss = DPO loss "
                    f"within {DPO_LOSS_RTOL:.0%} of TRL's at every step; ORPO running where TRL's runs out of memory, "
                    "or gap = saving at least the memory (TRL's peak - ours) that one process saved at that length "
                    f"(one-process run: {source}). Speed is shown, not checked.")
    lines = [
        "## Ours against TRL at the same length",
        "",
        criteria + " Loss diff = the largest |ours - TRL| (rel: / |TRL|) over the steps (same weights, same data; "
        "step 1 of DPO is log 2, which FSDP2's bf16 outputs round to 0.6914 for TRL).",
        "",
        "| pair | prompt+completion | peak ours / TRL | fwd+bwd ours / TRL | speed ours / TRL | loss diff (max abs) "
        "| loss diff (max rel) | step 1: loss rel, grad-norm rel | checks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for P, C in sorted({(r["P"], r["C"]) for r in rows}):
        for algo in ("dpo", "orpo"):
            ours, theirs = _find(rows, f"fused-{algo}", P, C), _find(rows, f"trl-{algo}", P, C)
            if ours is None:
                continue
            peak_s = fwd_bwd_s = speed_s = abs_s = rel_s = first_s = "-"
            if not _ok(ours):
                checks = ["FAIL: ours did not run"]
            else:
                if _ok(theirs):
                    peak_s = _vs(ours.get("peak_gib"), theirs.get("peak_gib"))
                    fwd_bwd_s = _vs(ours.get("fwd_bwd_peak_gib"), theirs.get("fwd_bwd_peak_gib"))
                    speed_s = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
                    steps = list(zip(ours["losses"], theirs["losses"]))
                    if steps:
                        abs_s = f"{max(abs(a - b) for a, b in steps):.2e}"
                        rel_s = _pct(max(_rel(a, b) for a, b in steps))
                        first_s = first_step(ours, theirs)
                elif theirs is not None:
                    peak_s = f"{_fmt(ours.get('peak_gib'), '.1f', ' GiB')} / TRL failed"
                checks = (multi_process_checks(algo, ours, theirs, meta) if world > 1
                          else one_process_checks(algo, ours, theirs, rows, meta))
            lines.append(f"| {algo.upper()} | {P}+{C} | {peak_s} | {fwd_bwd_s} | {speed_s} | {abs_s} | {rel_s} "
                         f"| {first_s} | {', '.join(checks) or '-'} |")
        control = _find(rows, "trl-dpo-fp32out", P, C)
        for label, one, other in (("control: TRL fp32 outputs / TRL", control, _find(rows, "trl-dpo", P, C)),
                                  ("ours / control", _find(rows, "fused-dpo", P, C), control)):
            steps = list(zip(one["losses"], other["losses"])) if _ok(one) and _ok(other) else []
            if steps:
                lines.append(f"| DPO {label} | {P}+{C} | {_vs(one.get('peak_gib'), other.get('peak_gib'))} "
                             f"| {_vs(one.get('fwd_bwd_peak_gib'), other.get('fwd_bwd_peak_gib'))} "
                             f"| {one['tokens_per_s'] / other['tokens_per_s']:.2f}x "
                             f"| {max(abs(a - b) for a, b in steps):.2e} | {_pct(max(_rel(a, b) for a, b in steps))} "
                             f"| {first_step(one, other)} | - |")
    return lines


def first_step(ours: dict, theirs: dict) -> str:
    """Loss and gradient norm of step 1, the one step both trainers take from the same weights: ``"rel, rel"``."""
    norms = (ours.get("grad_norms") or [None])[0], (theirs.get("grad_norms") or [None])[0]
    grad = "-" if None in norms else _pct(_rel(*norms))
    return f"{_pct(_rel(ours['losses'][0], theirs['losses'][0]))}, {grad}"


def loss_curves(rows: list) -> list[str]:
    """Per length, TRL's and our losses step by step, side by side, with their relative difference."""
    lines = ["## Loss curves", "",
             "Logged loss of every step (warm-up included), TRL's and ours from the same weights on the same data; "
             "rel = |ours - TRL| / |TRL|. The control (where run): TRL's DPOTrainer against itself with FSDP2's bf16 "
             "output rounding dropped, nothing else changed.", ""]
    for P, C in sorted({(r["P"], r["C"]) for r in rows}):
        curves = [(algo.upper(), _find(rows, f"trl-{algo}", P, C), _find(rows, f"fused-{algo}", P, C))
                  for algo in ("dpo", "orpo")]
        curves.insert(1, ("control", _find(rows, "trl-dpo", P, C), _find(rows, "trl-dpo-fp32out", P, C)))
        curves = [(algo, t, o) for algo, t, o in curves if _ok(t) and _ok(o)]
        if not curves:
            continue
        heads = [("TRL DPO | TRL DPO, fp32 outputs" if a == "control" else f"TRL {a} | ours {a}") for a, _, _ in curves]
        lines += [f"{P}+{C}:", "", "| step | " + " | ".join(f"{h} | rel" for h in heads) + " |",
                  "|---|" + "---|---|---|" * len(curves)]
        for i in range(max(max(len(t["losses"]), len(o["losses"])) for _, t, o in curves)):
            cells = []
            for _, t, o in curves:
                a = t["losses"][i] if i < len(t["losses"]) else None
                b = o["losses"][i] if i < len(o["losses"]) else None
                rel = _rel(b, a) if a is not None and b is not None else None
                cells += [_fmt(a, ".4f"), _fmt(b, ".4f"), "-" if rel is None else _pct(rel)]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_markdown(rows: list, meta: dict) -> str:
    world = meta.get("world_size", 1)
    lines = [
        "# Whole training steps: TRL 1.16 trainers against ours" + (f", {world} processes" if world > 1 else ""),
        "",
        *meta_lines(meta),  # date, commit, device, versions, command, model
        f"- {meta['setup']}",
    ]
    if meta.get("launch"):
        lines.append(f"- launch: {meta['launch']}")
    lines += ["", legend(world), "", *rows_table(rows, meta), "", *comparison(rows, meta), "", *loss_curves(rows)]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _common.doc_parser(__doc__)
    p.add_argument("--trainers", help=f"comma-separated subset of {list(TRAINERS)} (default all; one process: "
                   f"{list(ONE_PROCESS_TRAINERS)})")
    p.add_argument("--lengths", help=f"comma-separated PROMPT+COMPLETION token lengths (default {DEFAULT_LENGTHS}; "
                   f"with --quick {QUICK_LENGTHS}); docs/targets.md also has 1024+3072")
    p.add_argument("--model", choices=sorted(MODELS),
                   help=f"model shape, random init (default {DEFAULT_MODEL}; {QUICK_MODEL_NAME} with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 4; 2 with --quick)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate, constant (default 1e-5)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO / ORPO beta (default 0.1)")
    p.add_argument("--impl", default="auto", help="lce_impl of our trainers (default auto)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="model dtype (default bfloat16; float32 on CPU; bf16=True in the trainer config when bfloat16)")
    p.add_argument("--no-ref-copy", action="store_true",
                   help="ORPO rows: do not keep an (unused) reference copy in memory (docs/targets.md's rows keep one; "
                        "never kept with several processes)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--one-gpu-results", metavar="JSON",
                   help="several processes: the one-process run whose ORPO memory gap (TRL's peak - ours) the ORPO "
                        "check asks for (default benchmarks/results/train-steps-latest.json where it exists)")
    _common.add_run_args(
        p, quick_help=f"tiny Qwen3-shaped model ({MODELS[QUICK_MODEL_NAME][1]['num_hidden_layers']} layers, width "
                      f"{MODELS[QUICK_MODEL_NAME][1]['hidden_size']}, vocab {MODELS[QUICK_MODEL_NAME][1]['vocab_size']}), "
                      f"lengths {QUICK_LENGTHS}, 1 + 2 steps, on CPU unless --device cuda: a smoke test",
        name_help="output file stem (default train-steps-latest; train-steps-quick with --quick; "
                  "train-steps-fsdp2-* with several processes)")
    return p


def check_args(args) -> tuple[list[str], list[tuple[int, int]]]:
    """The trainers and lengths asked for; fills the defaults of ``--model`` and ``--steps``; exits on bad input
    before any work."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    default = ",".join(TRAINERS if several else ONE_PROCESS_TRAINERS)
    trainers = [t.strip() for t in (args.trainers or default).split(",") if t.strip()]
    bad = [t for t in trainers if t not in TRAINERS]
    if bad:
        raise SystemExit(f"unknown trainers {bad}; choose from {list(TRAINERS)}")
    lengths = parse_lengths(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))
    if args.quick and args.model not in (None, QUICK_MODEL_NAME):
        raise SystemExit(f"--quick runs the {QUICK_MODEL_NAME} model; drop --model {args.model} or --quick")
    args.model = args.model or (QUICK_MODEL_NAME if args.quick else DEFAULT_MODEL)
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.one_gpu_results and not os.path.isfile(args.one_gpu_results):
        raise SystemExit(f"--one-gpu-results {args.one_gpu_results}: no such file")
    return trainers, lengths


def setup_line(args, ranks: Ranks) -> str:
    """The run's set-up, one markdown bullet."""
    batch = "1 pair" if ranks.world == 1 else f"1 pair per process ({ranks.world} pairs per step)"
    dpo_ref = "passed as ref_model" + (" (sharded by TRL's DPOTrainer: prepare_fsdp, one fully_shard unit)"
                                       if ranks.world > 1 else "")
    orpo_ref = ("kept in memory, unused" if orpo_ref_copy(args, ranks)
                else "none" + (" (TRL's ORPOTrainer takes none)" if ranks.world > 1 else ""))
    return (f"batch {batch}, gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, "
            f"AdamW (adamw_torch) lr {args.lr:g} constant, beta {args.beta:g}, {args.warmup} warm-up + "
            f"{args.steps} timed steps, seed {args.seed} (weights, data, sampler); reference copy: DPO {dpo_ref}, "
            f"ORPO {orpo_ref}; lce_impl {args.impl}")


def launch_line(ranks: Ranks, row: dict) -> str:
    """How the processes ran, from a row's accelerate fields."""
    kind = row["distributed_type"] + (f" (fsdp_version {row['fsdp_version']})" if row.get("fsdp_version") else "")
    return f"{ranks.world} processes, accelerate {kind}, mixed precision {row['mixed_precision']}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    trainers, lengths = check_args(args)
    _common.resolve_device_dtype(args)
    torch = _common.setup_torch(args.device)
    ranks = start_ranks(args.device)
    say = main_log(ranks)
    stem = "train-steps-fsdp2" if ranks.world > 1 else "train-steps"
    args.name = args.name or f"{stem}-{'quick' if args.quick else 'latest'}"

    title, model_kwargs = MODELS[args.model]
    device = _common.device_name(args.device)
    meta = _common.run_meta(
        args.commit, device if ranks.world == 1 else f"{ranks.world} x {device}", _common.versions(VERSIONS),
        _common.command_line(__file__, argv),
        model_desc=_common.model_desc(model_kwargs, args.quick, f", random init, {args.dtype}, attn {args.attn}"),
        setup=setup_line(args, ranks), model=args.model, world_size=ranks.world,
    )
    if ranks.world > 1:
        meta["one_gpu"] = one_gpu_orpo_gaps(args.one_gpu_results)
    base = {**_common.row_meta(meta), "world_size": ranks.world}
    say(f"device {meta['device']}; versions {meta['versions']}")
    say(f"{title} model; trainers {trainers}; lengths {['%d+%d' % pc for pc in lengths]}; {args.warmup}+{args.steps} "
        f"steps; {ranks.world} process(es); out {args.out}/{args.name}.{{json,md}}")

    tok = load_tokenizer()
    words = single_token_words(tok)
    rows = []
    t_all = time.perf_counter()
    for P, C in lengths:
        for name in trainers:
            say(f"{name} {P}+{C} ...")
            row = run_row(name, P, C, args, ranks, tok, words, model_kwargs,
                          {"trainer": name, "label": LABELS[name], "P": P, "C": C, **base})
            row = merge_ranks(all_ranks(ranks, row), args.warmup)
            rows.append(row)
            if ranks.world > 1 and "launch" not in meta and row.get("distributed_type"):
                meta["launch"] = launch_line(ranks, row)
            log_row(row, say)
            if ranks.main:
                _common.write_outputs(rows, meta, args, render_markdown)
    if ranks.main:
        paths = _common.write_outputs(rows, meta, args, render_markdown)
        log(f"done in {time.perf_counter() - t_all:.0f}s; wrote {paths['json']} and {paths['md']}")
        print(render_markdown(rows, meta), flush=True)
    if ranks.world > 1:
        torch.distributed.destroy_process_group()
    return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
