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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, train  # noqa: E402


# (summary key, logged metric, label): the summary reports each metric's mean at the start and at the end
REPORT = [("reward_accuracy", "rewards/accuracies", "reward accuracy"),
          ("reward_margin", "rewards/margins", "reward margin")]


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "preference.jsonl")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="sigmoid", help="DPO loss type(s), comma-separated")
    parser.add_argument("--padding-free", action="store_true", help="pack chosen and rejected into one row")
    args = parser.parse_args(argv)

    from trainers import FusedDPOConfig, FusedDPOTrainer

    return train(args, "dpo", FusedDPOConfig, FusedDPOTrainer, REPORT, reference=True,
                 beta=args.beta, loss_type=args.loss_type.split(","), padding_free=args.padding_free)


if __name__ == "__main__":
    main()
