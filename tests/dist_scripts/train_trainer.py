"""A few training steps of FusedDPOTrainer / FusedSFTTrainer on a tiny random model, saved for comparison.

Run it plainly (one process: the reference) or under ``accelerate launch`` / ``torchrun`` (DDP,
FSDP2, ZeRO-3): the trainer code is the same, only the launcher and its config differ. Rank 0 writes
``--out`` (a ``torch.save`` dict, one entry per trainer): the per-step logs, the initial and final parameters (full tensors,
gathered from FSDP2 / ZeRO-3 shards), the world size, how accelerate wrapped the model, and the type of
the LM head weight that the fused head handed to the core (plain tensor or DTensor).

Data order is sequential, so a step sees the same global batch in every setup: with ``P`` processes of
``--batch`` examples each, process ``p`` takes examples ``[p * batch, (p + 1) * batch)`` of the global
batch; the reference runs one process with ``--batch P * batch``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def full_params(model) -> dict:
    """``{name: full fp32 CPU tensor}`` of the trainable parameters, whatever shards them (all ranks must call)."""
    out = {}
    ds_params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if ds_params:  # DeepSpeed ZeRO-3: gather every partitioned parameter for the copy
        import deepspeed

        with deepspeed.zero.GatheredParameters(ds_params, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.detach()
        if type(tensor).__name__ == "DTensor":  # FSDP2 (fully_shard) keeps sharded DTensor parameters
            tensor = tensor.full_tensor()
        out[name] = tensor.float().cpu().clone()
    return out


def output_dtype_recorder(seen: set):
    """A `TrainerCallback` recording the dtype of the per-token log-probs the wrapped policy returns.

    Its forward hook goes on the model the trainer trains (after accelerate wrapped it), after any hook of
    the wrapper's, so it sees what the trainer's loss sees: FSDP2 casts a wrapped module's outputs to its
    mixed-precision ``output_dtype``.
    """
    from transformers import TrainerCallback

    def record(module, inputs, output):
        log_probs = getattr(output, "log_probs", None)
        if isinstance(log_probs, torch.Tensor):
            seen.add(str(log_probs.dtype).replace("torch.", ""))

    class _Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_hook(record)

    return _Callback()


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP path run on CPU processes (gloo), for CI without GPUs.

    accelerate 1.15 turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for accelerator
    devices; CPU processes stay ``MULTI_CPU`` and the model would be wrapped in plain DDP. FSDP2 itself
    (``fully_shard`` over a CPU mesh, gloo collectives) works on CPU, so this shim switches the state to
    FSDP after accelerate built it; everything after that, ``fsdp2_prepare_model`` (the wrapping), the
    trainer and the fused head, is the unchanged code path of a GPU run.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_cpu_fsdp_shim", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # what accelerate's init does for an FSDP state
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does at the end of its own init: later AcceleratorState() calls re-read it.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._cpu_fsdp_shim = True
    AcceleratorState.__init__ = __init__


def add_run_args(parser: argparse.ArgumentParser, grad_accum: int) -> None:
    """The arguments both dist scripts take: model kind, batch, accumulation, where to run, output file."""
    parser.add_argument("--kind", default="qwen3", help="a tests/conftest.py tiny_causal_lm kind")
    parser.add_argument("--batch", type=int, required=True, help="per-device batch size")
    parser.add_argument("--grad-accum", type=int, default=grad_accum)
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (ZeRO-3); default CPU")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config (JSON path), passed to the trainer args")
    parser.add_argument("--out", required=True)


def placement_args(args) -> dict:
    """TrainingArguments for where the run goes: CPU (gloo across processes) or the GPU, DeepSpeed if given."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return dict(use_cpu=not args.cuda, ddp_backend="gloo" if not args.cuda and world > 1 else None,
                **({"deepspeed": args.deepspeed} if args.deepspeed else {}))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainers", default="dpo", help="comma-separated, run in turn: dpo, sft")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--precompute-ref", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TrainingArguments(bf16=True))")
    add_run_args(parser, grad_accum=1)
    args = parser.parse_args(argv)

    from conftest import GOOD, BAD, PROMPTS, TOKENIZER_DIR, MetricsRecorder, base_args, tiny_causal_lm
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trainers import FusedDPOConfig, FusedDPOTrainer, FusedSFTConfig, FusedSFTTrainer

    if not args.cuda:
        allow_fsdp_on_cpu()
    import align_losses.core

    # Record what the fused head hands the core as the LM head weight (plain tensor, or a DTensor shard).
    head_types = []
    local_head = align_losses.core._local_head

    def recording_local_head(weight, bias, process_group):
        head_types.append(type(weight).__name__)
        return local_head(weight, bias, process_group)

    align_losses.core._local_head = recording_local_head

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    results = {}
    for name in args.trainers.split(","):
        head_types.clear()
        overrides = dict(
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps,
            optim=args.optim,
            learning_rate=args.lr,
            train_sampling_strategy="sequential",
            max_length=64,
            **placement_args(args),
        )
        if args.bf16:
            overrides["bf16"] = True
        common = base_args(Path(args.out).parent / f"trainer_out_{name}", **overrides)
        rec = MetricsRecorder()
        dtypes: set = set()
        callbacks = [rec.callback, output_dtype_recorder(dtypes)]
        model = tiny_causal_lm(args.kind)
        before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        if name == "dpo":
            dataset = Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})
            ref_model = None if args.precompute_ref else tiny_causal_lm(args.kind)
            trainer = FusedDPOTrainer(
                model=model, ref_model=ref_model, train_dataset=dataset, processing_class=tokenizer,
                callbacks=callbacks,
                args=FusedDPOConfig(**common, beta=0.5, precompute_ref_log_probs=args.precompute_ref),
            )
        elif name == "sft":
            dataset = Dataset.from_dict({"prompt": PROMPTS, "completion": GOOD})
            trainer = FusedSFTTrainer(
                model=model, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
                args=FusedSFTConfig(**common),
            )
        else:
            raise ValueError(f"unknown trainer {name!r}")
        trainer.train()
        accelerator = trainer.accelerator
        results[name] = {
            "logs": rec.logs,
            "before": before,
            "after": full_params(trainer.model),
            "world_size": accelerator.num_processes,
            "is_fsdp2": bool(getattr(accelerator, "is_fsdp2", False)),
            "is_deepspeed": trainer.is_deepspeed_enabled,
            "model_class": type(trainer.model_wrapped).__name__,
            "head_weight_types_seen": sorted(set(head_types)),
            "log_prob_dtypes_seen": sorted(dtypes),
        }
        accelerator.wait_for_everyone()
    save_and_exit(results, args.out)


def save_and_exit(results: dict, out: str) -> None:
    """Rank 0 writes ``results`` to ``out``; then, under torch.distributed, every rank leaves at once.

    Called after the last collective. Leaving with ``os._exit`` skips the interpreter's teardown, where gloo's
    threads could abort a rank ("terminate called without an active exception") and ``destroy_process_group``
    could wait on a rank that has already gone.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)
    if torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
