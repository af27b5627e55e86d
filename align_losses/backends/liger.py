"""The ``"liger"`` backend: LinkedIn's Liger-Kernel (PyPI ``liger-kernel``, >= 0.8.5 for ``"flce"``).

Two Liger entry points, chosen with ``backend_options={"entry": ...}``:

``"flce"``: ``liger_kernel.ops.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyFunction``
    with ``reduction="none"``; log-prob = -loss. Supports a bias and soft-capping; outputs only
    ``logprobs``; fp32/bf16/fp16. Since liger-kernel 0.8.5 (PR linkedin/Liger-Kernel#1298, fixing
    issue #968) a ``reduction="none"`` call defers the gradient to backward, recomputes each chunk's
    logits there and multiplies each token's logit gradient by that token's upstream gradient
    *before* projecting it onto ``grad_weight``/``grad_bias``: exact for any upstream gradient.
    Older versions computed the gradients in forward and scaled them by ``grad_output[0]`` in
    backward (wrong for DPO-style per-token weights); the adapter refuses a Liger whose
    ``fused_linear_cross_entropy_forward`` lacks the ``token_grad_output`` argument of that fix.
    The weight/bias gradients are accumulated over token chunks in fp32 (``accum_dtype``)
    unless ``backend_options={"accum_fp32": False}`` (then in the parameter dtype, Liger's default).
    Precision: the chunk's logits are the GEMM output rounded to the input dtype (bf16 logits for
    bf16 inputs), and the logit gradient is stored in the input dtype before the backward GEMMs.

``"scaled"``: ``liger_kernel.ops.fused_linear_scaled_cross_entropy.LigerFusedLinearScaledCrossEntropyFunction``
    per-token NLL and (optionally) entropy, both differentiable, with exact per-token upstream
    gradients (its backward takes ``grad_output [M]`` and ``grad_entropy [M]`` as row scales).
    Supports ``temperature`` (``z = a / T``) and ``logit_scale`` (passed as ``T / logit_scale``);
    no bias, no soft-cap. On Hopper (sm_90) Liger runs its CuTe DSL kernel, which needs
    ``nvidia-cutlass-dsl`` and bf16 inputs; elsewhere it runs its own chunked PyTorch fallback
    (bf16 logits per 512-token chunk). When the CuTe kernel cannot be used on Hopper (the package is
    missing, or the inputs are not bf16) this adapter runs that same Liger fallback and logs a
    warning once. The entropy comes back from Liger in the input dtype (bf16) and is upcast here.
    ``LAST_SCALED_KERNEL`` records which one ran last ("cute_sm90" or "fallback").

The default ``"auto"`` picks ``"flce"`` when the call needs nothing beyond it (log-probs, with or
without bias/soft-cap) and ``"scaled"`` when it asks for the entropy, a temperature or a logit
scale. Nothing implements bias or soft-cap together with the entropy/temperature: such a call is
refused before any work (use ``impl="torch"``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Optional

import torch

from ..packages import installed
from ..problem import HeadProblem
from .base import Backend, Capabilities

logger = logging.getLogger("align_losses")

_PACKAGE = "liger_kernel"
_ENTRIES = ("auto", "flce", "scaled")
#: Which kernel the last ``"scaled"`` call ran: "cute_sm90", "fallback" or None (none yet).
LAST_SCALED_KERNEL: Optional[str] = None
_warned_fallback = False


def _available() -> Optional[str]:
    """None when Liger can run here, else why not. Imports nothing heavy (no Triton, no Liger)."""
    if not installed(_PACKAGE):
        return "the package liger-kernel is not installed (pip install 'liger-kernel>=0.8.5')"
    if not installed("triton"):
        return "liger-kernel needs Triton, which is not installed"
    if not torch.cuda.is_available():
        return "liger-kernel runs Triton/CuTe CUDA kernels and no CUDA GPU is available"
    return None


def _options(problem: HeadProblem) -> tuple[str, bool]:
    entry = problem.options.get("entry", "auto") or "auto"
    if entry not in _ENTRIES:
        raise ValueError(f"impl 'liger': option entry must be one of {list(_ENTRIES)}; got {entry!r}")
    accum_fp32 = problem.options.get("accum_fp32", True)
    if not isinstance(accum_fp32, bool):
        raise ValueError(f"impl 'liger': option accum_fp32 must be True or False; got {accum_fp32!r}")
    return entry, accum_fp32


def _entry_gaps(problem: HeadProblem) -> dict:
    """For each entry point, the features of ``problem`` it lacks (empty list: it can run it)."""
    t = problem.transform
    flce = []
    if t.temperature != 1.0:
        flce.append("temperature")
    if t.logit_scale != 1.0:
        flce.append("logit_scale")
    flce += [f"output {n!r}" for n in sorted(problem.outputs - {"logprobs"})]
    scaled = []
    if problem.bias is not None:
        scaled.append("bias")
    if t.softcap is not None:
        scaled.append("softcap")
    scaled += [f"output {n!r}" for n in sorted(problem.outputs - {"logprobs", "entropy"})]
    return {"flce": flce, "scaled": scaled}


def choose_entry(problem: HeadProblem) -> str:
    """The entry point that will run ``problem`` (`_combination_gaps` has already accepted it)."""
    entry, _ = _options(problem)
    if entry == "auto":
        return "flce" if not _entry_gaps(problem)["flce"] else "scaled"
    return entry


def _combination_gaps(problem: HeadProblem) -> list:
    """What no single entry point can provide for ``problem`` (the registry's finer check)."""
    entry, _ = _options(problem)
    gaps = _entry_gaps(problem)
    if entry != "auto":
        if not gaps[entry]:
            return []
        other = "scaled" if entry == "flce" else "flce"
        hint = f" (entry {other!r} supports it)" if not gaps[other] else ""
        return [f"{', '.join(gaps[entry])} with entry {entry!r}{hint}"]
    if gaps["flce"] and gaps["scaled"]:
        return [f"{', '.join(gaps['scaled'])} together with {', '.join(gaps['flce'])}"]
    return []


def _empty(problem: HeadProblem, names) -> dict:
    """Outputs for M == 0: empty fp32 tensors still attached to the inputs (zero gradients)."""
    zero = problem.weight[:0].sum()
    if problem.bias is not None:
        zero = zero + problem.bias[:0].sum()
    empty = (problem.hidden.sum(dim=-1) + zero).float()
    return {n: empty for n in names}


def _bind(fn, args: dict) -> list:
    """Positional arguments for ``fn`` (an autograd ``forward``, ``ctx`` dropped) from keywords.

    ``Function.apply`` takes positional arguments only; binding by name keeps the call right
    across Liger versions that insert parameters, and fails loudly if one we need is gone.
    """
    params = list(inspect.signature(fn).parameters.values())[1:]
    names = [p.name for p in params]
    unknown = set(args) - set(names)
    if unknown:
        raise RuntimeError(f"impl 'liger': the installed liger-kernel's {fn.__qualname__} has no argument(s) {sorted(unknown)}")
    last = max(names.index(n) for n in args)
    out = []
    for p in params[: last + 1]:
        if p.name in args:
            out.append(args[p.name])
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            raise RuntimeError(f"impl 'liger': no value for required argument {p.name!r} of {fn.__qualname__}")
    return out


@functools.lru_cache(maxsize=1)
def _flce():
    from liger_kernel.ops import fused_linear_cross_entropy as mod

    if "token_grad_output" not in inspect.signature(mod.fused_linear_cross_entropy_forward).parameters:
        raise RuntimeError(
            "impl 'liger': the installed liger-kernel computes reduction='none' gradients in forward and "
            "scales them by one scalar in backward, which is wrong for per-token upstream gradients "
            "(linkedin/Liger-Kernel#968); upgrade to liger-kernel >= 0.8.5"
        )
    return mod.LigerFusedLinearCrossEntropyFunction


def _run_flce(problem: HeadProblem, accum_fp32: bool) -> dict:
    fn = _flce()
    args = dict(
        _input=problem.hidden.contiguous(),
        weight=problem.weight,
        target=problem.labels.contiguous(),
        bias=problem.bias,
        ignore_index=-100,
        reduction="none",
        softcap=float(problem.transform.softcap) if problem.transform.softcap is not None else None,
        accum_dtype=torch.float32 if accum_fp32 else None,
    )
    loss = fn.apply(*_bind(fn.forward, args))[0]
    return {"logprobs": -loss.float()}


def _scaled_function(problem: HeadProblem):
    """Liger's dispatch for the scaled entry, with its own fallback where the CuTe kernel cannot run."""
    global LAST_SCALED_KERNEL, _warned_fallback
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as mod

    fallback = mod._FusedLinearPPOFallbackFunction
    reason = None
    try:
        fn = mod._resolve_implementation(problem.hidden.device)
    except ImportError as exc:  # Hopper without nvidia-cutlass-dsl
        fn, reason = fallback, f"its CuTe DSL kernel cannot be imported ({exc})"
    if fn is not fallback and problem.hidden.dtype != torch.bfloat16:
        fn, reason = fallback, f"its CuTe DSL kernel takes bf16 inputs only (got {problem.hidden.dtype})"
    if reason is not None and not _warned_fallback:
        _warned_fallback = True
        logger.warning("impl 'liger' entry 'scaled': %s; running Liger's PyTorch fallback instead", reason)
    LAST_SCALED_KERNEL = "fallback" if fn is fallback else "cute_sm90"
    return fn


def _run_scaled(problem: HeadProblem) -> dict:
    fn = _scaled_function(problem)
    t = problem.transform
    want_entropy = "entropy" in problem.outputs
    args = dict(
        temperature=float(t.temperature) / float(t.logit_scale),
        ignore_index=-100,
        return_entropy=want_entropy,
    )
    # The fallback's forward is (hidden, weight, ids, temperature, ignore_index, return_entropy, ...);
    # the CuTe function's adds m_tiles_per_cluster; bind by name to the one chosen.
    params = list(inspect.signature(fn.forward).parameters)[1:]
    first = {params[0]: problem.hidden.contiguous(), params[1]: problem.weight.contiguous(), params[2]: problem.labels.contiguous()}
    out = fn.apply(*_bind(fn.forward, {**first, **args}))
    nll, entropy = (out if want_entropy else (out, None))
    result = {"logprobs": -nll.float()}
    if want_entropy:
        result["entropy"] = entropy.float()
    return result


def _run(problem: HeadProblem) -> dict:
    entry = choose_entry(problem)
    _, accum_fp32 = _options(problem)
    names = ["logprobs", *sorted(problem.outputs - {"logprobs"})]
    if problem.hidden.shape[0] == 0:
        return _empty(problem, names)
    if entry == "flce":
        return _run_flce(problem, accum_fp32)
    return _run_scaled(problem)


BACKEND = Backend(
    name="liger",
    capabilities=Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        # Union of the two entry points: 'flce' has bias/softcap, 'scaled' has temperature,
        # logit_scale and the entropy; combinations of the two groups are refused by `_combination_gaps` (the registry's extra check).
        bias=True,
        softcap=True,
        logit_scale=True,
        temperature=True,
        outputs=frozenset({"logprobs", "entropy"}),
        vocab_parallel=False,
        options=frozenset({"entry", "accum_fp32"}),
    ),
    run=_run,
    available=_available,
    extra_check=_combination_gaps,
)
