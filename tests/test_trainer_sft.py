"""FusedSFTTrainer against trl.SFTTrainer: same losses, metrics and weight updates, step by step."""

from __future__ import annotations

import pytest
import torch
import trl

from conftest import MetricsRecorder, base_args, compare_logs, snapshot, tiny_causal_lm, update_diff
from trainers import FusedSFTConfig, FusedSFTTrainer

RTOL = 1e-4
UPDATE_RTOL = 1e-3


def run_sft(trainer_cls, config_cls, dataset, tokenizer, tmp_path, *, kind="qwen3", peft_config=None, **overrides):
    kwargs = dict(base_args(tmp_path / trainer_cls.__name__), max_length=64)
    kwargs.update(overrides)
    rec = MetricsRecorder()
    trainer = trainer_cls(model=tiny_causal_lm(kind), args=config_cls(**kwargs), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[rec.callback], peft_config=peft_config)
    before = snapshot(trainer.model)
    trainer.train()
    return rec.logs, before, snapshot(trainer.model), trainer


def parity(name, dataset, tokenizer, tmp_path, **kw):
    ours = run_sft(FusedSFTTrainer, FusedSFTConfig, dataset, tokenizer, tmp_path, **kw)
    theirs = run_sft(trl.SFTTrainer, trl.SFTConfig, dataset, tokenizer, tmp_path, **kw)
    worst = compare_logs(ours[0], theirs[0], rtol=RTOL)
    upd = update_diff(ours[1], ours[2], theirs[1], theirs[2])
    print(f"[sft parity] {name}: max metric rel diff {worst:.2e}, update rel diff {upd:.2e}")
    assert upd <= UPDATE_RTOL, f"{name}: weight updates differ by {upd:.2e}"
    return ours, theirs


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("completion-only-adamw", {}),
        ("completion-only-sgd", {"optim": "sgd", "learning_rate": 1e-2}),
        ("grad-accum", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
        ("dft", {"loss_type": "dft"}),
        ("label-smoothing", {"label_smoothing_factor": 0.1}),
        ("padding-free", {"padding_free": True, "max_length": None}),
        ("packing-bfd", {"packing": True, "per_device_train_batch_size": 2}),
    ],
)
def test_sft_parity(name, overrides, sft_dataset, tokenizer, tmp_path):
    ours, _ = parity(name, sft_dataset, tokenizer, tmp_path, **overrides)
    if name.startswith("pack") or name == "padding-free":
        assert ours[3].padding_free


def test_sft_parity_language_modeling_gemma2(lm_dataset, tokenizer, tmp_path):
    parity("lm-gemma2-softcap", lm_dataset, tokenizer, tmp_path, kind="gemma2")


def test_sft_parity_peft(sft_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    parity("peft", sft_dataset, tokenizer, tmp_path, peft_config=lora, learning_rate=1e-2)


def _full_logits_loss(trainer, batch, label_smoothing=0.0, z_loss=0.0):
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    mask = labels != -100
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(-1)
    lse = logits.logsumexp(-1)
    per_token = (1 - label_smoothing) * nll + label_smoothing * uniform + z_loss * lse**2
    return (per_token * mask).sum() / mask.sum()


def test_sft_z_loss_and_label_smoothing_match_full_logits(sft_dataset, tokenizer, tmp_path):
    args = FusedSFTConfig(**base_args(tmp_path), max_length=64, lce_z_loss=1e-2, label_smoothing_factor=0.1)
    trainer = FusedSFTTrainer(model=tiny_causal_lm(), args=args, train_dataset=sft_dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = trainer.compute_loss(trainer.model, dict(batch))
    reference = _full_logits_loss(trainer, batch, label_smoothing=0.1, z_loss=1e-2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, params)
    g_ref = torch.autograd.grad(reference, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_refuses_filter_mass_with_label_smoothing(sft_dataset, tokenizer, tmp_path):
    args = FusedSFTConfig(**base_args(tmp_path), max_length=64, label_smoothing_factor=0.1, lce_filter_mass=2.0**-8)
    with pytest.raises(ValueError, match="lce_filter_mass.*label_smoothing_factor"):
        FusedSFTTrainer(model=tiny_causal_lm(), args=args, train_dataset=sft_dataset, processing_class=tokenizer)


def test_sft_lora_on_lm_head(sft_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    args = FusedSFTConfig(**base_args(tmp_path, learning_rate=1e-2, max_steps=2), max_length=64)
    trainer = FusedSFTTrainer(model=tiny_causal_lm(), args=args, train_dataset=sft_dataset, processing_class=tokenizer,
                              peft_config=lora)
    head = trainer.model.get_base_model().get_output_embeddings()
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0, 0.1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = trainer.compute_loss(trainer.model, dict(batch))
    reference = _full_logits_loss(trainer, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    b0 = head.lora_B["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(b0, head.lora_B["default"].weight.detach())


def test_sft_error_missing_columns(sft_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs"):
        FusedSFTTrainer(model=tiny_causal_lm(), args=FusedSFTConfig(**base_args(tmp_path)),
                        train_dataset=sft_dataset.rename_column("completion", "answer"), processing_class=tokenizer)


def test_sft_error_model_without_head(sft_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no output embeddings"):
        FusedSFTTrainer(model=tiny_causal_lm().model, args=FusedSFTConfig(**base_args(tmp_path)),
                        train_dataset=sft_dataset, processing_class=tokenizer)


def test_sft_error_bad_z_loss(tmp_path):
    with pytest.raises(ValueError, match="lce_z_loss"):
        FusedSFTConfig(**base_args(tmp_path), lce_z_loss=-1.0)


def test_example_train_sft_smoke(tmp_path):
    from conftest import load_script

    module = load_script("examples/train_sft.py")
    summary = module.main(["--smoke", "--steps", "2", "--z-loss", "1e-4", "--output-dir", str(tmp_path)])
    assert summary["backend"] == "torch" and summary["steps"] == 2
