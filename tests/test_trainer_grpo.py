"""FusedGRPOTrainer against trl.GRPOTrainer: same completions, losses, metrics and weight updates (fp32) for every
``loss_type`` and ``importance_sampling_level`` and the settings around them (reference model or adapter, several
iterations, truncation masks, entropy mask and bonus, temperature, soft-cap, evaluation), with a spy proving
which head ran; its per-token log-probs, entropies and gradients against float64 full logits (and, in bf16, TRL's
against the same); no ``[tokens, V]`` tensor; its errors; the example's smoke run.

The shared helpers (`rl_model`, `rl_args`, `HeadSpy`, `rl_parity`, `reward_digits`) are used by
test_trainer_rloo.py too.
"""

from __future__ import annotations

import types

import pytest
import torch
import trl

from conftest import PROMPTS, MetricsRecorder, base_args, compare_logs, snapshot, tiny_causal_lm, update_diff
from trainers import FusedGRPOConfig, FusedGRPOTrainer

RTOL = 2e-5  # logged metrics (conftest.compare_logs: relative, or 1e-5 absolute near zero)
UPDATE_RTOL = 1e-5  # relative norm difference of the weight updates W_T - W_0
EOS_BIAS = 4.0  # the sampler's bias for EOS: completions of mixed lengths, some truncated

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # trl.GRPOConfig.loss_type
TIMING = ("step_time",)


def reward_digits(completions, **kwargs):
    """A deterministic reward in [0, 1) that varies between completions (a hash of the text)."""
    return [(sum(ord(ch) * (i + 1) for i, ch in enumerate(c)) % 97) / 97 for c in completions]


@pytest.fixture(autouse=True)
def _no_gc_after_training(monkeypatch):
    """`Trainer.train` ends in accelerate's `free_memory`, a full `gc.collect()` (0.5 s and more per run in a long
    pytest process, most of a tiny RL run's time); CPU has no device cache to clear."""
    import accelerate.utils.memory

    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda garbage_collection=False: None)


@pytest.fixture
def prompt_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS})


def rl_model(tmp_path, *, saved: bool = False, dtype: torch.dtype = torch.float32, kind: str = "qwen3"):
    """A tiny model (conftest's ``kind``); ``saved``: written to ``tmp_path / "init"`` and named there, so that
    TRL can load the same weights as the reference model (``beta > 0``)."""
    model = (_tiny_moe() if kind == "qwen3_moe" else tiny_causal_lm(kind)).to(dtype)
    if saved:
        path = tmp_path / "init"
        if not path.exists():
            model.save_pretrained(path)
        model.config._name_or_path = str(path)
    return model


def _tiny_moe(vocab_size: int = 384):
    """A 2-layer Qwen3-MoE (4 experts, 2 per token) whose router loss counts (coefficient 0.5)."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        output_router_logits=True, router_aux_loss_coef=0.5, vocab_size=vocab_size, max_position_embeddings=256,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    return model


def rl_args(config_cls, tmp_path, **overrides):
    """A config of short, seeded, sampled generations (EOS favoured) and fp32 steps on CPU."""
    kwargs = dict(base_args(tmp_path / config_cls.__name__, max_steps=2, learning_rate=0.1, optim="sgd"),
                  per_device_train_batch_size=8, num_generations=4, max_completion_length=8, beta=0.0,
                  generation_kwargs={"sequence_bias": [[[0], EOS_BIAS]]})
    kwargs.update(overrides)
    return config_cls(**kwargs)


class HeadSpy:
    """Which head scored the tokens: our core's calls (grad mode, temperature, outputs of each), TRL's chunked
    head's calls, and whether the LM head module ran outside ``generate`` (it must not: the fused heads read its
    weight without calling it; generation calls it, which shows that the hook works)."""

    def __init__(self, monkeypatch):
        import align_losses
        import trl.trainer.utils as trl_utils

        self.ours: list[tuple[bool, float, tuple]] = []
        self.trl_calls = 0
        self.head_calls: list[bool] = []  # True: inside generate
        self._generating = 0
        real_core, real_trl = align_losses.linear_token_stats, trl_utils._ChunkedLogProbFunction

        def core(*args, **kwargs):
            self.ours.append((torch.is_grad_enabled(), kwargs.get("temperature"), tuple(kwargs.get("outputs", ()))))
            return real_core(*args, **kwargs)

        def trl_apply(*args):
            self.trl_calls += 1
            return real_trl.apply(*args)

        monkeypatch.setattr(align_losses, "linear_token_stats", core)
        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=trl_apply))

    def watch(self, model) -> None:
        """Hook ``model``'s LM head and mark its ``generate`` calls (before training)."""
        generate = model.generate

        def counting_generate(*args, **kwargs):
            self._generating += 1
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating -= 1

        model.generate = counting_generate
        model.get_output_embeddings().register_forward_hook(
            lambda *_: self.head_calls.append(self._generating > 0))

    def assert_ours(self):
        assert self.ours and self.trl_calls == 0, (len(self.ours), self.trl_calls)
        self.assert_head_only_in_generate()

    def assert_trls(self):
        assert self.trl_calls > 0 and not self.ours, (len(self.ours), self.trl_calls)
        self.assert_head_only_in_generate()

    def assert_head_only_in_generate(self):
        assert self.head_calls and all(self.head_calls), "the LM head module ran outside generate"


def run_rl(trainer_cls, config_cls, dataset, tokenizer, tmp_path, monkeypatch, *, saved=False, as_path=False,
           peft_config=None, reward=reward_digits, dtype=torch.float32, kind="qwen3", **overrides):
    """Train a fresh tiny model (``as_path``: passed as its saved path, which TRL loads); returns
    ``(per-step logs without timings, W_0, W_T, trainer, spy)``."""
    model = rl_model(tmp_path, saved=saved or as_path, dtype=dtype, kind=kind)
    spy = HeadSpy(monkeypatch)
    if as_path:
        model = model.config._name_or_path
    else:
        spy.watch(model)
    rec = MetricsRecorder()
    trainer = trainer_cls(model=model, reward_funcs=reward, args=rl_args(config_cls, tmp_path, **overrides),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[rec.callback],
                          peft_config=peft_config)
    if as_path:
        spy.watch(trainer.model)
    before = snapshot(trainer.model)
    trainer.train()
    logs = [{k: v for k, v in log.items() if k not in TIMING} for log in rec.logs]
    return logs, before, snapshot(trainer.model), trainer, spy


def rl_parity(ours_cls, ours_config, trl_cls, trl_config, name, dataset, tokenizer, tmp_path, *, rtol=RTOL,
              update_rtol=UPDATE_RTOL, **kw):
    """Both trainers from the same seed and weights: completions (hence rewards and lengths), losses, every logged
    metric and the weight update agree; our head ran in ours, TRL's in TRL's. Returns both runs."""
    with pytest.MonkeyPatch.context() as mp:
        ours = run_rl(ours_cls, ours_config, dataset, tokenizer, tmp_path, mp, **kw)
    with pytest.MonkeyPatch.context() as mp:
        theirs = run_rl(trl_cls, trl_config, dataset, tokenizer, tmp_path, mp, **kw)
    ours[4].assert_ours()
    theirs[4].assert_trls()
    worst = compare_logs(ours[0], theirs[0], rtol=rtol)
    upd = update_diff(ours[1], ours[2], theirs[1], theirs[2])
    print(f"[{ours_cls.__name__} parity] {name}: max metric rel diff {worst:.2e}, update rel diff {upd:.2e}")
    assert upd <= update_rtol, f"{name}: weight updates differ by {upd:.2e}"
    assert any(float(log["grad_norm"]) > 0 for log in ours[0])
    return ours, theirs


def grpo_parity(name, dataset, tokenizer, tmp_path, **kw):
    """`rl_parity` of FusedGRPOTrainer against trl.GRPOTrainer."""
    return rl_parity(FusedGRPOTrainer, FusedGRPOConfig, trl.GRPOTrainer, trl.GRPOConfig, name, dataset, tokenizer,
                     tmp_path, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with TRL


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_parity_loss_types(loss_type, level, prompt_dataset, tokenizer, tmp_path):
    """Two iterations per generation: the second step's importance ratios differ from 1 (old log-probs from the
    no-gradient pass), so clipping, SAPO's gate and VESPO's weights act."""
    ours, _ = grpo_parity(f"{loss_type}/{level}", prompt_dataset, tokenizer, tmp_path, loss_type=loss_type,
                          importance_sampling_level=level, num_iterations=2)
    # Passes per generation: the old policy's (no gradient) and two policy passes (gradient, entropy).
    spy = ours[4]
    assert [g for g, _, _ in spy.ours] == [False, True, True]
    assert all(out == ("entropy",) for g, _, out in spy.ours if g)
    assert all(out == () for g, _, out in spy.ours if not g)


@pytest.mark.parametrize(
    "name,overrides",
    [
        # beta > 0: TRL loads the reference model from the policy's path; the KL term and the `kl` metric.
        ("beta-ref-model", dict(saved=True, beta=0.1, num_iterations=2)),
        ("mask-truncated", dict(mask_truncated_completions=True)),
        ("top-entropy-quantile", dict(top_entropy_quantile=0.5, loss_type="grpo")),
        # The entropy bonus takes a gradient through our entropy.
        ("entropy-bonus", dict(entropy_coef=0.05)),
        ("temperature", dict(temperature=0.7, num_iterations=2, loss_type="bnpo")),
        # Generation every 2 accumulation steps out of 1 per optimizer step: the old-policy pass runs.
        ("grad-accum-misaligned", dict(gradient_accumulation_steps=1, steps_per_generation=2,
                                       per_device_train_batch_size=4)),
        # Gemma-2's final logit soft-cap, read from the config, under a sampling temperature.
        ("gemma2-softcap-temperature", dict(kind="gemma2", temperature=0.7, num_iterations=2)),
        # MoE: TRL asks the fused call for the router loss (`outputs.aux_loss`) and adds it with its coefficient.
        ("moe-router-loss", dict(kind="qwen3_moe")),
        # The model as a path: TRL loads the policy and the reference; our head goes on both after.
        ("model-path-beta", dict(as_path=True, beta=0.1, loss_type="cispo")),
        # TR-DPO: TRL mixes the policy into the reference model in place; our head stays on it.
        ("sync-ref-model", dict(saved=True, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1,
                                ref_model_mixup_alpha=0.5)),
        ("sequence-beta-truncated", dict(saved=True, beta=0.05, importance_sampling_level="sequence",
                                         mask_truncated_completions=True, temperature=1.3, loss_type="dr_grpo")),
    ],
)
def test_grpo_parity_settings(name, overrides, prompt_dataset, tokenizer, tmp_path):
    ours, theirs = grpo_parity(name, prompt_dataset, tokenizer, tmp_path, **overrides)
    temperature = overrides.get("temperature", 1.0)
    assert all(t == temperature for _, t, _ in ours[4].ours)
    if overrides.get("beta"):
        assert "kl" in ours[0][0] and ours[3].ref_model is not None
        assert any(float(log["kl"]) > 0 for log in ours[0])
    if overrides.get("kind") == "qwen3_moe":
        assert all(float(log["aux_loss"]) > 0 for log in ours[0])
    if overrides.get("mask_truncated_completions"):
        # Some completions end with EOS and some are cut: the mask matters.
        assert any(0 < float(log["completions/clipped_ratio"]) < 1 for log in ours[0])


def test_grpo_parity_peft_reference_adapter(prompt_dataset, tokenizer, tmp_path):
    """PEFT with beta > 0: the reference pass is the policy with its adapter disabled, through our head."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ours, _ = grpo_parity("peft-beta", prompt_dataset, tokenizer, tmp_path, peft_config=lora, beta=0.1,
                          learning_rate=5e-2)
    assert any(float(log["kl"]) > 0 for log in ours[0])
    assert [g for g, _, _ in ours[4].ours] == [False, True, False, True]


def test_grpo_parity_bf16_model_cast_lm_head_to_fp32(prompt_dataset, tokenizer, tmp_path):
    """A bf16 model with ``cast_lm_head_to_fp32``: TRL keeps the head's weight in fp32, ours then runs the head in
    fp32 outside autocast (`FusedHeadSettings.fp32_head`), the hidden states cast up, as TRL's head does."""
    ours, _ = grpo_parity("bf16-cast-lm-head-fp32", prompt_dataset, tokenizer, tmp_path, dtype=torch.bfloat16,
                          cast_lm_head_to_fp32=True, rtol=1e-4, update_rtol=1e-2)
    assert ours[3].model.lm_head.weight.dtype == torch.float32
    assert ours[3].model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_grpo_parity_evaluate(prompt_dataset, tokenizer, tmp_path):
    """`evaluate()` (TRL's `prediction_step` -> `compute_loss`, eval-mode generation) after training: the same
    eval loss and metrics as TRL's, with our head."""
    results = []
    for cls, config_cls in ((FusedGRPOTrainer, FusedGRPOConfig), (trl.GRPOTrainer, trl.GRPOConfig)):
        with pytest.MonkeyPatch.context() as mp:
            spy = HeadSpy(mp)
            trainer = cls(model=rl_model(tmp_path), reward_funcs=reward_digits,
                          args=rl_args(config_cls, tmp_path, per_device_eval_batch_size=8, beta=0.0),
                          train_dataset=prompt_dataset, eval_dataset=prompt_dataset, processing_class=tokenizer)
            trainer.train()
            calls = len(spy.ours)
            results.append(trainer.evaluate())
            assert (len(spy.ours) > calls) == (cls is FusedGRPOTrainer)
    ours, theirs = results
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key.endswith(("runtime", "per_second", "step_time")) or key == "epoch":
            continue
        assert ours[key] == pytest.approx(value, rel=RTOL, abs=1e-6), (key, ours[key], value)
    assert "eval_loss" in ours and "eval_entropy" in ours


# ---------------------------------------------------------------------------------------------------------------------
# Against a float64 full-logits reference


def _full_logits_reference(model, input_ids, attention_mask, keep, temperature):
    """float64 log-probs and entropies of the last ``keep`` labels, from the model's own logits."""
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings()
    logits = (hidden.double() @ head.weight.double().T) / temperature
    logp = logits[:, -keep - 1:-1].log_softmax(-1)
    labels = input_ids[:, -keep:]
    token = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_grpo_logps_match_float64_reference(temperature, prompt_dataset, tokenizer, tmp_path):
    args = rl_args(FusedGRPOConfig, tmp_path, temperature=temperature)
    trainer = FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits, args=args,
                               train_dataset=prompt_dataset, processing_class=tokenizer)
    torch.manual_seed(3)
    ids = torch.randint(2, len(tokenizer), (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the prompt
    keep = 5
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                    compute_entropy=True)
    ref_logps, ref_entropy = _full_logits_reference(trainer.model, ids, mask, keep, temperature)
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    # Gradient of a sum of log-probs and entropies, against autograd through the full logits.
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    ours = torch.autograd.grad((logps.sum() + 0.3 * entropies.sum()), params)
    hidden = trainer.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = trainer.model.lm_head(hidden).double()[:, -keep - 1:-1] / temperature
    logp = logits.log_softmax(-1)
    reference = logp.gather(-1, ids[:, -keep:].unsqueeze(-1)).sum() - 0.3 * (logp.exp() * logp).sum()
    for a, b in zip(ours, torch.autograd.grad(reference, params)):
        assert (a.double() - b).norm() <= 1e-5 * b.norm() + 1e-9


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_grpo_bf16_logps_closer_to_float64_than_trl(device, prompt_dataset, tokenizer, tmp_path):
    """Under bf16 autocast (TRL's default `bf16=True`) on peaked logits (std ~6.4): from the same bf16 hidden states
    and weight, our log-probs are within 1e-4 of float64 full logits; TRL's head, which rounds its logit tiles to
    bf16, is off by several hundredths per token and tenths of a nat per sequence. (Why the parity tests run fp32.)
    On CUDA both heads run their Triton kernels."""
    ids = torch.randint(2, len(tokenizer), (4, 40), generator=torch.Generator().manual_seed(0)).to(device)
    mask, keep = torch.ones_like(ids), 32
    errors = {}
    for cls, config_cls in ((FusedGRPOTrainer, FusedGRPOConfig), (trl.GRPOTrainer, trl.GRPOConfig)):
        model = rl_model(tmp_path)
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)
        args = rl_args(config_cls, tmp_path, bf16=True, use_cpu=device == "cpu")
        trainer = cls(model=model, reward_funcs=reward_digits, args=args, train_dataset=prompt_dataset,
                      processing_class=tokenizer)
        assert trainer.model.device.type == device
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
            with trainer.accelerator.autocast():
                hidden = trainer.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = hidden[:, -keep - 1:-1].to(torch.bfloat16).double() @ model.lm_head.weight.to(torch.bfloat16).double().T
        assert 5 < float(logits.std()) < 8
        reference = logits.log_softmax(-1).gather(-1, ids[:, -keep:, None]).squeeze(-1)
        err = logps.double() - reference
        errors[cls] = (float(err.abs().max()), float(err.sum(-1).abs().max()))
    (ours, ours_seq), (theirs, theirs_seq) = errors[FusedGRPOTrainer], errors[trl.GRPOTrainer]
    assert ours < 1e-4 and ours_seq < 1e-4, errors
    assert theirs > 100 * ours and theirs_seq > 1000 * ours_seq, errors


def test_grpo_temperature_read_on_every_call(prompt_dataset, tokenizer, tmp_path, monkeypatch):
    """A temperature changed after construction (a schedule) is the one the next call divides the logits by."""
    trainer = FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits,
                               args=rl_args(FusedGRPOConfig, tmp_path), train_dataset=prompt_dataset,
                               processing_class=tokenizer)
    ids = torch.randint(2, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    trainer.temperature = 0.5
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)
    ref, _ = _full_logits_reference(trainer.model, ids, mask, 4, 0.5)
    torch.testing.assert_close(logps.double(), ref, rtol=1e-5, atol=1e-5)


def test_grpo_lora_on_lm_head_is_trained(prompt_dataset, tokenizer, tmp_path):
    """TRL refuses a LoRA adapter on ``lm_head`` (its head would ignore it); ours reads and trains it."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    trainer = FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits,
                               args=rl_args(FusedGRPOConfig, tmp_path, max_steps=2), train_dataset=prompt_dataset,
                               processing_class=tokenizer, peft_config=lora)
    head = trainer.model.get_base_model().get_output_embeddings()
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0, 0.1)
    ids = torch.randint(2, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits.double()[:, -5:-1]
    ref = logits.log_softmax(-1).gather(-1, ids[:, -4:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps.double(), ref, rtol=1e-5, atol=1e-5)
    b0 = head.lora_B["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(b0, head.lora_B["default"].weight.detach())


@pytest.mark.parametrize("trainer_cls,config_cls", [(FusedGRPOTrainer, FusedGRPOConfig), (trl.GRPOTrainer, trl.GRPOConfig)])
def test_grpo_no_tokens_by_vocab_tensor(trainer_cls, config_cls, prompt_dataset, tokenizer, tmp_path):
    """The policy pass (forward and backward) and a no-gradient pass build no tensor of ``labelled tokens x V``
    elements or more with ours (torch backend, 8-token tiles); TRL's head on CPU does (which shows the check
    can fail)."""
    from test_trainer_orpo import VocabSizedTensorDetector

    extra = dict(lce_impl="torch", lce_token_chunk=8) if trainer_cls is FusedGRPOTrainer else {}
    trainer = trainer_cls(model=rl_model(tmp_path), reward_funcs=reward_digits,
                          args=rl_args(config_cls, tmp_path, **extra), train_dataset=prompt_dataset,
                          processing_class=tokenizer)
    rows, prompt, keep = 8, 6, 16
    ids = torch.randint(2, len(tokenizer), (rows, prompt + keep), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    detector = VocabSizedTensorDetector(limit=rows * keep * vocab)  # every completion token is labelled
    assert rows * keep > trainer.model.config.hidden_size  # the head's weight and its gradient stay under the limit
    with detector:
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                        compute_entropy=True)
        (logps.sum() + entropies.sum()).backward()
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    if trainer_cls is FusedGRPOTrainer:
        assert not detector.offenders, detector.offenders[:5]
    else:
        assert detector.offenders


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_grpo_error_filter_mass_with_entropy_bonus(prompt_dataset, tokenizer, tmp_path):
    args = rl_args(FusedGRPOConfig, tmp_path, entropy_coef=0.01, lce_filter_mass=2.0**-8)
    with pytest.raises(ValueError, match="lce_filter_mass.*entropy bonus"):
        FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits, args=args,
                         train_dataset=prompt_dataset, processing_class=tokenizer)


def test_grpo_error_beta_without_reference_path(prompt_dataset, tokenizer, tmp_path):
    args = rl_args(FusedGRPOConfig, tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="_name_or_path"):
        FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits, args=args,
                         train_dataset=prompt_dataset, processing_class=tokenizer)


def test_grpo_error_missing_prompt_column(prompt_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs \\{'prompt'\\}"):
        FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits,
                         args=rl_args(FusedGRPOConfig, tmp_path),
                         train_dataset=prompt_dataset.rename_column("prompt", "question"), processing_class=tokenizer)


def test_grpo_error_unknown_impl(prompt_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="lce_impl"):
        FusedGRPOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits,
                         args=rl_args(FusedGRPOConfig, tmp_path, lce_impl="nope"), train_dataset=prompt_dataset,
                         processing_class=tokenizer)


def test_example_train_grpo_smoke(tmp_path):
    from conftest import load_script

    module = load_script("examples/train_grpo.py")
    summary = module.main(["--smoke", "--steps", "2", "--batch-size", "8", "--num-generations", "4",
                           "--output-dir", str(tmp_path)])
    assert summary["backend"] == "torch" and summary["steps"] == 2
    assert module.correct_answer([" 7. yes", "It is 7", " 8"], ["7", "7", "7"]) == [1.0, 1.0, 0.0]
    assert module.answer_first([" 7.", "It is 7"]) == [0.5, 0.0]


def test_rl_step_benchmark_helpers():
    """benchmarks/rl_step.py's batch and error arithmetic (the GPU run's numbers come from these)."""
    import math

    from conftest import load_script

    bench = load_script("benchmarks/rl_step.py")
    batch = bench.make_batch(torch, vocab=50, prompt=5, completions=4, length=16, device="cpu", seed=0)
    ids, mask, keep = bench.model_inputs(torch, batch)
    assert ids.shape == (4, 21) and keep == 16 and torch.equal(ids[:, :5], ids[:1, :5].expand(4, 5))
    lengths = batch["completion_mask"].sum(-1)
    assert bool(((lengths >= 12) & (lengths <= 16)).all()) and int(batch["num_items_in_batch"]) == int(lengths.sum())
    assert bool((batch["completion_mask"].diff(dim=-1) <= 0).all())  # right padding
    reference = torch.full((2, 3), -2.0, dtype=torch.float64)
    logps = torch.tensor([[-1.9, -2.0, 5.0], [-2.0, -2.2, -2.0]])  # 5.0 is padding: not counted
    errors = bench.log_prob_errors(torch, logps, reference, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert errors["logp_err_max"] == pytest.approx(0.2, abs=1e-6)
    assert errors["logp_err_mean"] == pytest.approx(0.3 / 5, abs=1e-6)
    assert errors["seq_logp_err_max"] == pytest.approx(0.2, abs=1e-6)
    assert errors["ratio_err_max"] == pytest.approx(1 - math.exp(-0.2), abs=1e-6)
    assert errors["seq_ratio_err_max"] == pytest.approx(1 - math.exp(-0.2 / 3), abs=1e-6)
    assert errors["seq_sum_ratio_err_max"] == pytest.approx(1 - math.exp(-0.2), abs=1e-6)
