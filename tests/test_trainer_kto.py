"""FusedKTOTrainer against trl.KTOTrainer: same losses, metrics and weight updates, step by step."""

from __future__ import annotations

import pytest
import torch
import trl

from conftest import MetricsRecorder, base_args, compare_logs, forward_calls, snapshot, tiny_causal_lm, update_diff
from trainers import FusedKTOConfig, FusedKTOTrainer

RTOL = 1e-4
UPDATE_RTOL = 1e-3


def run_kto(trainer_cls, config_cls, dataset, tokenizer, tmp_path, *, kind="qwen3", ref=True, peft_config=None,
            **overrides):
    model = tiny_causal_lm(kind)
    ref_model = tiny_causal_lm(kind) if ref else None
    kwargs = dict(base_args(tmp_path / trainer_cls.__name__), beta=0.5, max_length=64)
    kwargs.update(overrides)
    rec = MetricsRecorder()
    trainer = trainer_cls(model=model, ref_model=ref_model, args=config_cls(**kwargs), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[rec.callback], peft_config=peft_config)
    before = snapshot(trainer.model)
    trainer.train()
    return rec.logs, before, snapshot(trainer.model), trainer


def parity(name, dataset, tokenizer, tmp_path, **kw):
    ours = run_kto(FusedKTOTrainer, FusedKTOConfig, dataset, tokenizer, tmp_path, **kw)
    theirs = run_kto(trl.KTOTrainer, trl.KTOConfig, dataset, tokenizer, tmp_path, **kw)
    worst = compare_logs(ours[0], theirs[0], rtol=RTOL)
    upd = update_diff(ours[1], ours[2], theirs[1], theirs[2])
    print(f"[kto parity] {name}: max metric rel diff {worst:.2e} {compare_logs.worst_key}, update rel diff {upd:.2e}")
    assert upd <= UPDATE_RTOL, f"{name}: weight updates differ by {upd:.2e}"
    return ours, theirs


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("kto-adamw", {}),
        ("kto-sgd-weights", {"optim": "sgd", "learning_rate": 1e-2, "desirable_weight": 1.3, "undesirable_weight": 0.7}),
        ("kto-grad-accum", {"gradient_accumulation_steps": 2}),
        ("apo-zero-unpaired", {"loss_type": "apo_zero_unpaired"}),
    ],
)
def test_kto_parity(name, overrides, kto_dataset, tokenizer, tmp_path):
    parity(name, kto_dataset, tokenizer, tmp_path, **overrides)


def test_kto_reference_forwards_run_before_the_policys(kto_dataset, tokenizer, tmp_path):
    """The reference's KL and completion forwards, then the policy's KL (no gradient) and completion forwards."""
    calls = forward_calls(FusedKTOTrainer, FusedKTOConfig, kto_dataset, tokenizer, tmp_path)
    assert calls == [("reference", False), ("reference", False), ("policy", False), ("policy", True)] * 2


def test_kto_bf16_reference_model_runs_at_the_policy_precision(kto_dataset, tokenizer, tmp_path):
    """A reference with the policy's weights scores exactly as the policy at step 0 under bf16 mixed precision."""
    logs = run_kto(FusedKTOTrainer, FusedKTOConfig, kto_dataset, tokenizer, tmp_path, bf16=True, max_steps=1)[0]
    assert logs[0]["kl"] == 0.0, logs[0]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-5)


def test_kto_parity_precomputed_reference(kto_dataset, tokenizer, tmp_path):
    ours, _ = parity("precompute-ref", kto_dataset, tokenizer, tmp_path, ref=False, precompute_ref_log_probs=True)
    assert ours[3].ref_model is None


def test_kto_parity_peft_reference_gemma2(kto_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    parity("peft-ref-gemma2", kto_dataset, tokenizer, tmp_path, kind="gemma2", ref=False, peft_config=lora,
           learning_rate=1e-2)


def test_kto_lora_on_lm_head(kto_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    logs, before, after, trainer = run_kto(FusedKTOTrainer, FusedKTOConfig, kto_dataset, tokenizer, tmp_path,
                                           ref=False, peft_config=lora, learning_rate=1e-2, max_steps=2)
    head_b = [n for n in after if "lm_head" in n and "lora_B" in n]
    assert head_b and not torch.equal(before[head_b[0]], after[head_b[0]])
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)


def test_kto_error_missing_columns(kto_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs"):
        FusedKTOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=FusedKTOConfig(**base_args(tmp_path)),
                        train_dataset=kto_dataset.remove_columns(["label"]), processing_class=tokenizer)


def test_kto_error_unknown_impl(kto_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not a known backend"):
        FusedKTOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(),
                        args=FusedKTOConfig(**base_args(tmp_path), lce_impl="fast-please"),
                        train_dataset=kto_dataset, processing_class=tokenizer)


def test_example_train_kto_smoke(tmp_path):
    from conftest import load_script

    module = load_script("examples/train_kto.py")
    summary = module.main(["--smoke", "--steps", "2", "--output-dir", str(tmp_path)])
    assert summary["backend"] == "torch" and summary["steps"] == 2
