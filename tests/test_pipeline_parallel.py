"""Pipeline parallelism (`examples/pipeline_parallel.py`, torch.distributed.pipelining, 2 gloo ranks):
the fused DPO / SFT loss on the last stage against the unsplit model, loss and gradients.

The reference is written without `align_losses`: the unsplit `Qwen3ForCausalLM` forward with
materialised logits, `log_softmax`, and the DPO / SFT formulas in plain torch, in one process.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
WORLD = 2
BATCH, SEQ, VOCAB, LAYERS = 4, 12, 96, 4
BETA = 0.5

# (name, loss, schedule, microbatches)
CASES = [
    ("dpo-gpipe-2", "dpo", "gpipe", 2),
    ("dpo-1f1b-4", "dpo", "1f1b", 4),
    ("sft-gpipe-2", "sft", "gpipe", 2),
    ("sft-1f1b-4", "sft", "1f1b", 4),
]


def _example():
    spec = importlib.util.spec_from_file_location("pipeline_parallel", ROOT / "examples" / "pipeline_parallel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pipeline_parallel", module)
    spec.loader.exec_module(module)
    return module


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _token_logps(model, input_ids, labels):
    """Unsplit model, full logits: next-token log-probs shaped like ``labels`` (0 where ignored)."""
    flat_ids = input_ids.reshape(-1, input_ids.shape[-1])
    flat_labels = labels.reshape(-1, labels.shape[-1])
    logits = model(input_ids=flat_ids).logits.float()  # causal mask, right padding
    targets = flat_labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(targets != -100, logp, 0.0)
    return F.pad(logp, (0, 1)).reshape(labels.shape), F.pad(targets != -100, (0, 1)).reshape(labels.shape)


def _reference_loss(model, loss, input_ids, labels, ref_logps=None):
    logp, mask = _token_logps(model, input_ids, labels)
    if loss == "sft":
        return -logp.sum() / mask.sum()
    seq = logp.sum(-1)  # [B, 2]
    margin = (seq[:, 0] - ref_logps[:, 0]) - (seq[:, 1] - ref_logps[:, 1])
    return -F.logsigmoid(BETA * margin).mean()


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pp = _example()
    lines = []
    try:
        config = pp.qwen3_config(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS)
        for case_index, (name, loss, schedule, microbatches) in enumerate(CASES):
            start = time.perf_counter()
            model = pp.build_model(config, seed=case_index)
            reference = copy.deepcopy(model)
            pairs = loss == "dpo"
            input_ids, labels = pp.synthetic_batch(BATCH, SEQ, VOCAB, pairs=pairs, seed=10 + case_index)

            make_loss = lambda stage: pp.FusedPipelineLoss(stage.lm_head, loss, beta=BETA)  # noqa: E731
            stage_module, sched, loss_fn = pp.build_pipeline(
                model, make_loss, rank=rank, world=world, microbatches=microbatches, schedule=schedule
            )
            assert sum(1 for _ in stage_module.parameters()) < sum(1 for _ in model.parameters())

            target, ref_logps = (labels if rank == world - 1 else None), None
            if pairs:
                # The reference pass through the pipeline (forward only) against the unsplit model.
                piped_ref = pp.reference_logps(sched, stage_module, loss_fn, input_ids, labels)
                with torch.no_grad():
                    logp, _ = _token_logps(reference, input_ids, labels)
                    unsplit_ref = logp.sum(-1)
                if stage_module.is_last:
                    assert _rel(piped_ref, unsplit_ref) < RTOL, (name, "reference log-probs", _rel(piped_ref, unsplit_ref))
                # A reference that differs from the policy, so that the loss is not at its symmetric point.
                g = torch.Generator().manual_seed(case_index)
                ref_logps = unsplit_ref + torch.randn(unsplit_ref.shape, generator=g)
                target = pp.pack_dpo_target(labels, ref_logps) if stage_module.is_last else None
            if loss_fn is not None:
                loss_fn.set_global_batch(labels)

            piped_loss = pp.pipeline_step(sched, stage_module, input_ids, target)

            full_loss = _reference_loss(reference, loss, input_ids, labels, ref_logps)
            full_loss.backward()
            full_params = dict(reference.named_parameters())
            worst = 0.0
            for local_name, param in stage_module.named_parameters():
                full = full_params[stage_module.parameter_names()[local_name]]
                assert param.grad is not None, (name, local_name)
                r = _rel(param.grad, full.grad)
                worst = max(worst, r)
                assert r < RTOL, (name, local_name, r)
            if stage_module.is_last:
                r_loss = _rel(piped_loss, full_loss.detach())
                assert r_loss < RTOL, (name, "loss", float(piped_loss), float(full_loss), r_loss)
                lines.append(f"{name}: loss {float(piped_loss):.6f} rel {r_loss:.1e}, stage-{rank} grads worst rel {worst:.1e}")
            else:
                lines.append(f"{name}: stage-{rank} grads worst rel {worst:.1e}")
            lines[-1] += f" ({time.perf_counter() - start:.1f}s)"
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(lines))
        dist.destroy_process_group()


def test_pipeline_fused_loss_matches_unsplit_model():
    """GPipe and 1F1B, 2 and 4 micro-batches, DPO (with the pipelined reference pass) and SFT."""
    pytest.importorskip("torch.distributed.pipelining")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(WORLD, os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        for rank in range(WORLD):
            print(Path(tmp, f"rank{rank}.txt").read_text())


def test_stage_layers_partition():
    pp = _example()
    for layers in (1, 4, 7, 28):
        for stages in range(1, min(layers, 5) + 1):
            ranges = [pp.stage_layers(layers, stages, i) for i in range(stages)]
            assert [i for r in ranges for i in r] == list(range(layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
