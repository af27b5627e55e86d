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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, train  # noqa: E402


# (summary key, logged metric, label): the summary reports each metric's mean at the start and at the end
REPORT = [("loss", "loss", "loss"), ("token_accuracy", "mean_token_accuracy", "token accuracy")]


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "sft.jsonl")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--z-loss", type=float, default=0.0)
    parser.add_argument("--packing", action="store_true", help="pack sequences (BFD, padding-free)")
    args = parser.parse_args(argv)

    from trainers import FusedSFTConfig, FusedSFTTrainer

    return train(args, "sft", FusedSFTConfig, FusedSFTTrainer, REPORT, lr=3e-3,
                 packing=args.packing, label_smoothing_factor=args.label_smoothing, lce_z_loss=args.z_loss)


if __name__ == "__main__":
    main()
