"""The fused trainers with TRL's ``torch_compile=True`` (issue #28): the compiled model's forward runs the fused
head through the registered op (`align_losses.ops.library`), and training matches the eager run step by step
(losses and metrics within `RTOL`, weight updates within 1e-3 relative).

CPU, the shipped tiny model, three steps; ``torch_compile_backend="aot_eager"`` (which sets ``torch_compile``)
keeps the compile to seconds: it traces with Dynamo and AOTAutograd as Inductor would, without generating code.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import MetricsRecorder, base_args, compare_logs, snapshot, tiny_causal_lm, update_diff
from trainers import FusedDPOConfig, FusedDPOTrainer, FusedSFTConfig, FusedSFTTrainer

#: Eager and compiled runs differ only by the graph's order of fp32 operations in the backbone.
RTOL = 1e-4


def _run(kind, datasets, tokenizer, tmp_path, calls, **overrides):
    if kind == "sft":
        args = FusedSFTConfig(**base_args(tmp_path, **overrides), max_length=64, label_smoothing_factor=0.1)
        trainer = FusedSFTTrainer(model=tiny_causal_lm(), args=args, train_dataset=datasets["sft"],
                                  processing_class=tokenizer)
    else:
        args = FusedDPOConfig(**base_args(tmp_path, **overrides), beta=0.5, max_length=64)
        trainer = FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(), args=args,
                                  train_dataset=datasets["dpo"], processing_class=tokenizer)
    rec = MetricsRecorder()
    trainer.add_callback(rec.callback)
    before = snapshot(trainer.model)
    calls.clear()
    trainer.train()
    return rec.logs, before, snapshot(trainer.model), list(calls)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trainer_with_torch_compile_matches_eager_and_runs_the_op(kind, sft_dataset, preference_dataset, tokenizer,
                                                                  tmp_path, monkeypatch):
    """SFT (label smoothing) and DPO (with a reference model, whose passes run without gradient)."""
    from align_losses.ops import tiled_head

    calls: list[str] = []
    real_forward, real_backward = tiled_head.forward_outputs, tiled_head.backward_grads

    def where() -> str:
        """``"op"`` when called from the registered op's implementation, else ``"eager"``."""
        return "op" if any(f.filename.endswith("ops/library.py") for f in inspect.stack()) else "eager"

    def spy_forward(*args, **kwargs):
        calls.append(f"forward:{where()}")
        return real_forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        calls.append(f"backward:{where()}")
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(tiled_head, "forward_outputs", spy_forward)
    monkeypatch.setattr(tiled_head, "backward_grads", spy_backward)
    datasets = {"sft": sft_dataset, "dpo": preference_dataset}
    torch._dynamo.reset()
    eager = _run(kind, datasets, tokenizer, tmp_path / "eager", calls)
    compiled = _run(kind, datasets, tokenizer, tmp_path / "compiled", calls, torch_compile_backend="aot_eager")
    torch._dynamo.reset()
    assert eager[3] and {c.split(":")[1] for c in eager[3]} == {"eager"}
    # every step's policy pass through the op, forward and backward (3 steps of one micro-batch each)
    assert compiled[3].count("backward:op") == 3, compiled[3]
    assert compiled[3].count("forward:op") >= 3 and "forward:eager" not in compiled[3], compiled[3]
    compare_logs(compiled[0], eager[0], rtol=RTOL)
    assert update_diff(compiled[1], compiled[2], eager[1], eager[2]) <= 1e-3
