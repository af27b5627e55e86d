"""FusedCPOTrainer / FusedSimPOTrainer against trl.experimental.cpo.CPOTrainer: same losses, metrics and weight
updates, step by step, for every CPO loss type; SimPO's config; no LM-head call, no [tokens, vocab] tensor."""

from __future__ import annotations

import pytest
import torch
from trl.experimental.cpo import CPOConfig, CPOTrainer

from conftest import base_args, tiny_causal_lm
from test_trainer_orpo import memory_check, paired_parity
from trainers.cpo import FusedCPOConfig, FusedCPOTrainer, FusedSimPOConfig, FusedSimPOTrainer

CPO_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected", "logps/chosen",
    "logits/rejected", "logits/chosen", "nll_loss",
}


@pytest.mark.parametrize(
    "name,overrides",
    [
        # three optimizer steps
        ("sigmoid-adamw+eval", {"with_eval": True}),
        ("sigmoid-sgd-label-smoothing-plain-config",
         {"optim": "sgd", "learning_rate": 1e-2, "label_smoothing": 0.2, "cpo_alpha": 0.5, "plain_config": True}),
        ("ipo", {"loss_type": "ipo"}),
        # one optimizer step (sigmoid, ipo and simpo are covered by the multi-step runs here and in test_simpo_parity)
        ("simpo+nll (CPO-SimPO)", {"loss_type": "simpo", "simpo_gamma": 0.3, "max_steps": 1}),
        ("hinge", {"loss_type": "hinge", "max_steps": 1}),
        ("alphapo", {"loss_type": "alphapo", "alpha": 0.25, "max_steps": 1}),
    ],
)
def test_cpo_parity(name, overrides, preference_dataset, tokenizer, tmp_path):
    overrides = dict(overrides)
    eval_dataset = preference_dataset if overrides.pop("with_eval", False) else None
    config = CPOConfig if overrides.pop("plain_config", False) else FusedCPOConfig
    ours, _ = paired_parity(
        f"cpo {name}", FusedCPOTrainer, config, CPOTrainer, CPOConfig, preference_dataset, tokenizer, tmp_path,
        eval_dataset=eval_dataset, **overrides,
    )
    assert CPO_KEYS <= set(ours[0][0])
    if eval_dataset is not None:
        assert {f"eval_{k}" for k in CPO_KEYS} <= set(ours[4])


def test_simpo_parity(preference_dataset, tokenizer, tmp_path):
    """FusedSimPOTrainer with its defaults against TRL's CPOTrainer(loss_type="simpo", cpo_alpha=0)."""
    ours, _ = paired_parity(
        "simpo", FusedSimPOTrainer, FusedSimPOConfig, CPOTrainer,
        lambda **kw: CPOConfig(loss_type="simpo", cpo_alpha=0.0, **kw), preference_dataset, tokenizer, tmp_path,
        beta=2.0, simpo_gamma=1.0,
    )
    trainer = ours[3]
    assert (trainer.loss_type, trainer.cpo_alpha) == ("simpo", 0.0)
    assert all(log["nll_loss"] == 0.0 for log in ours[0])


def test_simpo_config_defaults_and_refusals(preference_dataset, tokenizer, tmp_path):
    config = FusedSimPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    plain = CPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    assert (config.loss_type, config.cpo_alpha) == ("simpo", 0.0)
    assert (config.beta, config.simpo_gamma, config.label_smoothing, config.alpha) == (
        plain.beta, plain.simpo_gamma, plain.label_smoothing, plain.alpha)
    assert config.lce_impl == "auto"
    with pytest.raises(ValueError, match="loss_type='simpo'"):
        FusedSimPOTrainer(model=tiny_causal_lm(), args=CPOConfig(**base_args(tmp_path)), train_dataset=preference_dataset,
                          processing_class=tokenizer)
    with pytest.raises(ValueError, match="lce_impl"):
        FusedCPOTrainer(model=tiny_causal_lm(), args=FusedCPOConfig(**base_args(tmp_path), lce_impl="nope"),
                        train_dataset=preference_dataset, processing_class=tokenizer)


def test_cpo_concatenated_forward_matches_trl(preference_dataset, tokenizer, tmp_path):
    """CPO's `concatenated_forward` keeps the last position in its "logits" (ORPO drops it); ipo averages.
    Soft-capped Gemma-2: the "logits" slots are the vocabulary means of the soft-capped logits."""
    args = FusedCPOConfig(**base_args(tmp_path / "cf"), max_length=64, loss_type="ipo")
    trainer = FusedCPOTrainer(model=tiny_causal_lm("gemma2"), args=args, train_dataset=preference_dataset,
                              processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.concatenated_forward(trainer.model, batch)
        theirs = CPOTrainer.concatenated_forward(trainer, trainer.model, batch)
    for a, b in ((ours[0], theirs[0]), (ours[1], theirs[1]), (ours[4], theirs[4])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in ((ours[2], theirs[2]), (ours[3], theirs[3])):
        torch.testing.assert_close(a, b.mean(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["cpo", "simpo"])
def test_cpo_simpo_never_build_vocab_sized_tensors(which, preference_dataset, tokenizer, tmp_path):
    if which == "cpo":
        memory_check(FusedCPOTrainer, FusedCPOConfig, preference_dataset, tokenizer, tmp_path)
    else:
        memory_check(FusedSimPOTrainer, FusedSimPOConfig, preference_dataset, tokenizer, tmp_path, kind="gemma2")
