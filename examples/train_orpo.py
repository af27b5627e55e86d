"""ORPO with the fused linear + cross-entropy head: TRL's ORPOTrainer, minus the [tokens, vocab] logits.

With no arguments it trains a tiny Qwen3-shaped model (random weights, built from a config) on the
shipped preference data ``examples/data/preference.jsonl`` with the shipped tokenizer, on CPU, in
about a minute, prints TRL's metrics as it goes and a summary at the end: NLL, reward accuracy and
margin, and log-odds at the start and at the end of training, and the align-losses backend that ran.

    python examples/train_orpo.py                       # the tiny demo
    python examples/train_orpo.py --smoke               # a few steps (CI)
    python examples/train_orpo.py --model ./my-model --data prefs.parquet --steps 200

``--data`` is a JSON, JSON-lines or Parquet file with ``prompt``/``chosen``/``rejected`` columns
(or ``chosen``/``rejected`` with the prompt as common prefix), in TRL's standard or conversational
format. ``--model`` is any local Hugging Face causal LM directory. ORPO needs no reference model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, train  # noqa: E402


# (summary key, logged metric, label): the summary reports each metric's mean at the start and at the end
REPORT = [("nll_loss", "nll_loss", "NLL (chosen)"),
          ("rewards/accuracies", "rewards/accuracies", "reward accuracy"),
          ("rewards/margins", "rewards/margins", "reward margin"),
          ("log_odds_chosen", "log_odds_chosen", "log odds ratio")]


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "preference.jsonl")
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the odds-ratio term (the paper's lambda)")
    args = parser.parse_args(argv)

    from trainers.orpo import FusedORPOConfig, FusedORPOTrainer

    return train(args, "orpo", FusedORPOConfig, FusedORPOTrainer, REPORT, beta=args.beta)  # reference-free


if __name__ == "__main__":
    main()
