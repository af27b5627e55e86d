"""benchmarks/head.py on CPU: the harness end to end on its tiny shape (our torch backend's errors against the
fp32 reference, torch's own chunked ``F.linear_cross_entropy`` as an anchor where this torch has it), and the CPU
peak it reads from the process's resident memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import head  # noqa: E402

LINUX_PROC = Path("/proc/self/clear_refs").exists()


@pytest.mark.skipif(not LINUX_PROC, reason="the CPU peak reads Linux's /proc/self/status")
def test_cpu_peak_follows_a_large_tensor():
    clock = head.Clock("cpu")
    mib = 96

    def allocate():
        t = torch.ones(mib * 2**20 // 4)  # written: resident, not just reserved
        return float(t[-1])

    out, peak = clock.peak(allocate)
    assert out == 1.0
    assert mib / 1024 * 0.95 <= peak <= mib / 1024 + 0.05  # GiB
    _, small = clock.peak(lambda: None)
    assert small < 0.01  # the mark was reset: the earlier tensor is not counted again


def test_cpu_run_writes_rows(tmp_path):
    has_lce = hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    impls = "full-logits,torch-lce,ours-torch"
    assert head.main(["--device", "cpu", "--impls", impls, "--logits", "peaky", "--reps", "1", "--warmup", "1",
                      "--out", str(tmp_path), "--name", "h", "--no-plot"]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "h.json").read_text())}
    assert (tmp_path / "h.md").exists()
    ours = rows["ours-torch"]
    assert ours["ratio"] > 0
    # ours accumulates in fp32 from bf16 operands; the full-logits anchor rounds its logits to bf16 first
    assert ours["grad_h_rel"] < 5e-3 and ours["grad_w_rel"] < 5e-3
    assert rows["full-logits"]["grad_h_rel"] > 5 * ours["grad_h_rel"]
    lce = rows["torch-lce"]
    if has_lce:
        assert lce.get("error") is None and lce["ratio"] > 0
        assert lce["grad_h_rel"] < 0.2  # a number was measured (bf16 log-probs: ~3e-2 here)
    else:
        assert "has no chunked F.linear_cross_entropy" in lce["error"]
    if LINUX_PROC:
        assert all(r["peak_gib"] is not None and r["peak_gib"] >= 0 for r in rows.values() if not r.get("error"))
