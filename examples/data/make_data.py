"""Generate the tiny offline example datasets shipped in ``examples/data``.

The preference is deliberately simple so that a randomly initialised model of a
few hundred thousand parameters can pick it up in a minute or two of CPU DPO:

* the prompt asks for the sum or difference of two single-digit numbers;
* the *chosen* answer always states the correct result;
* the *rejected* answer always states a wrong result (off by 1-3).

About two thirds of the pairs additionally differ in tone (chosen ends with a
polite "thank you", rejected is curt), which a model picks up within a few
steps; in the remaining third both answers use the same sentence and only the
number differs, which needs the arithmetic itself. So reward accuracy climbs
within the first few dozen steps to ~0.85-0.9 and then creeps upwards.

Files written (JSON lines, plain-text "standard" format):

* ``preference.jsonl`` -- prompt / chosen / rejected
* ``sft.jsonl``        -- prompt / completion (the chosen answers)
* ``kto.jsonl``        -- prompt / completion / label (unpaired; half desirable)

Usage::

    python examples/data/make_data.py            # writes next to this file
    python examples/data/make_data.py --out DIR --rows 400 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPTS_ADD = [
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "Quick question: {a} + {b} = ?",
]
PROMPTS_SUB = [
    "What is {a} minus {b}?",
    "Compute {a} - {b}.",
    "Subtract {b} from {a}.",
    "Quick question: {a} - {b} = ?",
]
GOOD = [
    "{a} {op} {b} = {c}. Thank you!",
    "The answer is {c}. Thank you!",
    "It is {c}. Happy to help, thank you!",
    "{c}. Thank you for asking!",
]
BAD = [
    "{a} {op} {b} = {c}.",
    "The answer is {c}.",
    "It is {c}. Whatever.",
    "{c}. Stop asking.",
]


def make_example(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op, result, prompts = "+", a + b, PROMPTS_ADD
    else:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)  # keep results non-negative
        op, result, prompts = "-", a - b, PROMPTS_SUB
    wrong = result + rng.choice([-2, -1, 1, 2, 3])
    if wrong < 0:
        wrong = result + rng.randint(1, 3)
    prompt = rng.choice(prompts).format(a=a, b=b)
    if rng.random() < 2 / 3:  # tone + correctness
        chosen = " " + rng.choice(GOOD).format(a=a, b=b, op=op, c=result)
        rejected = " " + rng.choice(BAD).format(a=a, b=b, op=op, c=wrong)
    else:  # correctness only: same sentence, different number
        template = rng.choice(GOOD + BAD[:2])
        chosen = " " + template.format(a=a, b=b, op=op, c=result)
        rejected = " " + template.format(a=a, b=b, op=op, c=wrong)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    pref = [make_example(rng) for _ in range(args.rows)]
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pref]
    # Unpaired KTO data: each prompt contributes exactly one completion,
    # alternating desirable / undesirable so the label balance is 50/50.
    kto = [
        {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
        for i, r in enumerate(pref)
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "preference.jsonl", pref)
    write_jsonl(args.out / "sft.jsonl", sft)
    write_jsonl(args.out / "kto.jsonl", kto)
    print(f"wrote {len(pref)} rows each to {args.out}")


if __name__ == "__main__":
    main()
