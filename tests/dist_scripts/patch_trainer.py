"""Two SGD steps of a plain `transformers.Trainer` on a tiny random model patched with `apply_fused_head`.

Run it plainly (one process: the reference) or under ``accelerate launch`` with FSDP2 on CPU processes
(gloo; `train_trainer.allow_fsdp_on_cpu`), or with ``--cuda --deepspeed CONFIG`` under ``torchrun`` for ZeRO-3
(`tests/test_zero3_gpu.py`). Rank 0 writes ``--out`` (a ``torch.save`` dict): the per-step
losses, the initial and final parameters (full tensors), how accelerate wrapped the model, and the types the
LM head's calls returned (never a tensor: its own forward must not run, the loss comes from the fused core). Rows have different
lengths, so the token counts of the ranks differ and ``num_items_in_batch`` matters.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for i in range(n):
            ids = torch.randint(3, vocab, (12,), generator=g)
            labels = ids.clone()
            labels[: 2 + 3 * (i % 3)] = -100  # prompts of different lengths: token counts differ per rank
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main(argv=None):
    from train_trainer import add_run_args, allow_fsdp_on_cpu, full_params, placement_args, save_and_exit

    parser = argparse.ArgumentParser()
    add_run_args(parser, grad_accum=2)
    args = parser.parse_args(argv)

    import transformers
    from conftest import MetricsRecorder, base_args, tiny_causal_lm

    from trainers import apply_fused_head

    if not args.cuda:
        allow_fsdp_on_cpu()
    model = apply_fused_head(tiny_causal_lm(args.kind))
    # Under FSDP2 the core runs as the head's call (so FSDP's hooks fire) and returns a tuple; the head's own
    # forward would return the logits, a tensor.
    head_outputs = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_outputs.append(type(out).__name__))
    before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    common = base_args(Path(args.out).parent / "trainer_out", per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=args.grad_accum, max_steps=2, optim="sgd", learning_rate=0.5,
                       train_sampling_strategy="sequential", **placement_args(args))
    rec = MetricsRecorder()
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                   train_dataset=Rows(16, model.config.vocab_size), callbacks=[rec.callback])
    trainer.train()
    result = {
        "logs": rec.logs,
        "before": before,
        "after": full_params(trainer.model),
        "world_size": trainer.accelerator.num_processes,
        "is_fsdp2": bool(getattr(trainer.accelerator, "is_fsdp2", False)),
        "is_deepspeed": trainer.is_deepspeed_enabled,
        "model_class": type(trainer.model_wrapped).__name__,
        "head_outputs": sorted(set(head_outputs)),
    }
    trainer.accelerator.wait_for_everyone()
    save_and_exit(result, args.out)


if __name__ == "__main__":
    main()
