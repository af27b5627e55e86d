"""SFT with the fused linear + cross-entropy head: TRL's SFTTrainer, minus the [tokens, vocab] logits.

With no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on
``examples/data/sft.jsonl`` (prompt/completion, loss on the completion only) with the shipped
tokenizer, on CPU, printing TRL's metrics and a summary (loss and token accuracy at the start and at
the end, the align-losses backend).

    python examples/train_sft.py
    python examples/train_sft.py --smoke
    python examples/train_sft.py --model ./my-model --data chats.parquet --label-smoothing 0.1 --z-loss 1e-4

``--data``: JSON, JSON-lines or Parquet with ``prompt``/``completion``, ``messages`` or ``text``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainers.cli import DATA_DIR, common_parser, load_data, load_model, load_tokenizer, mean_of, train_logs  # noqa: E402


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "sft.jsonl")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--z-loss", type=float, default=0.0)
    parser.add_argument("--packing", action="store_true", help="pack sequences (BFD, padding-free)")
    args = parser.parse_args(argv)

    import datasets
    import torch
    import transformers

    from trainers import FusedSFTConfig, FusedSFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args)
    model, _ = load_model(args, tokenizer)
    dataset = load_data(args.data)
    steps = args.steps or (4 if args.smoke else 60)
    config = FusedSFTConfig(
        output_dir=args.output_dir or "/tmp/align-losses-sft",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 16,
        learning_rate=args.lr or 3e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 4),
        max_length=args.max_length,
        packing=args.packing,
        label_smoothing_factor=args.label_smoothing,
        lce_z_loss=args.z_loss,
        logging_steps=1 if args.smoke else 3,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
        lce_impl=args.impl,
    )
    trainer = FusedSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    logs = train_logs(trainer)
    n = max(1, min(3, len(logs) // 3))
    summary = {
        "backend": trainer.lce_backend,
        "steps": trainer.state.global_step,
        "loss_start": mean_of(logs, "loss", True, n),
        "loss_end": mean_of(logs, "loss", False, n),
        "token_accuracy_start": mean_of(logs, "mean_token_accuracy", True, n),
        "token_accuracy_end": mean_of(logs, "mean_token_accuracy", False, n),
    }
    print()
    print(f"Summary ({summary['steps']} steps, align-losses backend {summary['backend']!r}; "
          f"start/end = mean of the first/last {n} logged steps):")
    print(f"  loss            {summary['loss_start']:.3f} -> {summary['loss_end']:.3f}")
    print(f"  token accuracy  {summary['token_accuracy_start']:.3f} -> {summary['token_accuracy_end']:.3f}")
    return summary


if __name__ == "__main__":
    main()
