"""Build the small byte-level BPE tokenizer shipped in ``examples/tokenizer``.

It is trained with the ``tokenizers`` library on the generated example data
(``preference.jsonl``, ``sft.jsonl``, ``kto.jsonl``), so it works fully offline.
Byte-level means any text still encodes (rare strings just fall back to bytes).

Special tokens:

* ``<|endoftext|>`` -- eos (TRL appends it to completions)
* ``<|pad|>``       -- pad (distinct from eos, so padding never hides an eos)
* ``<|bos|>``       -- bos (defined but not added automatically)

Usage::

    python examples/data/make_data.py          # first, if the jsonl files are missing
    python examples/data/make_tokenizer.py     # writes examples/tokenizer/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"


def iter_texts(data_dir: Path):
    for name in ("preference.jsonl", "sft.jsonl", "kto.jsonl"):
        path = data_dir / name
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ("prompt", "chosen", "rejected", "completion"):
                    if isinstance(row.get(key), str):
                        yield row[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE)
    parser.add_argument("--out", type=Path, default=HERE.parent / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()

    texts = list(iter_texts(args.data))
    if not texts:
        raise SystemExit(f"no training text found in {args.data}; run make_data.py first")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=[EOS, PAD, BOS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=BOS,
        unk_token=None,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(args.out))
    # Name the class that both transformers 4.x and 5.x resolve (5.x maps it to its
    # TokenizersBackend), so the folder loads with either major version.
    cfg_path = args.out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"saved tokenizer with {len(fast)} tokens to {args.out}")


if __name__ == "__main__":
    main()
