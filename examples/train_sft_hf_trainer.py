"""SFT with a plain `transformers.Trainer` and one line: ``apply_fused_head(model)``.

The model's own ``model(**batch, labels=labels).loss`` then comes from the fused linear + cross-entropy
core, without the ``[tokens, vocab]`` logits; the rest of the script is ordinary Hugging Face code. With
no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on
``examples/data/sft.jsonl`` (prompt/completion, loss on the completion only) with the shipped tokenizer,
on CPU, and prints the loss at the start and at the end and the backend that ran.

    python examples/train_sft_hf_trainer.py
    python examples/train_sft_hf_trainer.py --smoke
    python examples/train_sft_hf_trainer.py --model ./my-model --data chats.jsonl --impl triton
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, load_data, load_model, load_tokenizer, mean_of, train_logs  # noqa: E402


def tokenize(tokenizer, max_length: int):
    """Prompt + completion as one sequence; labels -100 on the prompt (the loss is on the completion)."""

    def row(example):
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        ids = (prompt + completion + [tokenizer.eos_token_id])[:max_length]
        labels = ([-100] * len(prompt) + completion + [tokenizer.eos_token_id])[:max_length]
        return {"input_ids": ids, "labels": labels}

    return row


def collate(pad_id: int):
    import torch

    def pad(rows):
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": torch.full((len(rows), width), pad_id), "labels": torch.full((len(rows), width), -100),
                 "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            batch["labels"][i, :n] = torch.tensor(r["labels"])
            batch["attention_mask"][i, :n] = 1
        return batch

    return pad


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "sft.jsonl")
    parser.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    args = parser.parse_args(argv)

    import datasets
    import torch
    import transformers

    from trainers import apply_fused_head, fused_head_backend

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tokenizer = load_tokenizer(args)
    model, _ = load_model(args, tokenizer)
    data = load_data(args.data)
    missing = {"prompt", "completion"} - set(data.column_names)
    if missing:
        raise SystemExit(f"{args.data}: needs the columns 'prompt' and 'completion' (missing {sorted(missing)})")
    data = data.map(tokenize(tokenizer, args.max_length), remove_columns=data.column_names)

    apply_fused_head(model, impl=args.impl)  # the one line

    steps = args.steps or (4 if args.smoke else 60)
    config = transformers.TrainingArguments(
        output_dir=args.output_dir or "/tmp/align-losses-sft-hf-trainer",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 8,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr or 3e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 4),
        logging_steps=1 if args.smoke else 3,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=config, train_dataset=data,
                                   data_collator=collate(tokenizer.pad_token_id or 0))
    trainer.train()

    logs = train_logs(trainer)
    n = max(1, min(3, len(logs) // 3))
    summary = {"backend": fused_head_backend(model), "steps": trainer.state.global_step,
               "loss_start": mean_of(logs, "loss", True, n), "loss_end": mean_of(logs, "loss", False, n)}
    print()
    print(f"Summary ({summary['steps']} steps of transformers.Trainer, align-losses backend {summary['backend']!r}; "
          f"start/end = mean of the first/last {n} logged steps):")
    print(f"  loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f}")
    return summary


if __name__ == "__main__":
    main()
