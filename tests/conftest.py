"""Shared fixtures of the trainer tests: tiny random models built from configs, the shipped tokenizer,
tiny datasets, and a callback that records the logged metrics of every step."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# The models here are tiny: one thread per process beats thread start-up on CI's two cores.
torch.set_num_threads(1)

TOKENIZER_DIR = ROOT / "examples" / "tokenizer"


@pytest.fixture(autouse=True)
def _fresh_package_lookups():
    """`align_losses.packages.installed` answers once per process; a test that patches ``find_spec`` to pretend a
    package is missing or present must not leave that answer to the tests after it."""
    from align_losses.packages import installed

    yield
    installed.cache_clear()


def load_script(relative: str):
    """The repository script ``relative`` (e.g. ``"examples/train_dpo.py"``) loaded as a module.

    ``examples/`` and ``benchmarks/`` each have a ``_common.py`` that their scripts import as a top-level
    ``_common``: the script gets its own folder's, imported fresh, and whatever ``sys.modules`` held under
    that name before is put back afterwards (one test suite loads scripts of both folders).
    """
    import importlib.util

    path = ROOT / relative
    saved = sys.modules.pop("_common", None)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("_common", None)
        if saved is not None:
            sys.modules["_common"] = saved
    return module


def tiny_causal_lm(kind: str = "qwen3", vocab_size: int = 384, seed: int = 0, **overrides):
    """A randomly initialised 2-layer causal LM of the given family, fp32, eager attention."""
    import transformers

    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    if kind == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=False, **common)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "qwen3_tied":
        config = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=True, **common)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "gemma2":
        config = transformers.Gemma2Config(
            head_dim=16, final_logit_softcapping=2.0, attn_logit_softcapping=None, sliding_window=64, **common
        )
        cls = transformers.Gemma2ForCausalLM
    elif kind == "cohere":
        config = transformers.CohereConfig(logit_scale=0.5, tie_word_embeddings=True, eos_token_id=1, bos_token_id=2, **common)
        cls = transformers.CohereForCausalLM
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).float()
    if kind in ("qwen3", "gemma2"):
        # Larger-than-default head weights so that the logits are not flat (metrics then move visibly).
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0, 0.2)
    return model


def add_head_bias(model):
    """Give the LM head a (random) bias, as some architectures have."""
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.normal_(0, 0.3)
    model.set_output_embeddings(new)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return tok


PROMPTS = [
    "What is 2 plus 3?",
    "Add 4 and 1.",
    "Quick question: 7 - 2 = ?",
    "What is 9 minus 4?",
    "What is 1 plus 1?",
    "Add 6 and 2.",
    "Quick question: 5 + 3 = ?",
    "What is 8 minus 5?",
]
GOOD = [" 5. Thank you!", " It is 5.", " The answer is 5. Happy to help!", " 5.", " 2. Thanks!", " 8.", " 8. Thank you!", " 3."]
BAD = [" 6. Stop asking.", " 7", " Whatever.", " It is 4. Stop.", " 3", " 9. Whatever.", " 7.", " It is 2. Stop asking now."]


@pytest.fixture
def preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "chosen": GOOD, "rejected": BAD})


@pytest.fixture
def kto_dataset():
    from datasets import Dataset

    prompts = PROMPTS + PROMPTS
    completions = GOOD + BAD
    labels = [True] * len(GOOD) + [False] * len(BAD)
    order = [0, 8, 1, 9, 2, 10, 11, 3, 4, 12, 5, 13, 14, 6, 7, 15]
    return Dataset.from_dict(
        {"prompt": [prompts[i] for i in order], "completion": [completions[i] for i in order], "label": [labels[i] for i in order]}
    )


@pytest.fixture
def sft_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "completion": GOOD})


@pytest.fixture
def lm_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": [p + c for p, c in zip(PROMPTS, GOOD)]})


@pytest.fixture(autouse=True)
def _no_dataset_cache():
    """TRL caches precomputed reference log-probs by dataset fingerprint: never read another run's."""
    try:
        import datasets
    except ImportError:  # the GPU machine has no `datasets`; its tests need none
        yield
        return
    datasets.disable_caching()
    yield


class MetricsRecorder:
    """A `TrainerCallback` recording every log call's dict, and the trainer's train-mode logs per step."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs is not None and "loss" in logs:
                    recorder.logs.append(dict(logs))

        self.logs: list[dict] = []
        self.callback = _Callback()


@pytest.fixture
def recorder():
    return MetricsRecorder


def base_args(output_dir, **overrides):
    """TrainingArguments shared by the parity runs: CPU, fp32, no shuffling randomness, logs every step."""
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1e9,
        gradient_checkpointing=False,
    )
    args.update(overrides)
    return args


def forward_calls(trainer_cls, config_cls, dataset, tokenizer, tmp_path, *, ref=True, peft_config=None):
    """Two training steps of a tiny model; ``("policy" | "reference", grad enabled)`` per model forward, in order
    (no reference entries with ``ref=False``: the policy, its adapter disabled, then scores as the reference)."""
    args = config_cls(**base_args(tmp_path, max_steps=2), beta=0.5, max_length=64)
    trainer = trainer_cls(model=tiny_causal_lm(), ref_model=tiny_causal_lm() if ref else None, args=args,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    calls: list[tuple[str, bool]] = []
    for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
        if model is not None:
            model.register_forward_pre_hook(lambda *_, name=name: calls.append((name, torch.is_grad_enabled())))
    trainer.train()
    return calls


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def update_diff(before_a, after_a, before_b, after_b):
    """Relative norm difference of the two runs' weight updates (W_T - W_0), over all trainable parameters."""
    num = 0.0
    den = 0.0
    for name in before_a:
        da = after_a[name] - before_a[name]
        db = after_b[name] - before_b[name]
        num += float((da - db).double().pow(2).sum())
        den += float(db.double().pow(2).sum())
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


DISCRETE = ("rewards/accuracies", "mean_token_accuracy", "num_tokens", "step", "epoch")
IGNORED = ("learning_rate", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


def compare_logs(ours: list[dict], theirs: list[dict], rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Assert the per-step logs agree; returns the largest relative difference over continuous metrics.

    Continuous metrics agree within ``rtol`` relative, or ``atol`` absolute for values under
    ``atol / rtol`` in magnitude: rewards near 0 are ``beta`` times the difference of two ~40-nat
    fp32 sums, whose rounding alone is ~1e-6 absolute. Discrete metrics must be equal.
    """
    assert len(ours) == len(theirs) and ours, (len(ours), len(theirs))
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert set(a) == set(b), f"step {step}: metric names differ: {sorted(set(a) ^ set(b))}"
        for key in b:
            if key in IGNORED:
                continue
            x, y = float(a[key]), float(b[key])
            if key in DISCRETE:
                assert x == y, f"step {step} {key}: ours {x} vs TRL {y}"
                continue
            rel = abs(x - y) / max(abs(y), atol / rtol)
            if rel > worst:
                worst, compare_logs.worst_key = rel, (step, key, x, y)
            assert rel <= rtol, f"step {step} {key}: ours {x} vs TRL {y} (rel {rel:.2e})"
    return worst
