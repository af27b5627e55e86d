"""DPO with the fused linear + cross-entropy head: TRL's DPOTrainer, minus the [tokens, vocab] logits.

With no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on the
shipped preference data ``examples/data/preference.jsonl`` with the shipped tokenizer, on CPU, in
about a minute, prints TRL's metrics as it goes and a summary at the end: reward accuracy and margin
at the start and at the end of training, and the align-losses backend that ran.

    python examples/train_dpo.py                       # the tiny demo
    python examples/train_dpo.py --smoke               # a few steps (CI)
    python examples/train_dpo.py --model ./my-model --data prefs.parquet --steps 200

``--data`` is a JSON, JSON-lines or Parquet file with ``prompt``/``chosen``/``rejected`` columns
(or ``chosen``/``rejected`` with the prompt as common prefix), in TRL's standard or conversational
format. ``--model`` is any local Hugging Face causal LM directory; TRL then loads the reference
model from the same directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainers.cli import DATA_DIR, common_parser, load_data, load_model, load_tokenizer, mean_of, train_logs  # noqa: E402


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "preference.jsonl")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="sigmoid", help="DPO loss type(s), comma-separated")
    parser.add_argument("--padding-free", action="store_true", help="pack chosen and rejected into one row")
    args = parser.parse_args(argv)

    import datasets
    import transformers

    from trainers import FusedDPOConfig, FusedDPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args)
    model, ref_model = load_model(args, tokenizer)
    dataset = load_data(args.data)
    steps = args.steps or (4 if args.smoke else 60)
    config = FusedDPOConfig(
        output_dir=args.output_dir or "/tmp/align-losses-dpo",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 16,
        learning_rate=args.lr or 2e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 4),
        beta=args.beta,
        loss_type=args.loss_type.split(","),
        max_length=args.max_length,
        padding_free=args.padding_free,
        logging_steps=1 if args.smoke else 3,
        save_strategy="no",
        report_to="none",
        use_cpu=not _cuda(),
        bf16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
        lce_impl=args.impl,
    )
    trainer = FusedDPOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()

    logs = train_logs(trainer)
    n = max(1, min(3, len(logs) // 3))
    summary = {
        "backend": trainer.lce_backend,
        "steps": trainer.state.global_step,
        "reward_accuracy_start": mean_of(logs, "rewards/accuracies", True, n),
        "reward_accuracy_end": mean_of(logs, "rewards/accuracies", False, n),
        "reward_margin_start": mean_of(logs, "rewards/margins", True, n),
        "reward_margin_end": mean_of(logs, "rewards/margins", False, n),
    }
    print()
    print(f"Summary ({summary['steps']} steps, align-losses backend {summary['backend']!r}; "
          f"start/end = mean of the first/last {n} logged steps):")
    print(f"  reward accuracy  {summary['reward_accuracy_start']:.3f} -> {summary['reward_accuracy_end']:.3f}")
    print(f"  reward margin    {summary['reward_margin_start']:.3f} -> {summary['reward_margin_end']:.3f}")
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
