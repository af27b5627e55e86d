"""CPU tests of the "cce" and "liger" adapters: declarations, refusals, availability, empty batches.

None of these needs CUDA, CCE or Liger (the last test runs Liger's own CPU fallback when Liger is
installed and is skipped otherwise). Where a test must reach the capability check or ``run`` on a
machine without a GPU, it swaps in a copy of the backend whose ``available()`` says yes (and, to
get past the device check, whose devices include "cpu"); the registry reads ``module.BACKEND`` at
call time, so ``monkeypatch`` restores it afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest
import torch

from align_losses import linear_logprobs, linear_token_stats
from align_losses.backends import get
from align_losses.packages import installed
from align_losses.problem import OUTPUTS, HeadProblem, LogitTransform

CCE = importlib.import_module("align_losses.backends.cce")
LIGER = importlib.import_module("align_losses.backends.liger")


def _inputs(m=6, d=8, v=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(v, d, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (m,), generator=g)
    return hidden, weight, labels


def _patched(monkeypatch, module, *, devices=None, run=None):
    """Replace ``module.BACKEND`` by a copy that is available here (and optionally other devices/run)."""
    backend = module.BACKEND
    caps = backend.capabilities
    if devices is not None:
        caps = dataclasses.replace(caps, devices=frozenset(devices))
    patched = dataclasses.replace(backend, capabilities=caps, available=lambda: None, run=run or backend.run)
    monkeypatch.setattr(module, "BACKEND", patched)
    return patched


def _no_work(problem):
    raise AssertionError("run() was called although the call should have been refused first")


# --- declarations --------------------------------------------------------------------------


def test_importing_does_not_import_kernels():
    code = (
        "import sys, align_losses, align_losses.backends.cce, align_losses.backends.liger\n"
        "from align_losses.backends import get\n"
        "get('cce').available(); get('liger').available()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'liger_kernel', 'cut_cross_entropy')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cce_capabilities():
    caps = get("cce").capabilities
    assert caps.devices == frozenset({"cuda"})
    assert caps.dtypes == frozenset({torch.bfloat16, torch.float16})
    assert (caps.bias, caps.softcap, caps.logit_scale, caps.temperature) == (False, True, False, False)
    assert caps.outputs == frozenset({"logprobs"})
    assert caps.options == frozenset({"filter_eps"})
    assert not caps.vocab_parallel


def test_liger_capabilities():
    caps = get("liger").capabilities
    assert caps.devices == frozenset({"cuda"})
    assert caps.dtypes == frozenset({torch.float32, torch.bfloat16, torch.float16})
    assert (caps.bias, caps.softcap, caps.logit_scale, caps.temperature) == (True, True, True, True)
    assert caps.outputs == frozenset({"logprobs", "entropy"})
    assert caps.outputs <= frozenset(OUTPUTS)
    assert caps.options == frozenset({"entry", "accum_fp32"})
    assert not caps.vocab_parallel


def _problem(outputs=("logprobs",), bias=False, **transform):
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    return HeadProblem(
        hidden=hidden, weight=weight, bias=torch.zeros(weight.shape[0], dtype=weight.dtype) if bias else None,
        labels=labels, transform=LogitTransform(**transform), outputs=frozenset(outputs),
    )


@pytest.mark.parametrize(
    "kwargs, entry",
    [
        (dict(), "flce"),
        (dict(bias=True, softcap=30.0), "flce"),
        (dict(outputs=("logprobs", "entropy")), "scaled"),
        (dict(temperature=0.7), "scaled"),
        (dict(logit_scale=2.0), "scaled"),
    ],
)
def test_liger_auto_entry(kwargs, entry):
    assert LIGER.choose_entry(_problem(**kwargs)) == entry


# --- refusals through the registry -----------------------------------------------------------


@pytest.mark.parametrize("name", ["cce", "liger"])
def test_cpu_inputs_name_backend_feature_and_alternatives(monkeypatch, name):
    module = CCE if name == "cce" else LIGER
    _patched(monkeypatch, module, run=_no_work)
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError) as info:
        linear_logprobs(hidden, weight, labels, impl=name)
    assert str(info.value).startswith(f"impl {name!r} does not support device 'cpu'; backends that can run this call: [")
    assert "'torch'" in str(info.value)


@pytest.mark.parametrize("name", ["cce", "liger"])
def test_cpu_inputs_without_gpu_are_refused(name):
    """Unpatched: on a machine without CUDA the refusal names the backend and why (device or CUDA)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"impl '{name}'") as info:
        linear_logprobs(hidden, weight, labels, impl=name)
    message = str(info.value)
    assert "device 'cpu'" in message or "CUDA" in message or "not installed" in message


@pytest.mark.parametrize(
    "call, feature",
    [
        (lambda h, w, y: linear_logprobs(h, w, y, bias=torch.zeros(w.shape[0], dtype=w.dtype), impl="cce"), "bias"),
        (lambda h, w, y: linear_logprobs(h, w, y, temperature=0.5, impl="cce"), "temperature"),
        (lambda h, w, y: linear_logprobs(h, w, y, logit_scale=2.0, impl="cce"), "logit_scale"),
        (lambda h, w, y: linear_token_stats(h, w, y, outputs=("entropy",), impl="cce"), "output 'entropy'"),
        (lambda h, w, y: linear_logprobs(h, w, y, impl="cce", backend_options={"memory_budget": 1}), "option 'memory_budget'"),
    ],
)
def test_cce_refuses_unsupported_features_before_work(monkeypatch, call, feature):
    _patched(monkeypatch, CCE, devices={"cpu", "cuda"}, run=_no_work)
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError) as info:
        call(hidden, weight, labels)
    assert str(info.value).startswith(f"impl 'cce' does not support {feature}; backends that can run this call: [")
    assert "'torch'" in str(info.value)


def test_cce_refuses_fp32(monkeypatch):
    _patched(monkeypatch, CCE, devices={"cpu", "cuda"}, run=_no_work)
    hidden, weight, labels = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"impl 'cce' does not support dtype torch.float32; backends that can run this call: \[.*'torch'"):
        linear_logprobs(hidden, weight, labels, impl="cce")


def test_cce_rejects_bad_filter_eps_before_work(monkeypatch):
    _patched(monkeypatch, CCE, devices={"cpu", "cuda"})
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    for bad in ("fast", -1.0, True):
        with pytest.raises(ValueError, match="impl 'cce': option filter_eps"):
            linear_logprobs(hidden, weight, labels, impl="cce", backend_options={"filter_eps": bad})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bias=True, outputs=("entropy",)), r"impl 'liger' does not support bias together with output 'entropy'; backends that can run this call: \['torch'\]"),
        (dict(softcap=20.0, temperature=0.5), r"impl 'liger' does not support softcap together with temperature"),
        (dict(outputs=("entropy",), options={"entry": "flce"}), r"does not support output 'entropy' with entry 'flce' \(entry 'scaled' supports it\)"),
        (dict(bias=True, options={"entry": "scaled"}), r"does not support bias with entry 'scaled' \(entry 'flce' supports it\)"),
        (dict(options={"entry": "triton"}), r"option entry must be one of \['auto', 'flce', 'scaled'\]"),
        (dict(options={"accum_fp32": "yes"}), r"option accum_fp32 must be True or False"),
    ],
)
def test_liger_refuses_impossible_combinations_before_work(monkeypatch, kwargs, match):
    _patched(monkeypatch, LIGER, devices={"cpu", "cuda"})
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if kwargs.get("bias") else None
    with pytest.raises(ValueError, match=match):
        linear_token_stats(
            hidden, weight, labels, bias=bias, outputs=kwargs.get("outputs", ()), softcap=kwargs.get("softcap"),
            temperature=kwargs.get("temperature", 1.0), impl="liger", backend_options=kwargs.get("options"),
        )


def test_liger_refuses_stats_it_lacks(monkeypatch):
    _patched(monkeypatch, LIGER, devices={"cpu", "cuda"}, run=_no_work)
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError) as info:
        linear_token_stats(hidden, weight, labels, outputs=("entropy", "argmax_hit"), impl="liger")
    assert str(info.value).startswith("impl 'liger' does not support output 'argmax_hit'; backends that can run this call: [")
    assert "'torch'" in str(info.value)


# --- availability ----------------------------------------------------------------------------


@pytest.mark.parametrize("module, package, pip_name", [(CCE, "cut_cross_entropy", "cut-cross-entropy"), (LIGER, "liger_kernel", "liger-kernel")])
def test_availability_messages(monkeypatch, module, package, pip_name):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    installed.cache_clear()  # the lookups are cached per process
    reason = module.BACKEND.available()
    assert reason is not None and pip_name in reason and "not installed" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    installed.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = module.BACKEND.available()
    assert reason is not None and "no CUDA GPU is available" in reason
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    name = module.BACKEND.name
    with pytest.raises(ValueError, match=f"impl '{name}'"):
        linear_logprobs(hidden, weight, labels, impl=name)


def test_triton_refused_on_a_rocm_build(monkeypatch):
    from align_losses.backends import triton as triton_backend

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    installed.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    reason = triton_backend.BACKEND.available()
    assert reason is not None and "NVIDIA" in reason and "ROCm" in reason


# --- empty batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cce", "liger"])
def test_all_ignored_batch_gives_zero_grads(monkeypatch, name):
    module = CCE if name == "cce" else LIGER
    _patched(monkeypatch, module, devices={"cpu", "cuda"})
    hidden, weight, _ = _inputs(m=5, dtype=torch.bfloat16)
    labels = torch.full((5,), -100)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, requires_grad=True) if name == "liger" else None
    out = linear_logprobs(hidden, weight, labels, bias=bias, impl=name)
    assert out.dtype == torch.float32 and out.shape == (5,) and not out.any()
    out.sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()
    assert weight.grad is not None and not weight.grad.any()
    if bias is not None:
        assert bias.grad is not None and not bias.grad.any()
    if name == "liger":
        stats = linear_token_stats(hidden, weight, labels, outputs=("entropy",), impl=name)
        assert stats.entropy.shape == (5,) and stats.entropy.dtype == torch.float32
        (stats.logprobs.sum() + stats.entropy.sum()).backward()


# --- Liger's "scaled" entry on its own CPU fallback ---------------------------------------------


def test_liger_scaled_fallback_matches_torch_in_fp32(monkeypatch):
    """Runs the adapter end to end on Liger's PyTorch fallback (what it uses off Hopper)."""
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    _patched(monkeypatch, LIGER, devices={"cpu", "cuda"})
    hidden, weight, labels = _inputs(m=9, d=16, v=37)
    labels[2] = -100
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(9, generator=g), torch.randn(9, generator=g)
    results = {}
    for impl in ("liger", "torch"):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        stats = linear_token_stats(h, w, labels, outputs=("entropy",), temperature=1.3, logit_scale=0.7, impl=impl)
        ((stats.logprobs * up_lp).sum() + (stats.entropy * up_ent).sum()).backward()
        results[impl] = (stats.logprobs, stats.entropy, h.grad, w.grad)
    assert LIGER.LAST_SCALED_KERNEL == "fallback"
    for got, want in zip(results["liger"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
