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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py (it puts the checkout on sys.path)

from _common import DATA_DIR, common_parser, train  # noqa: E402


# (summary key, logged metric, label): the summary reports each metric's mean at the start and at the end
REPORT = [("rewards/accuracies", "rewards/accuracies", "reward accuracy"),
          ("rewards/margins", "rewards/margins", "reward margin"),
          ("logps/chosen", "logps/chosen", "avg logp chosen"),
          ("logps/rejected", "logps/rejected", "avg logp rejected")]


def main(argv=None) -> dict:
    parser = common_parser(__doc__.splitlines()[0], DATA_DIR / "preference.jsonl")
    parser.add_argument("--beta", type=float, default=2.0, help="reward scale (SimPO paper: 2 to 10)")
    parser.add_argument("--gamma", type=float, default=1.0, help="target margin simpo_gamma, inside "
                        "log sigmoid(beta * delta - gamma)")
    parser.add_argument("--cpo-alpha", type=float, default=0.0, help="weight of CPO's NLL term (0: SimPO)")
    args = parser.parse_args(argv)

    from trainers.cpo import FusedSimPOConfig, FusedSimPOTrainer

    return train(args, "simpo", FusedSimPOConfig, FusedSimPOTrainer, REPORT,  # reference-free
                 beta=args.beta, simpo_gamma=args.gamma, cpo_alpha=args.cpo_alpha)


if __name__ == "__main__":
    main()
