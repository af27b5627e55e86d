"""SimPO with the fused linear + cross-entropy head: TRL's CPOTrainer in SimPO mode, minus the [tokens, vocab] logits.

SimPO is CPO with ``loss_type="simpo"`` and ``cpo_alpha=0`` (`trainers.cpo.FusedSimPOConfig`'s defaults).

With no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on the
shipped preference data ``examples/data/preference.jsonl`` with the shipped tokenizer, on CPU, in
about a minute, prints TRL's metrics as it goes and a summary at the end: reward accuracy and margin
and the chosen/rejected average log-probs at the start and at the end of training, and the
align-losses backend that ran.

    python examples/train_simpo.py                      # the tiny demo
    python examples/train_simpo.py --smoke              # a few steps (CI)
    python examples/train_simpo.py --model ./my-model --data prefs.parquet --beta 2.5 --gamma 1.4

``--data`` is a JSON, JSON-lines or Parquet file with ``prompt``/``chosen``/``rejected`` columns
(or ``chosen``/``rejected`` with the prompt as common prefix), in TRL's standard or conversational
format. ``--model`` is any local Hugging Face causal LM directory. SimPO needs no reference model.
``--cpo-alpha`` > 0 adds CPO's NLL term (CPO-SimPO).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainers.cli import DATA_DIR, common_parser, load_data, load_model, load_tokenizer, mean_of, train_logs  # noqa: E402


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "preference.jsonl")
    parser.add_argument("--beta", type=float, default=2.0, help="reward scale (SimPO paper: 2 to 10)")
    parser.add_argument("--gamma", type=float, default=1.0, help="target margin simpo_gamma, inside "
                        "log sigmoid(beta * delta - gamma)")
    parser.add_argument("--cpo-alpha", type=float, default=0.0, help="weight of CPO's NLL term (0: SimPO)")
    args = parser.parse_args(argv)

    import datasets
    import transformers

    from trainers.cpo import FusedSimPOConfig, FusedSimPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args)
    model, _ = load_model(args, tokenizer)  # SimPO is reference-free: the copy made for DPO is not used
    dataset = load_data(args.data)
    steps = args.steps or (4 if args.smoke else 60)
    config = FusedSimPOConfig(
        output_dir=args.output_dir or "/tmp/align-losses-simpo",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 16,
        learning_rate=args.lr or 2e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 4),
        beta=args.beta,
        simpo_gamma=args.gamma,
        cpo_alpha=args.cpo_alpha,
        max_length=args.max_length,
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
    trainer = FusedSimPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    logs = train_logs(trainer)
    n = max(1, min(3, len(logs) // 3))
    summary = {"backend": trainer.lce_backend, "steps": trainer.state.global_step}
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        summary[f"{key}_start"] = mean_of(logs, key, True, n)
        summary[f"{key}_end"] = mean_of(logs, key, False, n)
    print()
    print(f"Summary ({summary['steps']} steps, align-losses backend {summary['backend']!r}; "
          f"start/end = mean of the first/last {n} logged steps):")
    for key, label in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
                       ("logps/chosen", "avg logp chosen"), ("logps/rejected", "avg logp rejected")):
        print(f"  {label:<17} {summary[key + '_start']:.3f} -> {summary[key + '_end']:.3f}")
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
