"""`trainers.extract`: per-sequence log-probs of a dataset against a full-logits computation written here,
the trainers' truncation rules, and the precomputed reference columns against TRL's own precomputation."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import BAD, GOOD, PROMPTS, base_args, tiny_causal_lm

from trainers.extract import ExtractionSummary, extract_logps, reference_columns

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------------
# The reference: full logits, one sequence at a time, no padding


def full_logits_logp(model, prompt_ids: list, completion_ids: list) -> float:
    """``sum_t log softmax(logits)[t]`` over the completion tokens, from ``model(...).logits``."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    start = max(len(prompt_ids) - 1, 0)
    return float(logprobs[start:].sum())


def split_ids(tok, prompt, completion):
    """Prompt and completion ids as TRL's trainers split them: joint tokenisation, common prefix."""
    if isinstance(prompt, list):
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        p = tok(prompt)["input_ids"]
        full = tok(prompt + completion + tok.eos_token)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    return full[:n], full[n:]


def cut(prompt_ids, completion_ids, max_length, mode="keep_start"):
    """Truncate prompt+completion to ``max_length`` and split it back."""
    ids = list(prompt_ids) + list(completion_ids)
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is not None:
        keep = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        ids, mask = ids[keep], mask[keep]
    n = mask.index(1) if 1 in mask else len(mask)
    return ids[:n], ids[n:]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on shared CI cores: one intra-op thread is many times faster than oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from conftest import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def chat_tok(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="module")
def models(tok):
    return tiny_causal_lm(vocab_size=len(tok), seed=0), tiny_causal_lm(vocab_size=len(tok), seed=1)


def _preference(conversational: bool):
    from datasets import Dataset

    if not conversational:
        return Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
        "chosen": [[{"role": "assistant", "content": c}] for c in GOOD],
        "rejected": [[{"role": "assistant", "content": r}] for r in BAD],
    })


# ---------------------------------------------------------------------------------------------------------------------
# Values against full logits, per data shape


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_preference_matches_full_logits(models, tok, chat_tok, conversational):
    model, ref = models
    tokenizer = chat_tok if conversational else tok
    data = _preference(conversational)
    beta = 0.1
    out, summary = extract_logps(model, data, tokenizer, ref_model=ref, beta=beta, batch_size=3, return_summary=True)
    assert out.column_names == data.column_names + [
        "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens", "ref_chosen_logps", "ref_rejected_logps",
        "chosen_reward", "rejected_reward", "margin",
    ]
    margins = []
    for i, row in enumerate(out):
        for side in ("chosen", "rejected"):
            p, c = split_ids(tokenizer, data[i]["prompt"], data[i][side])
            assert row[f"{side}_tokens"] == len(c)
            assert row[f"{side}_logps"] == pytest.approx(full_logits_logp(model, p, c), abs=1e-4)
            assert row[f"ref_{side}_logps"] == pytest.approx(full_logits_logp(ref, p, c), abs=1e-4)
            reward = beta * (row[f"{side}_logps"] - row[f"ref_{side}_logps"])
            assert row[f"{side}_reward"] == pytest.approx(reward, abs=1e-9)
        assert row["margin"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"], abs=1e-9)
        margins.append(row["margin"])
    assert summary.rows == summary.scored_rows == len(data) and summary.truncated_rows == 0
    assert summary.reward_accuracy == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert summary.mean_margin == pytest.approx(sum(margins) / len(margins))
    assert summary.completion_tokens == sum(out["chosen_tokens"]) + sum(out["rejected_tokens"])
    if conversational:  # the template really was used: the completion ends with its end-of-turn token
        p, c = split_ids(tokenizer, data[0]["prompt"], data[0]["chosen"])
        assert tokenizer.decode(p).startswith("<|bos|>user:")


@pytest.mark.parametrize("kind", ["unpaired", "completion"])
def test_prompt_completion_matches_full_logits(models, tok, kto_dataset, sft_dataset, kind):
    model, ref = models
    data = kto_dataset if kind == "unpaired" else sft_dataset
    out, summary = extract_logps(model, data, tok, ref_model=ref, beta=0.5, batch_size=5, return_summary=True)
    assert summary.kind == kind
    assert out.column_names == data.column_names + ["logps", "tokens", "ref_logps", "reward"]
    for i, row in enumerate(out):
        p, c = split_ids(tok, data[i]["prompt"], data[i]["completion"])
        assert row["tokens"] == len(c)
        assert row["logps"] == pytest.approx(full_logits_logp(model, p, c), abs=1e-4)
        assert row["ref_logps"] == pytest.approx(full_logits_logp(ref, p, c), abs=1e-4)
        assert row["reward"] == pytest.approx(0.5 * (row["logps"] - row["ref_logps"]), abs=1e-9)
    if kind == "unpaired":
        assert set(summary.mean_reward) == {"desirable", "undesirable"}


def test_batch_size_and_row_order_do_not_change_results(models, tok, preference_dataset):
    model, _ = models
    base = extract_logps(model, preference_dataset, tok, batch_size=1)
    order = list(range(len(preference_dataset)))
    random.Random(0).shuffle(order)
    shuffled = extract_logps(model, preference_dataset.select(order), tok, batch_size=3)
    # Rows come back in their input order: the shuffled run's row j is the base run's row order[j].
    assert shuffled["prompt"] == [preference_dataset[i]["prompt"] for i in order]
    for j, i in enumerate(order):
        for key in ("chosen_logps", "rejected_logps"):
            assert shuffled[j][key] == pytest.approx(base[i][key], abs=1e-5)
        assert shuffled[j]["chosen_tokens"] == base[i]["chosen_tokens"]


# ---------------------------------------------------------------------------------------------------------------------
# Truncation: the trainers' rules, counted


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_preference_truncation_counted_and_scored_as_trained(models, tok, preference_dataset, mode, caplog):
    model, _ = models
    max_length = 12
    with caplog.at_level("WARNING", logger="trainers.extract"):
        out, summary = extract_logps(
            model, preference_dataset, tok, max_length=max_length, truncation_mode=mode, return_summary=True
        )
    expected_truncated, expected_dropped = [], []
    for i, row in enumerate(preference_dataset):
        pieces = {side: split_ids(tok, row["prompt"], row[side]) for side in ("chosen", "rejected")}
        if mode == "keep_start" and len(pieces["chosen"][0]) >= max_length:
            expected_dropped.append(i)
            assert out[i]["chosen_logps"] is None and out[i]["rejected_tokens"] is None
            continue
        if any(len(p) + len(c) > max_length for p, c in pieces.values()):
            expected_truncated.append(i)
        for side, (p, c) in pieces.items():
            p2, c2 = cut(p, c, max_length, mode)
            assert out[i][f"{side}_tokens"] == len(c2) - (1 if not p2 else 0)  # a first token has no context
            assert out[i][f"{side}_logps"] == pytest.approx(full_logits_logp(model, p2, c2), abs=1e-4)
    assert expected_truncated, "the test data should contain rows longer than max_length"
    assert summary.truncated_indices == expected_truncated and summary.truncated_rows == len(expected_truncated)
    assert summary.dropped_indices == expected_dropped
    assert summary.scored_rows == len(preference_dataset) - len(expected_dropped)
    assert "truncated" in caplog.text


def test_prompt_filling_max_length_is_dropped_not_scored(models, tok):
    from datasets import Dataset

    model, _ = models
    long_prompt = "What is " + "one plus " * 10 + "one?"
    data = Dataset.from_dict(
        {"prompt": [long_prompt, "Add 4 and 1."], "completion": [" 11.", " 5."], "label": [True, False]}
    )
    out, summary = extract_logps(model, data, tok, max_length=16, return_summary=True)
    assert summary.dropped_indices == [0] and summary.scored_rows == 1
    assert out[0]["logps"] is None and out[1]["logps"] is not None
    # The default max_length is the trainer config's (1024): nothing dropped.
    _, summary = extract_logps(model, data, tok, return_summary=True)
    assert summary.max_length == 1024 and summary.dropped_rows == 0


def test_sft_truncation(models, tok, sft_dataset):
    model, _ = models
    out, summary = extract_logps(
        model, sft_dataset, tok, max_length=10, truncation_mode="keep_end", return_summary=True
    )
    for i, row in enumerate(sft_dataset):
        p, c = split_ids(tok, row["prompt"], row["completion"])
        p2, c2 = cut(p, c, 10, "keep_end")
        assert (i in summary.truncated_indices) == (len(p) + len(c) > 10)
        assert out[i]["logps"] == pytest.approx(full_logits_logp(model, p2, c2), abs=1e-4)
    assert summary.truncated_rows > 0


# ---------------------------------------------------------------------------------------------------------------------
# Memory and side effects


def test_no_full_logits_and_model_restored(models, tok, sft_dataset):
    model, _ = models
    model.train()
    head = model.get_output_embeddings()

    def refuse(*_):
        raise AssertionError("the LM head was called: full logits were built")

    handle = head.register_forward_hook(refuse)
    try:
        out = extract_logps(model, sft_dataset, tok)
    finally:
        handle.remove()
    assert all(v is not None for v in out["logps"])
    assert model.training, "the training flag is restored"
    assert "forward" not in model.__dict__, "the fused forward is removed after the call"


def test_tokenized_input(models, tok):
    from datasets import Dataset

    model, _ = models
    p, c = split_ids(tok, PROMPTS[0], GOOD[0])
    _, r = split_ids(tok, PROMPTS[0], BAD[0])
    data = Dataset.from_dict({"prompt_ids": [p], "chosen_ids": [c], "rejected_ids": [r]})
    out = extract_logps(model, data, tok)
    assert out[0]["chosen_logps"] == pytest.approx(full_logits_logp(model, p, c), abs=1e-4)


def test_errors(models, tok, preference_dataset):
    from datasets import Dataset

    model, ref = models
    with pytest.raises(ValueError, match="missing columns"):
        extract_logps(model, Dataset.from_dict({"question": ["a"], "answer": ["b"]}), tok)
    with pytest.raises(ValueError, match="beta needs a ref_model"):
        extract_logps(model, preference_dataset, tok, beta=0.1)
    with pytest.raises(ValueError, match="unknown impl"):
        extract_logps(model, preference_dataset, tok, lce_impl="nope")
    with pytest.raises(ValueError, match="truncation_mode"):
        extract_logps(model, preference_dataset, tok, truncation_mode="middle")
    assert "forward" not in model.__dict__


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs: FusedDPOTrainer vs TRL (the judged criterion)


def _dpo_args(tmp_path, **overrides):
    import trl

    return trl.DPOConfig(**base_args(tmp_path, precompute_ref_log_probs=True, **overrides))


def _trl_precomputed(tok, dataset, tmp_path, **overrides):
    import trl

    trainer = trl.DPOTrainer(
        tiny_causal_lm(vocab_size=len(tok)), args=_dpo_args(tmp_path / "trl", **overrides),
        train_dataset=dataset, processing_class=tok,
    )
    return trainer.train_dataset


def _fused_trainer(tok, dataset, tmp_path, **overrides):
    from trainers import FusedDPOTrainer

    return FusedDPOTrainer(
        tiny_causal_lm(vocab_size=len(tok)), args=_dpo_args(tmp_path / "ours", **overrides),
        train_dataset=dataset, processing_class=tok,
    )


def _max_diff(ours, theirs, key):
    a, b = (torch.tensor(d[key], dtype=torch.float64) for d in (ours, theirs))
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"max_length": 12, "truncation_mode": "keep_end", "ld_alpha": 0.5}],
    ids=["default", "truncated-keep_end-ld_alpha"],
)
def test_reference_columns_match_trl_precompute(tok, preference_dataset, tmp_path, overrides):
    import datasets

    datasets.disable_caching()
    theirs = _trl_precomputed(tok, preference_dataset, tmp_path, **overrides)
    trainer = _fused_trainer(tok, preference_dataset, tmp_path, **overrides)
    prepared = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])

    # TRL's batches (the default): TRL's values.
    ours = reference_columns(trainer, prepared, "train", batch_size=trainer.args.per_device_train_batch_size)
    assert ours["prompt_ids"] == theirs["prompt_ids"]
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.features[key] == theirs.features[key]  # float32, as TRL stores them
        assert _max_diff(ours, theirs, key) <= 1e-5, key
    summary = trainer._reference_summary["train"]
    columns = (prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*columns)]
    max_length = overrides.get("max_length", 1024)
    assert summary.truncated_rows == sum(n > max_length for n in lengths)
    if overrides:
        assert summary.truncated_rows > 0

    # Length-sorted batches of another size: the same values up to float32 rounding of the sums.
    ours = reference_columns(trainer, prepared, "train", batch_size=3, sort_by_length=True)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        scale = max(abs(v) for v in theirs[key])
        assert _max_diff(ours, theirs, key) <= 4e-7 * scale, key


def test_reference_columns_cached_by_fingerprint(tok, preference_dataset, tmp_path):
    import datasets

    trainer = _fused_trainer(tok, preference_dataset, tmp_path)
    prepared = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    prepared.save_to_disk(str(tmp_path / "prepared"))
    on_disk = datasets.load_from_disk(str(tmp_path / "prepared"))
    calls = []
    original = trainer.compute_ref_log_probs

    def counting(model, inputs):
        calls.append(1)
        return original(model, inputs)

    trainer.compute_ref_log_probs = counting
    datasets.enable_caching()
    try:
        first = reference_columns(trainer, on_disk, "train")
        n = len(calls)
        second = reference_columns(trainer, on_disk, "train")
    finally:
        datasets.disable_caching()
    assert n > 0 and len(calls) == n, "the second call reads the cache"
    assert second["ref_chosen_logps"] == first["ref_chosen_logps"]


def test_fused_dpo_trainer_precompute_through_reference_columns(tok, preference_dataset, tmp_path, monkeypatch):
    """The trainers/dpo.py change proposed in the report (applied here with monkeypatch unless it is in already)."""
    import datasets

    from trainers import FusedDPOTrainer
    from trainers import extract

    datasets.disable_caching()
    calls = []
    original = extract.reference_columns

    def spy(trainer, dataset, name="train", batch_size=None):
        calls.append(name)
        return original(trainer, dataset, name=name, batch_size=batch_size)

    monkeypatch.setattr(extract, "reference_columns", spy)
    if "reference_columns" not in FusedDPOTrainer._precompute_ref_logps.__code__.co_names:

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._install_fused_heads()
            return extract.reference_columns(self, dataset, name=name, batch_size=batch_size)

        monkeypatch.setattr(FusedDPOTrainer, "_precompute_ref_logps", _precompute_ref_logps)

    theirs = _trl_precomputed(tok, preference_dataset, tmp_path)
    trainer = _fused_trainer(tok, preference_dataset, tmp_path)
    assert calls == ["train"]
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert _max_diff(trainer.train_dataset, theirs, key) <= 1e-5, key
    assert isinstance(trainer._reference_summary["train"], ExtractionSummary)


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows are named before tokenisation; a job scored in ranges gives the values of one call over the same ranges


@pytest.mark.parametrize("rows, message", [
    ({"prompt": PROMPTS[:3], "chosen": [GOOD[0], None, GOOD[2]], "rejected": BAD[:3]},
     r"null \(None or missing\) value in column 'chosen' at row 1: expected a value in every row"),
    ({"prompt": PROMPTS[:3], "completion": GOOD[:3], "label": [True, None, False]},
     r"null \(None or missing\) value in column 'label' at row 1"),
    ({"prompt": PROMPTS[:3], "completion": GOOD[:3], "label": [1, 0, 2]},
     r"column 'label' must hold True/False \(or 0/1\) labels, desirable or not; got 2 at row 2"),
    ({"prompt": [None, PROMPTS[1]], "completion": GOOD[:2]}, r"value in column 'prompt' at row 0"),
])
def test_bad_rows_are_named_before_tokenisation(rows, message, tokenizer, monkeypatch):
    from datasets import Dataset

    from trainers import extract

    monkeypatch.setattr(extract, "tokenize", lambda *a: pytest.fail("tokenised before the rows were checked"))
    with pytest.raises(ValueError, match=message):
        extract_logps(tiny_causal_lm(), Dataset.from_dict(rows), tokenizer, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=float("nan")), r"`beta` must be a finite number >= 0; got nan"),
    (dict(beta=-1.0), r"`beta` must be a finite number >= 0; got -1.0"),
    (dict(batch_size=2.5), r"batch_size must be a positive int; got 2.5"),
    (dict(max_length=2.5), r"max_length must be a positive int of tokens or None; got 2.5"),
])
def test_bad_arguments(kwargs, message, tokenizer):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": PROMPTS[:2], "chosen": GOOD[:2], "rejected": BAD[:2]})
    with pytest.raises(ValueError, match=message):
        extract_logps(tiny_causal_lm(), data, tokenizer, ref_model=tiny_causal_lm(seed=1), progress=False, **kwargs)


def test_a_job_scored_in_ranges_equals_one_call_per_range(tokenizer):
    """`LogpsJob.score` over [0, 3) and [3, 8) gives the values of the full-logits reference, and the same values
    however often it is called (the CLI's --resume relies on it)."""
    from datasets import Dataset

    from trainers.extract import prepare_logps

    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})
    model = tiny_causal_lm()
    job = prepare_logps(model, data, tokenizer, batch_size=2, progress=False, max_length=None)
    first = [job.score(range(0, 3)), job.score(range(3, 8))]
    again = [job.score(range(0, 3)), job.score(range(3, 8))]
    assert first == again
    columns = {k: first[0][k] + first[1][k] for k in job.score_columns}
    scored, summary = job.finish(columns)
    for i, row in enumerate(scored):
        p, c = split_ids(tokenizer, PROMPTS[i], GOOD[i])
        assert row["chosen_logps"] == pytest.approx(full_logits_logp(model, p, c), abs=1e-4)
    with pytest.raises(ValueError, match=r"finish needs the columns .* of all 8 rows"):
        job.finish(first[0])
