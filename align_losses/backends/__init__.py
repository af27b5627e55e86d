"""The backend registry and the ``impl="auto"`` rule.

Decision table for ``impl="auto"`` (overridable per call, or for the whole process with the
environment variable ``ALIGN_LOSSES_IMPL``), from the head benchmark on an H200
(benchmarks/results/head-latest.md):

==================  ==========  =============================================================
inputs on           chosen      why
==================  ==========  =============================================================
CUDA, Triton found  ``triton``  exact; 1.38-1.48x the three-GEMM floor (four cuBLAS GEMMs:
                                1.35-1.50x), against 1.62-1.81x for TRL 1.16's chunked head
                                in the same run, at CCE-like memory; ``torch`` runs at
                                2.5-3.5x, ``cce`` at 4.0-5.0x (and 10x less exact on flat
                                logits), ``liger`` at 1.9-4.9x
CUDA, no Triton     ``torch``   the tiled pure-PyTorch path
not CUDA            ``torch``   the only backend that runs off CUDA
==================  ==========  =============================================================

``cce`` and ``liger`` run only when asked for by name.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

from .base import Backend, HeadProblem

logger = logging.getLogger("align_losses")

#: Registered backends, by name, and the module of this package that defines each (imported on
#: first use so that importing ``align_losses`` never imports Triton, CCE or Liger; relative, so
#: that a copy of the package under another name runs its own backends).
_MODULES = {
    "torch": ".torch_tiled",
    "triton": ".triton",
    "cce": ".cce",
    "liger": ".liger",
}
_ALIASES = {"pytorch": "torch"}
ENV_VAR = "ALIGN_LOSSES_IMPL"

_logged_choices: set = set()


def names() -> list[str]:
    """Names accepted for ``impl``, ``"auto"`` first."""
    return ["auto", *_MODULES, *_ALIASES]


def get(name: str) -> Backend:
    """The backend registered under ``name`` (an alias is resolved). Raises ValueError if unknown."""
    key = _ALIASES.get(name, name)
    if key not in _MODULES:
        raise ValueError(f"unknown impl {name!r}: expected one of {names()}")
    return importlib.import_module(_MODULES[key], __name__).BACKEND


def _auto_choice(problem: HeadProblem) -> str:
    if problem.hidden.device.type == "cuda":
        triton_backend = get("triton")
        if triton_backend.available() is None and not triton_backend.unsupported(problem):
            return "triton"
    return "torch"


def resolve(impl: Optional[str], problem: HeadProblem) -> Backend:
    """The backend to run ``problem`` on, checked against its capabilities before any work.

    ``impl`` None or ``"auto"`` defers to ``$ALIGN_LOSSES_IMPL`` and then to the decision table.
    """
    impl = impl or "auto"
    if impl == "auto":
        impl = os.environ.get(ENV_VAR) or "auto"
    if impl == "auto":
        name = _auto_choice(problem)
        key = (problem.hidden.device.type, name)
        if key not in _logged_choices:
            _logged_choices.add(key)
            logger.info("impl='auto' chose backend %r for %s inputs", name, problem.hidden.device.type)
    else:
        name = impl
    backend = get(name)
    missing = backend.unsupported(problem)
    if missing:
        able = [n for n in _MODULES if n != backend.name and _can_run(n, problem)]
        raise ValueError(
            f"impl {backend.name!r} does not support {', '.join(missing)}; "
            f"backends that can run this call: {able or 'none'}"
        )
    reason = backend.available()
    if reason is not None:
        raise ValueError(f"impl {backend.name!r} cannot run here: {reason}")
    return backend


def _can_run(name: str, problem: HeadProblem) -> bool:
    backend = get(name)
    return backend.available() is None and not backend.unsupported(problem)
