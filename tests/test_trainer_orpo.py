"""FusedORPOTrainer against trl.experimental.orpo.ORPOTrainer: same losses, metrics and weight updates, step by step;
and the check that ORPO/CPO/SimPO training never calls the LM head nor builds a [tokens, vocab] tensor.

The shared helpers (`run_paired`, `paired_parity`, `VocabSizedTensorDetector`) are used by test_trainer_cpo.py too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from conftest import MetricsRecorder, base_args, compare_logs, snapshot, tiny_causal_lm, update_diff
from trainers.orpo import FusedORPOConfig, FusedORPOTrainer

RTOL = 1e-4
UPDATE_RTOL = 1e-3


class HeadCallCounter:
    """Counts calls of the LM head's ``forward`` (the fused path must read its weight, never call it)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1


def run_paired(trainer_cls, config_cls, dataset, tokenizer, tmp_path, *, kind="qwen3", optim="adamw_torch",
               eval_dataset=None, count_head=False, **overrides):
    """Train a fresh tiny model; returns ``(per-step logs, W_0, W_T, trainer, eval metrics or None, head calls)``."""
    model = tiny_causal_lm(kind)
    counter = HeadCallCounter(model) if count_head else None
    kwargs = dict(base_args(tmp_path / trainer_cls.__name__), optim=optim, beta=0.5, max_length=64)
    kwargs.update(overrides)
    rec = MetricsRecorder()
    trainer = trainer_cls(
        model=model, args=config_cls(**kwargs), train_dataset=dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, callbacks=[rec.callback],
    )
    before = snapshot(trainer.model)
    trainer.train()
    evaluated = trainer.evaluate() if eval_dataset is not None else None
    return rec.logs, before, snapshot(trainer.model), trainer, evaluated, (counter.calls if counter else None)


def compare_eval(ours: dict, theirs: dict, rtol: float = RTOL) -> float:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    worst = 0.0
    for key, y in theirs.items():
        if key.endswith(("runtime", "per_second")) or key == "epoch":
            continue
        x = ours[key]
        if key.endswith("accuracies"):
            assert x == y, (key, x, y)
            continue
        rel = abs(x - y) / max(abs(y), 1e-2)
        worst = max(worst, rel)
        assert rel <= rtol, f"eval {key}: ours {x} vs TRL {y} (rel {rel:.2e})"
    return worst


def paired_parity(label, ours_cls, ours_config, trl_cls, trl_config, dataset, tokenizer, tmp_path, **kw):
    """Run ours and TRL's with the same settings; assert per-step metric and weight-update parity."""
    ours = run_paired(ours_cls, ours_config, dataset, tokenizer, tmp_path, count_head=True, **kw)
    theirs = run_paired(trl_cls, trl_config, dataset, tokenizer, tmp_path, **kw)
    worst = compare_logs(ours[0], theirs[0], rtol=RTOL)
    if ours[4] is not None:
        worst = max(worst, compare_eval(ours[4], theirs[4]))
    upd = update_diff(ours[1], ours[2], theirs[1], theirs[2])
    print(f"[parity] {label}: {len(ours[0])} steps, max metric rel diff {worst:.2e}, update rel diff {upd:.2e}")
    assert upd <= UPDATE_RTOL, f"{label}: weight updates differ by {upd:.2e}"
    assert ours[5] == 0, f"{label}: the LM head's forward ran {ours[5]} times"
    return ours, theirs


ORPO_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected", "logps/chosen",
    "logits/rejected", "logits/chosen", "nll_loss", "log_odds_ratio", "log_odds_chosen",
}


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("adamw+eval", {"with_eval": True}),
        ("sgd-plain-config", {"optim": "sgd", "learning_rate": 1e-2, "plain_config": True}),
        ("grad-accum", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
        ("gemma2-softcap", {"kind": "gemma2"}),
    ],
)
def test_orpo_parity(name, overrides, preference_dataset, tokenizer, tmp_path):
    overrides = dict(overrides)
    eval_dataset = preference_dataset if overrides.pop("with_eval", False) else None
    config = ORPOConfig if overrides.pop("plain_config", False) else FusedORPOConfig
    ours, _ = paired_parity(
        f"orpo {name}", FusedORPOTrainer, config, ORPOTrainer, ORPOConfig, preference_dataset, tokenizer, tmp_path,
        eval_dataset=eval_dataset, **overrides,
    )
    assert ORPO_KEYS <= set(ours[0][0])
    if eval_dataset is not None:
        assert {f"eval_{k}" for k in ORPO_KEYS} <= set(ours[4])


def test_orpo_concatenated_forward_matches_trl(preference_dataset, tokenizer, tmp_path):
    """The fused `concatenated_forward` against TRL's on the same model and batch (soft-capped Gemma-2):
    log-probs, NLL, and the `.mean()` of the "logits" slots (vocab-mean logits vs full logits)."""
    args = FusedORPOConfig(**base_args(tmp_path / "cf"), max_length=64)
    trainer = FusedORPOTrainer(model=tiny_causal_lm("gemma2"), args=args, train_dataset=preference_dataset,
                               processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.concatenated_forward(trainer.model, batch)
        theirs = ORPOTrainer.concatenated_forward(trainer, trainer.model, batch)  # full logits, TRL's code
    assert ours[2].dim() == 2 and theirs[2].dim() == 3
    for a, b in ((ours[0], theirs[0]), (ours[1], theirs[1]), (ours[4], theirs[4])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in ((ours[2], theirs[2]), (ours[3], theirs[3])):
        torch.testing.assert_close(a, b.mean(-1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: no LM-head call, no [tokens, vocab] tensor in a training step


class VocabSizedTensorDetector(TorchDispatchMode):
    """Records every op output with ``numel >= limit`` (forward and backward run through the dispatcher here)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.largest = 0
        self.offenders: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    self.offenders.append((str(func), tuple(t.shape)))
        return out


def step_under_detector(trainer):
    """One training step (forward + backward) on the first batch; returns the detector and ``[2B, T]``."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = 2 * batch["chosen_input_ids"].shape[0]
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    detector = VocabSizedTensorDetector(limit=rows * (width - 1) * vocab)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which training_step is called outside of
    with detector:
        trainer.training_step(trainer.model, batch)
    return detector, rows, width


def memory_check(trainer_cls, config_cls, dataset, tokenizer, tmp_path, kind="qwen3", **overrides):
    model = tiny_causal_lm(kind)
    counter = HeadCallCounter(model)
    args = config_cls(**base_args(tmp_path / trainer_cls.__name__), max_length=64, lce_impl="torch",
                      lce_token_chunk=8, **overrides)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    detector, rows, width = step_under_detector(trainer)
    assert counter.calls == 0, f"the LM head's forward ran {counter.calls} times"
    assert not detector.offenders, f"[tokens, vocab]-sized tensors built: {detector.offenders[:5]}"
    vocab = model.get_output_embeddings().weight.shape[0]
    # The largest tensor of the step is far below one [tokens, vocab] buffer (tiles are 8 tokens x vocab).
    print(f"[memory] {trainer_cls.__name__} {kind}: batch [{rows}, {width}], largest tensor {detector.largest} "
          f"elements vs tokens*vocab = {rows * width * vocab}")
    return detector


def test_orpo_never_builds_vocab_sized_tensors(preference_dataset, tokenizer, tmp_path):
    memory_check(FusedORPOTrainer, FusedORPOConfig, preference_dataset, tokenizer, tmp_path, kind="gemma2")
    # The detector does see TRL's logits (forward and backward), so the check above is meaningful.
    args = ORPOConfig(**base_args(tmp_path / "trl"), max_length=64)
    trl_trainer = ORPOTrainer(model=tiny_causal_lm("qwen3"), args=args, train_dataset=preference_dataset,
                              processing_class=tokenizer)
    detector, _, _ = step_under_detector(trl_trainer)
    ops = {name for name, _ in detector.offenders}
    assert any("backward" in op for op in ops) and len(ops) > 1, ops
