"""FusedDPOTrainer and FusedSFTTrainer under DeepSpeed ZeRO-3 (one process, one GPU) against a plain run.

ZeRO-3 partitions every parameter, the LM head included, and fetches a module's parameters in hooks
around its call; `trainers.fused_forward` runs the core call as the head's forward so that those hooks
fetch the weight for the forward and again for the backward. With one process the partition is the
whole tensor, but the parameters are still replaced by empty placeholders outside a fetch: without it
the core would see a ``[0]``-shaped weight and fail, and the weight gradient would not reach ZeRO's
partitioned gradient. Both an untied head and one tied to the embeddings; both runs fp32 on the GPU
with SGD (DeepSpeed wraps the torch optimizer), 2 steps, same data: losses, metrics and weight updates
must agree within 1e-5 relative.

Needs ``deepspeed`` (an sdist; it builds no CUDA op at install with DS_BUILD_OPS=0, and none is needed
here) and CUDA. Run: ``python -m pytest -q tests/test_zero3_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import update_diff

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_trainer.py"
PATCH_SCRIPT = ROOT / "tests" / "dist_scripts" / "patch_trainer.py"
RTOL = 1e-5
TRAINERS = ("dpo", "sft")
IGNORED = {"learning_rate", "epoch", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}

ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "stage3_param_persistence_threshold": 0,  # partition even tiny parameters (the whole head)
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
    },
    "fp16": {"enabled": False},
    "bf16": {"enabled": False},
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
}


def _skip_reason():
    if not torch.cuda.is_available():
        return "DeepSpeed ZeRO-3 needs CUDA; run on a GPU"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "DeepSpeed ZeRO-3 needs CUDA; run on a GPU (with `pip install deepspeed`)"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _launch(tmp: Path, name: str, kind: str, extra: list[str], script: Path = SCRIPT) -> dict:
    """One process; ZeRO-3 runs under torchrun (DeepSpeed wants a distributed environment, world size 1)."""
    out = tmp / f"{name}-{kind}.pt"
    trainers = ["--trainers", ",".join(TRAINERS)] if script == SCRIPT else []
    script = [str(script), *trainers, "--batch", "4", "--cuda", "--out", str(out), "--kind", kind, *extra]
    if "--deepspeed" in extra:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *script]
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-8000:]}"
    return torch.load(out)


@pytest.fixture(scope="module", params=["qwen3", "qwen3_tied"])
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    config = tmp / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    kind = request.param
    return {
        "kind": kind,
        "plain": _launch(tmp, "plain", kind, []),
        "zero3": _launch(tmp, "zero3", kind, ["--deepspeed", str(config)]),
    }


@pytest.mark.parametrize("trainer", TRAINERS)
def test_zero3_matches_plain_run(runs, trainer):
    ours, reference = runs["zero3"][trainer], runs["plain"][trainer]
    assert ours["is_deepspeed"] and not reference["is_deepspeed"]
    assert "DTensor" not in ours["head_weight_types_seen"]
    assert len(ours["logs"]) == len(reference["logs"]) > 0
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours["logs"], reference["logs"])):
        for key in b:
            if key in IGNORED or key not in a:
                continue
            rel = abs(float(a[key]) - float(b[key])) / max(abs(float(b[key])), 1e-2)
            assert rel <= RTOL, f"step {step} {key}: ZeRO-3 {a[key]} vs plain {b[key]} (rel {rel:.2e})"
            worst = max(worst, rel)
    upd = update_diff(ours["before"], ours["after"], reference["before"], reference["after"])
    print(f"[zero3 {runs['kind']} {trainer}] logs worst rel {worst:.1e}, update rel diff {upd:.1e}")
    assert upd <= RTOL, f"{trainer}: ZeRO-3 weight updates differ by {upd:.2e}"


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_tied"])
def test_zero3_patched_trainer_matches_plain_run(tmp_path, kind):
    """`apply_fused_head` on a plain `transformers.Trainer` under ZeRO-3: the patched forward runs the core as
    the head's call, so ZeRO's hooks fetch the partitioned weight; the losses and the weight updates of two SGD
    steps with gradient accumulation equal those of the same patched run without ZeRO-3 (1e-5), and the head's
    own forward never returned logits."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    plain = _launch(tmp_path, "patch-plain", kind, [], script=PATCH_SCRIPT)
    zero3 = _launch(tmp_path, "patch-zero3", kind, ["--deepspeed", str(config)], script=PATCH_SCRIPT)
    assert zero3["is_deepspeed"] and not plain["is_deepspeed"]
    assert plain["head_outputs"] == [] and "Tensor" not in zero3["head_outputs"], zero3["head_outputs"]
    losses = [(a["loss"], b["loss"]) for a, b in zip(zero3["logs"], plain["logs"]) if "loss" in b]
    assert losses and len(zero3["logs"]) == len(plain["logs"])
    for got, want in losses:
        assert abs(got - want) <= RTOL * max(abs(want), 1e-2), f"ZeRO-3 loss {got} vs plain {want}"
    upd = update_diff(zero3["before"], zero3["after"], plain["before"], plain["after"])
    print(f"[zero3 patch {kind}] losses {losses}, update rel diff {upd:.1e}")
    assert upd <= RTOL, f"ZeRO-3 weight updates differ by {upd:.2e}"
