"""FusedRLOOTrainer against trl.RLOOTrainer: same completions, losses, metrics and weight updates, with a spy
proving which head ran (helpers from test_trainer_grpo.py); its log-probs against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import trl

from test_trainer_grpo import (  # noqa: F401  (fixtures)
    _full_logits_reference,
    _no_gc_after_training,
    prompt_dataset,
    reward_digits,
    rl_args,
    rl_model,
    rl_parity,
)
from trainers import FusedRLOOConfig, FusedRLOOTrainer


def rloo_parity(name, dataset, tokenizer, tmp_path, **kw):
    """`rl_parity` of FusedRLOOTrainer against trl.RLOOTrainer."""
    return rl_parity(FusedRLOOTrainer, FusedRLOOConfig, trl.RLOOTrainer, trl.RLOOConfig, name, dataset, tokenizer,
                     tmp_path, **kw)


@pytest.mark.parametrize(
    "name,overrides",
    [
        # RLOO's default beta = 0.05: the reference model (loaded from the policy's path) scores every generation.
        ("default-beta-ref", dict(saved=True, beta=0.05)),
        ("beta0-two-iterations", dict(beta=0.0, num_iterations=2, epsilon=0.05)),
        ("temperature-truncated-normalized", dict(saved=True, beta=0.1, temperature=0.8, mask_truncated_completions=True,
                                                  normalize_advantages=True, num_iterations=2)),
    ],
)
def test_rloo_parity(name, overrides, prompt_dataset, tokenizer, tmp_path):
    ours, _ = rloo_parity(name, prompt_dataset, tokenizer, tmp_path, **overrides)
    spy = ours[4]
    temperature = overrides.get("temperature", 1.0)
    assert all(t == temperature for _, t, _ in spy.ours)
    # Per generation: the old policy's pass and, with beta > 0, the reference's (no gradient, no entropy), then
    # one policy pass per iteration (gradient, entropy).
    per_generation = [False] * (2 if overrides.get("beta") else 1) + [True] * overrides.get("num_iterations", 1)
    steps = 2
    assert [g for g, _, _ in spy.ours] == per_generation * (steps // overrides.get("num_iterations", 1))
    assert all(out == (("entropy",) if g else ()) for g, _, out in spy.ours)
    if overrides.get("beta"):
        assert ours[3].ref_model is not None


def test_rloo_parity_peft_reference_adapter(prompt_dataset, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ours, _ = rloo_parity("peft-beta", prompt_dataset, tokenizer, tmp_path, peft_config=lora, beta=0.1,
                          learning_rate=5e-2)
    assert ours[3].ref_model is None


def test_rloo_logps_match_float64_reference(prompt_dataset, tokenizer, tmp_path):
    args = rl_args(FusedRLOOConfig, tmp_path, temperature=0.7)
    trainer = FusedRLOOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits, args=args,
                               train_dataset=prompt_dataset, processing_class=tokenizer)
    ids = torch.randint(2, len(tokenizer), (3, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    # `batch_size` and `compute_entropy` positionally, as TRL's signature allows
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4, 2, True)
    ref_logps, ref_entropy = _full_logits_reference(trainer.model, ids, mask, 4, 0.7)
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies.double(), ref_entropy, rtol=1e-5, atol=1e-5)


def test_rloo_error_beta_without_reference_path(prompt_dataset, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="_name_or_path"):
        FusedRLOOTrainer(model=rl_model(tmp_path), reward_funcs=reward_digits,
                         args=rl_args(FusedRLOOConfig, tmp_path, beta=0.05), train_dataset=prompt_dataset,
                         processing_class=tokenizer)
