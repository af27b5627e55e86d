"""FusedDPOTrainer against trl.DPOTrainer: same losses, metrics and weight updates, step by step."""

from __future__ import annotations


import pytest
import torch
import trl

from conftest import (
    MetricsRecorder,
    add_head_bias,
    base_args,
    compare_logs,
    forward_calls,
    snapshot,
    tiny_causal_lm,
    update_diff,
)
from trainers import DataCollatorForPackedPreference, FusedDPOConfig, FusedDPOTrainer
from align_losses.fused import SequenceLayout, cu_seqlens_of

RTOL = 1e-4
UPDATE_RTOL = 1e-3
RESULTS: dict = {}


def run_dpo(trainer_cls, config_cls, dataset, tokenizer, tmp_path, *, kind="qwen3", model_fn=None, ref=True,
            peft_config=None, optim="adamw_torch", **overrides):
    model = model_fn() if model_fn else tiny_causal_lm(kind)
    ref_model = (tiny_causal_lm(kind) if not model_fn else model_fn()) if ref else None
    kwargs = dict(base_args(tmp_path / trainer_cls.__name__), optim=optim, beta=0.5, max_length=64)
    kwargs.update(overrides)
    args = config_cls(**kwargs)
    rec = MetricsRecorder()
    trainer = trainer_cls(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[rec.callback], peft_config=peft_config,
    )
    before = snapshot(trainer.model)
    trainer.train()
    return rec.logs, before, snapshot(trainer.model), trainer


def parity(name, dataset, tokenizer, tmp_path, **kw):
    ours = run_dpo(FusedDPOTrainer, FusedDPOConfig, dataset, tokenizer, tmp_path, **kw)
    theirs = run_dpo(trl.DPOTrainer, trl.DPOConfig, dataset, tokenizer, tmp_path, **kw)
    worst = compare_logs(ours[0], theirs[0], rtol=RTOL)
    upd = update_diff(ours[1], ours[2], theirs[1], theirs[2])
    RESULTS[name] = (worst, upd)
    print(f"[dpo parity] {name}: max metric rel diff {worst:.2e}, update rel diff {upd:.2e}")
    assert upd <= UPDATE_RTOL, f"{name}: weight updates differ by {upd:.2e}"
    return ours, theirs


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("sigmoid-adamw", {}),
        ("sigmoid-sgd", {"optim": "sgd", "learning_rate": 1e-2}),
        ("grad-accum", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
        ("weighted-list", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
        ("ipo", {"loss_type": ["ipo"]}),
        ("wpo", {"use_weighting": True}),
        ("ld_alpha", {"ld_alpha": 0.5}),
        ("robust-label-smoothing", {"loss_type": ["robust"], "label_smoothing": 0.2}),
    ],
)
def test_dpo_parity(name, overrides, preference_dataset, tokenizer, tmp_path):
    parity(name, preference_dataset, tokenizer, tmp_path, **overrides)


def test_dpo_parity_precomputed_reference(preference_dataset, tokenizer, tmp_path):
    ours, _ = parity("precompute-ref", preference_dataset, tokenizer, tmp_path, ref=False, precompute_ref_log_probs=True)
    assert ours[3].ref_model is None


def test_bf16_reference_model_runs_at_the_policy_precision(preference_dataset, tokenizer, tmp_path):
    """A reference with the policy's weights scores exactly as the policy at step 0 under bf16 mixed
    precision: rewards 0 and loss log 2, as TRL's DPOTrainer gives."""
    logs = run_dpo(FusedDPOTrainer, FusedDPOConfig, preference_dataset, tokenizer, tmp_path, bf16=True, max_steps=1)[0]
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0, logs[0]
    assert logs[0]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_reference_forward_runs_before_the_policys(preference_dataset, tokenizer, tmp_path):
    """Under FSDP the reference forward gathers a whole model; run first, it never meets the policy's activations."""
    calls = forward_calls(FusedDPOTrainer, FusedDPOConfig, preference_dataset, tokenizer, tmp_path)
    assert calls == [("reference", False), ("policy", True)] * 2


def test_peft_reference_forward_runs_before_the_policys(preference_dataset, tokenizer, tmp_path):
    """Without ``ref_model`` the adapter-free policy scores first, without gradient."""
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    calls = forward_calls(FusedDPOTrainer, FusedDPOConfig, preference_dataset, tokenizer, tmp_path, ref=False,
                          peft_config=lora)
    assert calls == [("policy", False), ("policy", True)] * 2


def test_dpo_parity_peft_reference(preference_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    parity("peft-ref", preference_dataset, tokenizer, tmp_path, ref=False, peft_config=lora, learning_rate=1e-2)


def test_dpo_parity_gemma2_softcap(preference_dataset, tokenizer, tmp_path):
    parity("gemma2-softcap", preference_dataset, tokenizer, tmp_path, kind="gemma2")


def test_dpo_parity_head_bias(preference_dataset, tokenizer, tmp_path):
    parity("head-bias", preference_dataset, tokenizer, tmp_path, model_fn=lambda: add_head_bias(tiny_causal_lm("qwen3")))


def test_plain_trl_config_accepted_and_evaluate(preference_dataset, tokenizer, tmp_path):
    logs, _, _, trainer = run_dpo(FusedDPOTrainer, trl.DPOConfig, preference_dataset, tokenizer, tmp_path, max_steps=1)
    assert logs and "rewards/accuracies" in logs[0]
    metrics = trainer.evaluate(preference_dataset)
    assert "eval_rewards/accuracies" in metrics and "eval_logits/chosen" in metrics


# ---------------------------------------------------------------------------------------------------------------------
# Padding-free


def test_packed_collator_and_unpack():
    collator = DataCollatorForPackedPreference(pad_token_id=0)
    batch = collator([
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 3, 6, 7, 8, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["sequence_lengths"].tolist() == [5, 3, 4, 4]
    assert "attention_mask" not in batch
    layout = SequenceLayout.of(batch["input_ids"], cu_seqlens_of(batch["sequence_lengths"]))
    mask = layout.arrange(batch["completion_mask"])
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    shifted = layout.arrange(batch["input_ids"][:, 1:].float(), shifted=True)
    assert shifted.tolist() == [[2, 3, 4, 5], [8, 9, 0, 0], [2, 3, 6, 0], [8, 10, 11, 0]]


def _per_sequence_logps(trainer, batch):
    with torch.no_grad():
        policy = trainer._policy_pass(trainer.model, batch)
        return trainer._sequence_logps(policy.tokens)


def test_padding_free_matches_padded(preference_dataset, tokenizer, tmp_path):
    """Packed and padded forwards give the same per-sequence log-probs; a leaking mask would not."""
    args = FusedDPOConfig(**base_args(tmp_path / "pf"), max_length=64, padding_free=True)
    trainer = FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=args,
                              train_dataset=preference_dataset, processing_class=tokenizer)
    assert isinstance(trainer.data_collator, DataCollatorForPackedPreference)
    examples = [trainer.train_dataset[i] for i in range(4)]
    packed = trainer.data_collator(examples)
    padded = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    trainer.model.eval()
    pc, pr = _per_sequence_logps(trainer, packed)
    qc, qr = _per_sequence_logps(trainer, padded)
    torch.testing.assert_close(pc, qc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pr, qr, rtol=1e-5, atol=1e-5)
    # The same packed row with an all-ones attention mask lets later sequences attend to earlier ones:
    # the comparison above would catch it.
    leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
    trainer._model_inputs_orig = trainer._model_inputs

    def leaky_inputs(inputs):
        kwargs, labels, layout = trainer._model_inputs_orig(inputs)
        kwargs["attention_mask"] = inputs["attention_mask"]
        return kwargs, labels, layout

    trainer._model_inputs = leaky_inputs
    lc, lr = _per_sequence_logps(trainer, leaky)
    assert not torch.allclose(lc[1:], qc[1:], rtol=1e-3, atol=1e-3)


def test_padding_free_training_matches_padded(preference_dataset, tokenizer, tmp_path):
    packed = run_dpo(FusedDPOTrainer, FusedDPOConfig, preference_dataset, tokenizer, tmp_path, padding_free=True)
    assert isinstance(packed[3].data_collator, DataCollatorForPackedPreference)
    padded = run_dpo(FusedDPOTrainer, FusedDPOConfig, preference_dataset, tokenizer, tmp_path)
    worst = compare_logs(packed[0], padded[0], rtol=RTOL)
    upd = update_diff(packed[1], packed[2], padded[1], padded[2])
    RESULTS["padding-free-vs-padded"] = (worst, upd)
    print(f"[dpo] padding-free vs padded: metrics {worst:.2e}, updates {upd:.2e}")
    assert upd <= UPDATE_RTOL


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on the LM head


def test_lora_on_lm_head_trains_and_matches_unfused(preference_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    args = FusedDPOConfig(**base_args(tmp_path / "lora", learning_rate=1e-2, max_steps=2), max_length=64)
    trainer = FusedDPOTrainer(model=tiny_causal_lm(), args=args, train_dataset=preference_dataset,
                              processing_class=tokenizer, peft_config=lora)
    head = trainer.model.get_base_model().get_output_embeddings()
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert isinstance(head, BaseTunerLayer)
    # The fused forward matches the model's own logits, adapter included (B is zero-initialised: perturb it).
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0, 0.1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    policy = trainer._policy_pass(trainer.model, batch)
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:]
    ref = logits[:, :-1].log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * policy.tokens.mask
    torch.testing.assert_close(policy.tokens.logprobs, ref, rtol=1e-5, atol=1e-5)
    # ... and its gradient reaches lora_A / lora_B of the head.
    (policy.tokens.logprobs.sum()).backward()
    assert head.lora_A["default"].weight.grad.abs().sum() > 0
    assert head.lora_B["default"].weight.grad.abs().sum() > 0
    trainer.model.zero_grad()
    b0 = head.lora_B["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(b0, head.lora_B["default"].weight.detach())


# ---------------------------------------------------------------------------------------------------------------------
# Errors before training


def test_error_unknown_impl(preference_dataset, tokenizer, tmp_path):
    args = FusedDPOConfig(**base_args(tmp_path), lce_impl="nope")
    with pytest.raises(ValueError, match="not a known backend"):
        FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=args,
                        train_dataset=preference_dataset, processing_class=tokenizer)


def test_error_impl_cannot_run(preference_dataset, tokenizer, tmp_path):
    from align_losses import backends

    unavailable = [n for n in backends.names() if n not in ("auto", "torch", "pytorch") and backends.get(n).available()]
    if not unavailable:
        pytest.skip("every backend can run here")
    args = FusedDPOConfig(**base_args(tmp_path), lce_impl=unavailable[0])
    with pytest.raises(ValueError, match="cannot run here"):
        FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=args,
                        train_dataset=preference_dataset, processing_class=tokenizer)


def test_error_model_without_head(preference_dataset, tokenizer, tmp_path):
    model = tiny_causal_lm()
    backbone = model.model  # Qwen3Model: no LM head
    args = FusedDPOConfig(**base_args(tmp_path))
    with pytest.raises(ValueError, match="no output embeddings"):
        FusedDPOTrainer(model=backbone, ref_model=tiny_causal_lm(), args=args,
                        train_dataset=preference_dataset, processing_class=tokenizer)


def test_error_missing_columns(preference_dataset, tokenizer, tmp_path):
    args = FusedDPOConfig(**base_args(tmp_path))
    bad = preference_dataset.remove_columns(["rejected"])
    with pytest.raises(ValueError, match="needs"):
        FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=args,
                        train_dataset=bad, processing_class=tokenizer)


def test_error_bad_memory_budget(tmp_path):
    with pytest.raises(ValueError, match="lce_memory_budget"):
        FusedDPOConfig(**base_args(tmp_path), lce_memory_budget=0)


@pytest.mark.parametrize("mass", [0.0, 1.0, -0.5])
def test_error_bad_filter_mass(tmp_path, mass):
    with pytest.raises(ValueError, match="lce_filter_mass"):
        FusedDPOConfig(**base_args(tmp_path), lce_filter_mass=mass)


def test_filter_mass_reaches_the_policy_head_only(tmp_path):
    from trainers._common import FusedTrainerMixin

    args = FusedDPOConfig(**base_args(tmp_path), lce_filter_mass=2.0**-8)
    trainer = type("T", (), {"args": args})()
    assert FusedTrainerMixin._head_settings(trainer, ("log_probs",)).backend_options == {"filter_mass": 2.0**-8}
    assert FusedTrainerMixin._head_settings(trainer, (), trained=False).backend_options == {}  # the reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error off CUDA, where no backend filters")
def test_filter_mass_off_cuda_fails_when_the_trainer_is_built(preference_dataset, tokenizer, tmp_path):
    args = FusedDPOConfig(**base_args(tmp_path), lce_filter_mass=2.0**-8)
    with pytest.raises(ValueError, match="filter_mass"):
        FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=args,
                        train_dataset=preference_dataset, processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# The example script


def test_example_train_dpo_smoke(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("train_dpo", ROOT / "examples" / "train_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--smoke", "--steps", "2", "--output-dir", str(tmp_path / "a")])
    assert summary["backend"] == "torch" and summary["steps"] == 2
    # --model: any local HF model directory (TRL then loads the reference from it)
    model_dir = tmp_path / "model"
    tiny_causal_lm(vocab_size=384).save_pretrained(model_dir)
    summary = module.main(["--smoke", "--steps", "1", "--model", str(model_dir), "--output-dir", str(tmp_path / "b")])
    assert summary["steps"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# The fused forward itself, against the model's own logits


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_tied", "gemma2", "cohere", "bias", "lora_head"])
def test_fused_forward_matches_logits(kind):
    from trainers.fused_forward import FusedHeadSettings, install_fused_head

    model = tiny_causal_lm("qwen3" if kind in ("bias", "lora_head") else kind)
    if kind == "bias":
        add_head_bias(model)
    if kind == "lora_head":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    inner = model.get_base_model() if kind == "lora_head" else model
    fields = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs", "logsumexp")
    install_fused_head(inner, FusedHeadSettings(outputs=fields))
    torch.manual_seed(0)
    ids = torch.randint(1, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, mean_logits_all=True)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # softcap / scale applied by the model
    logp = logits.log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    valid = target != -100
    expected = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1) * valid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logits, logits[:, :-1].mean(-1) * valid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logsumexp, logits[:, :-1].logsumexp(-1) * valid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_sum_sq_probs, (2 * logp).logsumexp(-1) * valid, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, (logits[:, :-1].argmax(-1) == target) & valid)
    # Every position, prompt and padding included: the linear identity (or the exact soft-capped mean)
    torch.testing.assert_close(out.mean_logits_all, logits.mean(-1), rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out.log_probs.sum(), params), torch.autograd.grad(expected.sum(), params)):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


def test_fused_forward_runs_as_head_call_under_zero3_marks():
    """A head with ZeRO-3 parameters (``ds_id``) is used through its own call, so ZeRO's module hooks fire."""
    from trainers.fused_forward import FusedHeadSettings, install_fused_head

    model = tiny_causal_lm("qwen3_tied")
    install_fused_head(model, FusedHeadSettings())
    torch.manual_seed(1)
    ids = torch.randint(1, 300, (2, 7))
    plain = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    head = model.get_output_embeddings()
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(("pre", args[0].shape)))
    head.register_forward_hook(lambda module, args, out: calls.append(("post", type(out).__name__)))
    head.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    try:
        hooked = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    finally:
        del head.weight.ds_id
    assert calls == [("pre", torch.Size([2, 7, 64])), ("post", "tuple")]
    assert "forward" not in head.__dict__  # the instance override is gone after the call
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    # An instance-level forward installed by someone else (a hook library, torch.compile) is put back.
    own_forward = head.forward.__func__.__get__(head)
    head.forward = own_forward
    head.weight.ds_id = 0
    try:
        again = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    finally:
        del head.weight.ds_id
    assert head.__dict__["forward"] is own_forward
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


@pytest.mark.parametrize("peft_head", ["lora", "modules_to_save"])
def test_error_head_weight_in_child_under_zero3(peft_head):
    from peft import LoraConfig, get_peft_model

    from trainers.fused_forward import FusedHeadSettings, install_fused_head

    if peft_head == "lora":
        config = LoraConfig(r=4, target_modules=["lm_head"])
    else:
        config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(tiny_causal_lm("qwen3"), config)
    install_fused_head(model.get_base_model(), FusedHeadSettings())
    for p in model.get_base_model().lm_head.parameters():
        p.ds_id = 0
    ids = torch.randint(1, 300, (1, 5))
    with pytest.raises(ValueError, match="weight lives in a child module .* under DeepSpeed ZeRO-3"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)
