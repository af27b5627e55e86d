"""GRPO with the fused linear + cross-entropy head: TRL's GRPOTrainer, minus the [tokens, vocab] logits.

With no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on the
arithmetic prompts of ``examples/data/grpo_prompts.jsonl`` with two verifiable rewards, on CPU:

* ``answer_first`` (0.5): the completion starts with a number, the answer's format;
* ``correct_answer`` (1.0): the first number in the completion is the prompt's ``answer``.

It prints TRL's metrics and a summary: the mean reward, its two parts and the entropy at the start and
at the end, and the align-losses backend. In 60 steps (under a minute of CPU) the mean reward rises
from ~0.08 to ~0.58: the model learns to answer with a number (0.05 -> 0.50) and the entropy
collapses; the arithmetic itself (correct answers 0.03 -> 0.08) needs far more steps. Every log-prob pass of the step (policy, old policy, reference) runs through
the fused head; generation is TRL's.

    python examples/train_grpo.py
    python examples/train_grpo.py --smoke
    python examples/train_grpo.py --model ./my-model --beta 0.04 --loss-type grpo --steps 200

``--data``: JSON, JSON-lines or Parquet with ``prompt`` and ``answer`` columns.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, load_data, load_model, load_tokenizer, summarize  # noqa: E402

NUMBER = re.compile(r"-?\d+")

# (summary key, logged metric, label): the summary reports each metric's mean at the start and at the end
REPORT = [
    ("reward", "reward", "reward"),
    ("correct", "rewards/correct_answer/mean", "correct answer"),
    ("format", "rewards/answer_first/mean", "answer first"),
    ("entropy", "entropy", "entropy"),
]


def correct_answer(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 where the first number in the completion equals the prompt's answer, else 0.0."""
    rewards = []
    for text, expected in zip(completions, answer):
        found = NUMBER.search(text)
        rewards.append(1.0 if found is not None and found.group() == str(expected) else 0.0)
    return rewards


def answer_first(completions: list[str], **kwargs) -> list[float]:
    """0.5 where the completion (leading spaces aside) starts with a number, else 0.0."""
    return [0.5 if NUMBER.match(text.lstrip()) else 0.0 for text in completions]


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "grpo_prompts.jsonl")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=6)
    parser.add_argument("--loss-type", default="dapo", help="trl.GRPOConfig.loss_type (default %(default)s)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 loads a reference model: "
                        "needs --model)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    args = parser.parse_args(argv)

    import datasets
    import torch
    import transformers

    from trainers import FusedGRPOConfig, FusedGRPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if args.beta and not args.model:
        raise SystemExit("--beta > 0 needs --model: TRL loads the reference model from the policy's path")
    tokenizer = load_tokenizer(args)
    model, _ = load_model(args, tokenizer)
    steps = args.steps or (3 if args.smoke else 60)
    config = FusedGRPOConfig(
        output_dir=args.output_dir or "/tmp/align-losses-grpo",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 16,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.lr or 1e-2,
        lr_scheduler_type="constant",
        loss_type=args.loss_type,
        beta=args.beta,
        temperature=args.temperature,
        logging_steps=1 if args.smoke else 4,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=args.seed,
        disable_tqdm=True,
        lce_impl=args.impl,
    )
    trainer = FusedGRPOTrainer(model=model, reward_funcs=[answer_first, correct_answer], args=config,
                               train_dataset=load_data(args.data), processing_class=tokenizer)
    trainer.train()
    return summarize(trainer, REPORT)


if __name__ == "__main__":
    main()
