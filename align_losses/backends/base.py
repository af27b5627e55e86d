"""What a backend is: a head computation on labelled tokens, and a declaration of what it supports.

Every backend takes the same `align_losses.problem.HeadProblem` and returns one float32 ``[M]``
tensor per requested output (see that module for the contract). The contract's names are
re-exported here for code written against this module before the contract had its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..problem import DIFFERENTIABLE_OUTPUTS, OUTPUTS, HeadProblem, LogitTransform, VocabShard

__all__ = ["Backend", "Capabilities", "DIFFERENTIABLE_OUTPUTS", "OUTPUTS", "HeadProblem", "LogitTransform",
           "VocabShard"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. The core checks a problem against this before any work."""

    devices: frozenset  # device types, e.g. {"cpu", "cuda"}; {"*"} for any
    dtypes: frozenset  # input dtypes of hidden/weight
    bias: bool
    softcap: bool
    logit_scale: bool
    temperature: bool
    outputs: frozenset  # subset of OUTPUTS
    vocab_parallel: bool = False
    options: frozenset = frozenset()  # backend-specific keyword options it accepts


@dataclass(frozen=True)
class Backend:
    """A registered implementation of the head.

    ``run(problem) -> dict[str, Tensor[M] float32]`` holds the computation (the module defining the
    backend says how); ``available()``
    returns None when the backend can run in this environment, or a sentence saying why not
    (a missing package, no GPU).
    """

    name: str
    capabilities: Capabilities
    run: Callable[[HeadProblem], dict]
    available: Callable[[], Optional[str]] = lambda: None
    #: A finer check than `capabilities` (feature combinations, option-dependent limits):
    #: ``problem -> [missing features]``.
    extra_check: Optional[Callable[[HeadProblem], list]] = None
    #: The computation as a registered operator (`align_losses.ops.library`), which `torch.compile` traces
    #: as one node and a CUDA graph can capture: ``(problem, ignore_index) -> dict | None`` on every row of
    #: a problem whose labels may hold ``ignore_index`` (outputs ``[N]``, 0 there), checking the labels
    #: inside the op; None where the backend or this call's options have no such path.
    run_traceable: Optional[Callable[[HeadProblem, int], Optional[dict]]] = None

    def unsupported(self, problem: HeadProblem) -> list[str]:
        """The features of ``problem`` this backend cannot provide (empty when it can run it)."""
        caps = self.capabilities
        device = problem.hidden.device.type
        missing = []
        if "*" not in caps.devices and device not in caps.devices:
            missing.append(f"device {device!r}")
        if problem.hidden.dtype not in caps.dtypes:
            missing.append(f"dtype {problem.hidden.dtype}")
        if problem.bias is not None and not caps.bias:
            missing.append("bias")
        t = problem.transform
        if t.softcap is not None and not caps.softcap:
            missing.append("softcap")
        if t.logit_scale != 1.0 and not caps.logit_scale:
            missing.append("logit_scale")
        if t.temperature != 1.0 and not caps.temperature:
            missing.append("temperature")
        for name in sorted(problem.outputs - caps.outputs):
            missing.append(f"output {name!r}")
        if problem.shard is not None and not caps.vocab_parallel:
            missing.append("vocabulary-parallel weight shard")
        for key in sorted(set(problem.options) - caps.options):
            missing.append(f"option {key!r}")
        if not missing and self.extra_check is not None:
            missing.extend(self.extra_check(problem))
        return missing
