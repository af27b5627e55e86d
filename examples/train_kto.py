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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, train  # noqa: E402


# (summary key, logged metric, label): the summary reports each metric's mean at the start and at the end
REPORT = [("reward_margin", "rewards/margins", "reward margin"), ("kl", "kl", "KL")]


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "kto.jsonl")
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args(argv)

    from trainers import FusedKTOConfig, FusedKTOTrainer

    return train(args, "kto", FusedKTOConfig, FusedKTOTrainer, REPORT, reference=True, beta=args.beta)


if __name__ == "__main__":
    main()
