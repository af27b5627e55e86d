"""`apply_fused_head` under FSDP2 (2 CPU processes, gloo) against one process on the same global batch: a plain
`transformers.Trainer`, two SGD steps with gradient accumulation, per-step losses and the weight updates within
1e-5 relative in fp32, and the head's own forward never run. ZeRO-3 needs DeepSpeed (not installed for CI): the
head-call path it relies on is checked with ZeRO's parameter marks in `test_patch_zero3_marks`.

One launch of `tests/dist_scripts/patch_trainer.py` per setup, run concurrently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_causal_lm, update_diff
from trainers import apply_fused_head

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "patch_trainer.py"
RTOL = 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("ALIGN_LOSSES_IMPL", None)
    commands = {
        "single": [sys.executable, str(SCRIPT), "--batch", "4", "--out", str(tmp_path / "single.pt")],
        "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "examples" / "accelerate" / "fsdp2_cpu.yaml"), "--num_processes", "2",
                  "--main_process_port", str(_free_port()), str(SCRIPT), "--batch", "2",
                  "--out", str(tmp_path / "fsdp2.pt")],
    }
    procs = {k: subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in commands.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{out[-6000:]}"
    single, fsdp2 = (torch.load(tmp_path / f"{k}.pt") for k in ("single", "fsdp2"))
    assert fsdp2["is_fsdp2"] and fsdp2["world_size"] == 2 and fsdp2["model_class"].startswith("FSDP")
    assert single["head_outputs"] == [] and "Tensor" not in fsdp2["head_outputs"]
    assert len(fsdp2["logs"]) == len(single["logs"]) == 2
    for a, b in zip(fsdp2["logs"], single["logs"]):
        assert abs(a["loss"] - b["loss"]) <= RTOL * abs(b["loss"]), (a["loss"], b["loss"])
    assert update_diff(fsdp2["before"], fsdp2["after"], single["before"], single["after"]) <= RTOL


def test_patch_zero3_marks():
    """A head with ZeRO-3 parameters (``ds_id``): the patched loss runs the core as the head's call, so ZeRO's
    module hooks (fetch before, release after, fetch again for backward) fire; the loss is unchanged."""
    model = apply_fused_head(tiny_causal_lm("qwen3_tied"))
    ids = torch.randint(1, 300, (2, 7))
    plain = model(input_ids=ids, labels=ids).loss
    head = model.get_output_embeddings()
    outputs = []
    head.register_forward_hook(lambda m, a, out: outputs.append(type(out).__name__))
    head.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    try:
        hooked = model(input_ids=ids, labels=ids).loss
    finally:
        del head.weight.ds_id
    assert outputs == ["tuple"]  # one call, the core's (the head's own forward returns the logits)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
