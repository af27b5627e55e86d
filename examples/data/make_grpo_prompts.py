"""Generate ``grpo_prompts.jsonl``: arithmetic prompts with their verifiable answers, for ``examples/train_grpo.py``.

Each row is ``{"prompt": "What is 3 plus 4?", "answer": "7"}`` (sums and non-negative differences of two
single-digit numbers, the prompt templates of ``make_data.py``). GRPO trains on the prompts alone; the
``answer`` column reaches the reward functions as a keyword argument.

Usage::

    python examples/data/make_grpo_prompts.py            # writes next to this file
    python examples/data/make_grpo_prompts.py --out DIR --rows 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_data import PROMPTS_ADD, PROMPTS_SUB


def make_prompt(rng: random.Random) -> dict:
    """One arithmetic prompt and its answer (as text)."""
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"prompt": rng.choice(PROMPTS_ADD).format(a=a, b=b), "answer": str(a + b)}
    a = rng.randint(0, 9)
    b = rng.randint(0, a)
    return {"prompt": rng.choice(PROMPTS_SUB).format(a=a, b=b), "answer": str(a - b)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    path = Path(args.out) / "grpo_prompts.jsonl"
    with open(path, "w") as f:
        for _ in range(args.rows):
            f.write(json.dumps(make_prompt(rng)) + "\n")
    print(f"wrote {args.rows} rows to {path}")


if __name__ == "__main__":
    main()
