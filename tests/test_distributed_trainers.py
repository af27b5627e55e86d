"""FusedDPOTrainer and FusedSFTTrainer, unchanged, under `accelerate launch` with DDP and FSDP2 (2 CPU
processes, gloo) against one process on the same global batch: per-step losses and metrics, and the
weight updates, within 1e-5 relative in fp32.

Each setup is one launch of `tests/dist_scripts/train_trainer.py` (both trainers in turn, 2 SGD steps,
global batch 4, sequential data order); the launches run concurrently. The configs are the shipped
`examples/accelerate/ddp_cpu.yaml` and `fsdp2_cpu.yaml`; a fourth launch runs FSDP2 with bf16 mixed
precision, whose policy would round everything the model returns to bf16 (the fused per-token log-probs
must reach the loss in fp32).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import update_diff

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_trainer.py"
CONFIGS = ROOT / "examples" / "accelerate"
RTOL = 1e-5
GLOBAL_BATCH, WORLD = 4, 2
TRAINERS = ("dpo", "sft")
TIMEOUT = 600
# Logged values that are not a function of the global batch: timings, and grad_norm (exact too, but
# logged anyway: a mismatch would show in the updates).
IGNORED = {"learning_rate", "epoch", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def _command(setup: str, out: Path) -> list[str]:
    script = [str(SCRIPT), "--trainers", ",".join(TRAINERS), "--out", str(out)]
    if setup == "single":
        return [sys.executable, *script, "--batch", str(GLOBAL_BATCH)]
    config = CONFIGS / {"ddp": "ddp_cpu.yaml", "fsdp2": "fsdp2_cpu.yaml", "fsdp2_bf16": "fsdp2_cpu.yaml"}[setup]
    bf16 = setup == "fsdp2_bf16"
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(WORLD), "--main_process_port", str(_free_port()),
        *(["--mixed_precision", "bf16"] if bf16 else []),
        *script, "--batch", str(GLOBAL_BATCH // WORLD), *(["--bf16"] if bf16 else []),
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{setup: {trainer: result}}`` for the single-process reference, DDP, FSDP2 and FSDP2 in bf16, launched together."""
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("ALIGN_LOSSES_IMPL", None)
    procs, started = {}, time.perf_counter()
    for setup in ("single", "ddp", "fsdp2", "fsdp2_bf16"):
        log = open(tmp / f"{setup}.log", "w")
        procs[setup] = (subprocess.Popen(_command(setup, tmp / f"{setup}.pt"), cwd=tmp, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log)
    results = {}
    for setup, (proc, log) in procs.items():
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        text = (tmp / f"{setup}.log").read_text()
        assert code == 0, f"{setup} launch failed ({code}):\n{text[-6000:]}"
        results[setup] = torch.load(tmp / f"{setup}.pt")
    print(f"[distributed trainers] {len(procs)} launches in {time.perf_counter() - started:.0f}s")
    return results


def _compare_logs(ours: list[dict], reference: list[dict]) -> float:
    assert len(ours) == len(reference) and ours, (len(ours), len(reference))
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert set(a) == set(b), f"step {step}: metric names differ: {sorted(set(a) ^ set(b))}"
        for key in b:
            if key in IGNORED:
                continue
            x, y = float(a[key]), float(b[key])
            # Values near 0 (rewards at step 0) are compared absolutely at the fp32 rounding of their inputs.
            rel = abs(x - y) / max(abs(y), 1e-2)
            assert rel <= RTOL, f"step {step} {key}: distributed {x} vs one process {y} (rel {rel:.2e})"
            worst = max(worst, rel)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("setup", ["ddp", "fsdp2"])
def test_distributed_matches_single_process(runs, setup, trainer):
    ours, reference = runs[setup][trainer], runs["single"][trainer]
    assert ours["world_size"] == WORLD and reference["world_size"] == 1
    if setup == "fsdp2":
        assert ours["is_fsdp2"] and ours["model_class"].startswith("FSDP"), ours["model_class"]
        # accelerate puts [final norm, LM head] in one FSDP unit that the norm's forward unshards: the
        # fused head then reads a plain (unsharded) tensor, never the DTensor shard.
        assert ours["head_weight_types_seen"] and "DTensor" not in ours["head_weight_types_seen"], ours
    else:
        assert ours["model_class"] == "DistributedDataParallel", ours["model_class"]
    worst_log = _compare_logs(ours["logs"], reference["logs"])
    upd = update_diff(ours["before"], ours["after"], reference["before"], reference["after"])
    moved = max(float((ours["after"][n] - ours["before"][n]).abs().max()) for n in ours["before"])
    print(f"[{setup} {trainer}] logs worst rel {worst_log:.1e}, update rel diff {upd:.1e}")
    assert moved > 0
    assert upd <= RTOL, f"{setup} {trainer}: weight updates differ by {upd:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_fsdp2_bf16_keeps_fused_outputs_fp32(runs, trainer):
    """accelerate's bf16 policy casts a wrapped model's outputs to bf16; the fused trainers drop that cast."""
    ours = runs["fsdp2_bf16"][trainer]
    assert ours["is_fsdp2"] and ours["log_prob_dtypes_seen"] == ["float32"], ours["log_prob_dtypes_seen"]
    if trainer == "dpo":  # policy == reference at step 1: log 2, which a bf16-rounded loss (0.6914) is not
        assert abs(float(ours["logs"][0]["loss"]) - math.log(2)) < 1e-6, ours["logs"][0]["loss"]
