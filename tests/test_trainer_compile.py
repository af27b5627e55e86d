"""The fused trainers with TRL's ``torch_compile=True`` (issue #28): the compiled model's forward runs the fused
head through the registered op (`align_losses.ops.library`), and training matches the eager run step by step.

CPU, the shipped tiny model, three steps; ``torch_compile_backend="aot_eager"`` (which sets ``torch_compile``)
keeps the compile to seconds: it traces with Dynamo and AOTAutograd as Inductor would, without generating code.
"""

from __future__ import annotations

import inspect

import torch

from conftest import MetricsRecorder, base_args, compare_logs, snapshot, tiny_causal_lm, update_diff
from trainers import FusedSFTConfig, FusedSFTTrainer

#: Eager and compiled runs differ only by the graph's order of fp32 operations in the backbone.
RTOL = 1e-4


def _run(dataset, tokenizer, tmp_path, calls, **overrides):
    args = FusedSFTConfig(**base_args(tmp_path, **overrides), max_length=64, label_smoothing_factor=0.1)
    rec = MetricsRecorder()
    trainer = FusedSFTTrainer(model=tiny_causal_lm(), args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[rec.callback])
    before = snapshot(trainer.model)
    calls.clear()
    trainer.train()
    return rec.logs, before, snapshot(trainer.model), list(calls)


def test_sft_trainer_with_torch_compile_matches_eager_and_runs_the_op(sft_dataset, tokenizer, tmp_path, monkeypatch):
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
    torch._dynamo.reset()
    eager = _run(sft_dataset, tokenizer, tmp_path / "eager", calls)
    compiled = _run(sft_dataset, tokenizer, tmp_path / "compiled", calls, torch_compile_backend="aot_eager")
    torch._dynamo.reset()
    assert eager[3] and set(eager[3]) == {"forward:eager", "backward:eager"}
    # every step through the op, forward and backward (3 steps of one micro-batch each)
    assert compiled[3].count("forward:op") == 3 and compiled[3].count("backward:op") == 3, compiled[3]
    assert "forward:eager" not in compiled[3]
    compare_logs(compiled[0], eager[0], rtol=RTOL)
    assert update_diff(compiled[1], compiled[2], eager[1], eager[2]) <= 1e-3
