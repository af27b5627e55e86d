"""The fused trainers with TRL's ``torch_compile=True`` (issue #28): the compiled model's forward runs the fused
head through the registered op (`align_losses.ops.library`), and training matches the eager run step by step
(losses and metrics within `RTOL`, weight updates within 1e-3 relative).

CPU, the shipped tiny model, three steps; ``torch_compile_backend="aot_eager"`` (which sets ``torch_compile``)
keeps the compile to seconds: it traces with Dynamo and AOTAutograd as Inductor would, without generating code.
On a CUDA GPU (``-m gpu``) the same runs use TRL's default Inductor backend and the ``triton`` backend that
``impl="auto"`` picks there.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import MetricsRecorder, base_args, compare_logs, snapshot, tiny_causal_lm, update_diff
from tests.triton_markers import HAS_CUDA, HAS_TRITON
from trainers import FusedDPOConfig, FusedDPOTrainer, FusedSFTConfig, FusedSFTTrainer

#: Eager and compiled runs differ only by the graph's order of fp32 operations in the backbone (on CUDA also by
#: Inductor's generated kernels and cuBLAS's choices for other shapes, hence the looser bound there).
RTOL = {"cpu": 1e-4, "cuda": 1e-3}

#: Per device: the compile backend (TRL's ``torch_compile_backend``) and the head backend ``impl="auto"`` runs.
SETUPS = {"cpu": ("aot_eager", "tiled_head"), "cuda": ("inductor", "triton_head")}


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
    before = {n: p.cpu() for n, p in snapshot(trainer.model).items()}
    calls.clear()
    trainer.train()
    return rec.logs, before, {n: p.cpu() for n, p in snapshot(trainer.model).items()}, list(calls)


ON_GPU = (pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trainer_with_torch_compile_matches_eager_and_runs_the_op(kind, device, sft_dataset, preference_dataset,
                                                                  tokenizer, tmp_path, monkeypatch):
    """SFT (label smoothing) and DPO (with a reference model, whose passes run without gradient)."""
    import importlib

    compile_backend, module_name = SETUPS[device]
    head_module = importlib.import_module(f"align_losses.ops.{module_name}")
    calls: list[str] = []
    real_forward, real_backward = head_module.forward_outputs, head_module.backward_grads

    def where() -> str:
        """``"op"`` when called from the registered op's implementation, else ``"eager"``."""
        return "op" if any(f.filename.endswith("ops/library.py") for f in inspect.stack()) else "eager"

    def spy_forward(*args, **kwargs):
        calls.append(f"forward:{where()}")
        return real_forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        calls.append(f"backward:{where()}")
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(head_module, "forward_outputs", spy_forward)
    monkeypatch.setattr(head_module, "backward_grads", spy_backward)
    datasets = {"sft": sft_dataset, "dpo": preference_dataset}
    on = {"use_cpu": device == "cpu"}
    if device == "cuda":
        # transformers' TrainingArguments turns TF32 on for the whole process when torch_compile is set and tf32 is
        # not (training_args.py, "TF32" step): the compiled run's fp32 GEMMs would then round to TF32 (its loss at
        # step 0 was 2.5e-4 away from the eager run's on an H100) and later tests would inherit it. Both runs say
        # tf32=False, which also sets it off.
        on["tf32"] = False
    torch._dynamo.reset()
    eager = _run(kind, datasets, tokenizer, tmp_path / "eager", calls, **on)
    compiled = _run(kind, datasets, tokenizer, tmp_path / "compiled", calls, torch_compile_backend=compile_backend,
                    **on)
    torch._dynamo.reset()
    assert eager[3] and {c.split(":")[1] for c in eager[3]} == {"eager"}
    # every step's policy pass through the op, forward and backward (3 steps of one micro-batch each)
    assert compiled[3].count("backward:op") == 3, compiled[3]
    assert compiled[3].count("forward:op") >= 3 and "forward:eager" not in compiled[3], compiled[3]
    compare_logs(compiled[0], eager[0], rtol=RTOL[device])
    assert update_diff(compiled[1], compiled[2], eager[1], eager[2]) <= 1e-3
