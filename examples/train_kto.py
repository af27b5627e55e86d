"""KTO with the fused linear + cross-entropy head: TRL's KTOTrainer, minus the [tokens, vocab] logits.

With no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on
``examples/data/kto.jsonl`` (prompt/completion/label) with the shipped tokenizer, on CPU, printing
TRL's metrics and a summary (reward margin and KL at the start and at the end, the backend).

    python examples/train_kto.py
    python examples/train_kto.py --smoke
    python examples/train_kto.py --model ./my-model --data feedback.parquet

``--data``: JSON, JSON-lines or Parquet with ``prompt``/``completion``/``label`` (bool), or paired
``prompt``/``chosen``/``rejected`` (TRL unpairs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainers.cli import DATA_DIR, common_parser, load_data, load_model, load_tokenizer, mean_of, train_logs  # noqa: E402


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "kto.jsonl")
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args(argv)

    import datasets
    import torch
    import transformers

    from trainers import FusedKTOConfig, FusedKTOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args)
    model, ref_model = load_model(args, tokenizer)
    dataset = load_data(args.data)
    steps = args.steps or (4 if args.smoke else 60)
    config = FusedKTOConfig(
        output_dir=args.output_dir or "/tmp/align-losses-kto",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 16,
        learning_rate=args.lr or 2e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 4),
        beta=args.beta,
        max_length=args.max_length,
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
    trainer = FusedKTOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()

    logs = train_logs(trainer)
    n = max(1, min(3, len(logs) // 3))
    summary = {
        "backend": trainer.lce_backend,
        "steps": trainer.state.global_step,
        "reward_margin_start": mean_of(logs, "rewards/margins", True, n),
        "reward_margin_end": mean_of(logs, "rewards/margins", False, n),
        "kl_start": mean_of(logs, "kl", True, n),
        "kl_end": mean_of(logs, "kl", False, n),
    }
    print()
    print(f"Summary ({summary['steps']} steps, align-losses backend {summary['backend']!r}; "
          f"start/end = mean of the first/last {n} logged steps):")
    print(f"  reward margin  {summary['reward_margin_start']:.3f} -> {summary['reward_margin_end']:.3f}")
    print(f"  KL             {summary['kl_start']:.3f} -> {summary['kl_end']:.3f}")
    return summary


if __name__ == "__main__":
    main()
