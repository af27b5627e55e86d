"""What the example scripts ``examples/train_*.py`` share: their options, the model, tokenizer and data
they load, the training run, and the start/end summary they print.

A script imports it after putting its own folder on ``sys.path``; importing it puts the checkout on
``sys.path`` too, so the scripts run from a checkout without installing the package.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_DIR = HERE / "tokenizer"
DATA_DIR = HERE / "data"


def common_parser(description: str, default_data: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help="local Hugging Face causal LM directory (default: a tiny Qwen3-shaped model "
                        "built from a config, random weights)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else examples/tokenizer)")
    parser.add_argument("--data", default=str(default_data), help="JSON, JSON-lines or Parquet file (default: %(default)s)")
    parser.add_argument("--output-dir", default=None, help="the trainer's output_dir (default: /tmp/align-losses-NAME); no checkpoint is saved there (save_strategy='no')")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help="per-device batch size")
    parser.add_argument("--lr", type=float, default=None, help="learning rate")
    parser.add_argument("--impl", default="auto", help="align-losses backend (lce_impl), default %(default)s")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps only (for CI)")
    return parser


def load_tokenizer(args):
    from transformers import AutoTokenizer

    path = args.tokenizer
    if path is None and args.model and (Path(args.model) / "tokenizer_config.json").exists():
        path = args.model
    return AutoTokenizer.from_pretrained(path or TOKENIZER_DIR)


def tiny_qwen3(vocab_size: int, seed: int):
    """A Qwen3-shaped model with 2 layers of width 64, random weights, fp32."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def load_model(args, tokenizer, reference: bool = False):
    """``(model, ref_model or None)``: a local model (TRL then builds the reference from it) or the tiny one,
    with a copy of it as the reference when ``reference``."""
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype="float32"), None
    model = tiny_qwen3(len(tokenizer), args.seed)
    return model, copy.deepcopy(model) if reference else None


def load_data(path: str):
    from datasets import Dataset

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"data file {path} does not exist")
    if p.suffix == ".parquet":
        return Dataset.from_parquet(str(p))
    if p.suffix in (".json", ".jsonl"):
        return Dataset.from_json(str(p))
    raise SystemExit(f"unsupported data file {path}: expected .json, .jsonl or .parquet")


def mean_of(logs: list[dict], key: str, first: bool, n: int) -> float:
    values = [float(log[key]) for log in logs if key in log]
    if not values:
        return float("nan")
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


def train_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log and "train_loss" not in log]


def train(args, name: str, config_cls, trainer_cls, report, *, reference: bool = False, lr: float = 2e-3,
          **options) -> dict:
    """Train ``trainer_cls`` with a ``config_cls`` built from the common options and ``options`` (the
    script's own config fields), then print and return the summary of ``report`` (see `summarize`).

    ``name`` names the default output directory; ``reference``: the trainer takes a reference model;
    ``lr``: the learning rate without ``--lr``.
    """
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args)
    model, ref_model = load_model(args, tokenizer, reference)
    dataset = load_data(args.data)
    steps = args.steps or (4 if args.smoke else 60)
    config = config_cls(
        output_dir=args.output_dir or f"/tmp/align-losses-{name}",
        max_steps=steps,
        per_device_train_batch_size=args.batch_size or 16,
        learning_rate=args.lr or lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 4),
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
        **options,
    )
    references = {"ref_model": ref_model} if reference else {}
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, **references)
    trainer.train()
    return summarize(trainer, report)


def summarize(trainer, report) -> dict:
    """``{"backend", "steps", KEY_start, KEY_end...}``, printed: for each ``(KEY, metric, label)`` of
    ``report``, the mean of the logged ``metric`` over the first and the last few logged steps."""
    logs = train_logs(trainer)
    n = max(1, min(3, len(logs) // 3))
    summary = {"backend": trainer.lce_backend, "steps": trainer.state.global_step}
    for key, metric, _ in report:
        summary[f"{key}_start"] = mean_of(logs, metric, True, n)
        summary[f"{key}_end"] = mean_of(logs, metric, False, n)
    print()
    print(f"Summary ({summary['steps']} steps, align-losses backend {summary['backend']!r}; "
          f"start/end = mean of the first/last {n} logged steps):")
    width = max(len(label) for _, _, label in report) + 1
    for key, _, label in report:
        print(f"  {label:<{width}} {summary[key + '_start']:.3f} -> {summary[key + '_end']:.3f}")
    return summary
