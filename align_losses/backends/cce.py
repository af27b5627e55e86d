"""The ``"cce"`` backend: Apple's Cut Cross-Entropy (PyPI ``cut-cross-entropy``, written for 25.1.1).

CCE's Triton kernels compute ``lse`` and the label logit with fp32 accumulators and recompute the
logits tile by tile in backward, so per-token log-probs come from ``-linear_cross_entropy(...,
reduction="none")``. Its backward scales each token's logit gradient by that token's upstream
gradient (``d_out`` is loaded per row), so arbitrary per-token upstream gradients are exact up to
CCE's rounding.

What it supports here (see ``BACKEND.capabilities``):

* CUDA only; bf16/fp16 inputs only (25.1.1's backward asserts a half-precision ``hidden``).
* soft-capping (``softcap * tanh(a / softcap)``, CCE's own definition, identical to ours).
* no bias (25.1.1 has no bias argument), no ``temperature`` or ``logit_scale`` (they could only be
  folded into the bf16 operands, which would round them: a different answer), only ``logprobs``.

Gradient filtering: CCE skips backward tiles whose softmax gradient is below ``filter_eps``. That
changes gradients, so this backend passes ``filter_eps=None`` (no filtering, exact) unless the
caller sets ``backend_options={"filter_eps": ...}``, with any value CCE accepts: a float, or
``"auto"``/``"high"`` (both ``torch.finfo(dtype).eps / 32`` in 25.1.1, i.e. 2.4e-4 for bf16).
Note that CCE's own public default is ``"high"``: calling CCE directly filters by default.

Known precision limits of 25.1.1 (measured in tests/test_backends_gpu.py): the logit gradient is
rounded to the input dtype before the backward GEMMs, and the hidden and weight gradients are
accumulated across vocabulary/token blocks in the input dtype (bf16 atomics), not in fp32.
Newer CCE versions add ``accum_e_fp32``/``accum_c_fp32``; when the installed signature has them
this adapter sets both to True.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from ..packages import installed
from ..problem import HeadProblem
from .base import Backend, Capabilities

_PACKAGE = "cut_cross_entropy"
_FILTER_EPS_STRINGS = ("auto", "high")


def _available() -> Optional[str]:
    """None when CCE can run here, else why not. Imports nothing heavy (no Triton, no CCE)."""
    if not installed(_PACKAGE):
        return "the package cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    if not installed("triton"):
        return "cut-cross-entropy needs Triton, which is not installed"
    if not torch.cuda.is_available():
        return "cut-cross-entropy runs Triton CUDA kernels and no CUDA GPU is available"
    return None


@functools.lru_cache(maxsize=1)
def _entry():
    """``(linear_cross_entropy, the names of its parameters)``, imported on first use."""
    from cut_cross_entropy import linear_cross_entropy

    params = frozenset(inspect.signature(linear_cross_entropy).parameters)
    for needed in ("reduction", "ignore_index"):
        if needed not in params:
            raise RuntimeError(
                f"impl 'cce': this cut-cross-entropy's linear_cross_entropy has no {needed!r} argument; "
                "the adapter was written for cut-cross-entropy 25.1.1"
            )
    return linear_cross_entropy, params


def _filter_eps(problem: HeadProblem):
    value = problem.options.get("filter_eps")
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _FILTER_EPS_STRINGS:
            raise ValueError(f"impl 'cce': option filter_eps must be None, a float or one of {_FILTER_EPS_STRINGS}; got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"impl 'cce': option filter_eps must be None, a float >= 0 or one of {_FILTER_EPS_STRINGS}; got {value!r}")
    return float(value)


def _empty(problem: HeadProblem) -> dict:
    """Outputs for M == 0: empty fp32 tensors still attached to hidden and weight (zero gradients)."""
    zero = problem.weight[:0].sum()
    return {"logprobs": (problem.hidden.sum(dim=-1) + zero).float()}


def _run(problem: HeadProblem) -> dict:
    filter_eps = _filter_eps(problem)  # validate options before any work
    if problem.hidden.shape[0] == 0:
        return _empty(problem)
    linear_cross_entropy, params = _entry()
    kwargs = dict(ignore_index=-100, reduction="none")
    softcap = problem.transform.softcap
    if softcap is not None:
        if "softcap" not in params:
            raise ValueError("impl 'cce': the installed cut-cross-entropy has no softcap argument")
        kwargs["softcap"] = float(softcap)
    if "filter_eps" not in params:
        raise RuntimeError(
            "impl 'cce': the installed cut-cross-entropy's linear_cross_entropy has no filter_eps argument, "
            "so it cannot be told to leave gradients unfiltered"
        )
    kwargs["filter_eps"] = filter_eps
    for flag in ("accum_e_fp32", "accum_c_fp32"):
        if flag in params:
            kwargs[flag] = True
    if "shift" in params:
        kwargs["shift"] = False
    nll = linear_cross_entropy(e=problem.hidden, c=problem.weight, targets=problem.labels, **kwargs)
    return {"logprobs": -nll.float()}


BACKEND = Backend(
    name="cce",
    capabilities=Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        bias=False,
        softcap=True,
        logit_scale=False,
        temperature=False,
        outputs=frozenset({"logprobs"}),
        vocab_parallel=False,
        options=frozenset({"filter_eps"}),
    ),
    run=_run,
    available=_available,
)
