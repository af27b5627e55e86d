"""The backend registry and the one check of a call against a backend (`check`).

Decision table for ``impl="auto"`` (overridable per call, or for the whole process with the
environment variable ``ALIGN_LOSSES_IMPL``):

==================  ==========  =============================================================
inputs on           chosen      why
==================  ==========  =============================================================
CUDA, Triton found  ``triton``  exact, and the fastest backend of the head benchmark at
                                memory close to CCE's; ``torch`` for a call it cannot run
CUDA, no Triton     ``torch``   the tiled pure-PyTorch path
not CUDA            ``torch``   the only backend that runs off CUDA
==================  ==========  =============================================================

``cce`` and ``liger`` run only when asked for by name. The figures behind the table (each
backend's time against the three-GEMM floor and TRL's chunked head, its peak memory and its
error) are those of the latest head benchmark, in benchmarks/results/head-latest.md
(benchmarks/head.py writes it); they are not copied here, where they would go stale.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

from ..problem import HeadProblem
from .base import Backend

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
_LOADED: dict = {}  # name -> the module defining its BACKEND, filled by `get`
ENV_VAR = "ALIGN_LOSSES_IMPL"

_logged_choices: set = set()


def names() -> list[str]:
    """Names accepted for ``impl``, ``"auto"`` first."""
    return ["auto", *_MODULES, *_ALIASES]


class BackendError(ValueError):
    """Why backend ``impl`` cannot run a call; raised by `get` and `check`.

    ``kind`` is ``"unknown"`` (no backend has that name; ``reason`` lists the names),
    ``"unsupported"`` (the call asks for features the backend lacks; ``reason`` lists them) or
    ``"unavailable"`` (it cannot run in this environment; ``reason`` says why). The message is the
    core's; a caller that names the setting otherwise (the trainers' ``lce_impl``) words its own
    from ``impl``, ``kind`` and ``reason``.
    """

    def __init__(self, message: str, *, impl: str, kind: str, reason: str) -> None:
        super().__init__(message)
        self.impl = impl
        self.kind = kind
        self.reason = reason


class _TracedBackendError(BackendError):
    """A `BackendError` built without its ``__init__``, which Dynamo cannot trace (see `raise_backend_error`)."""

    __init__ = ValueError.__init__


def raise_backend_error(message: str, *, impl: str, kind: str, reason: str) -> None:
    """Raise `BackendError` from code that `torch.compile` traces: without ``fullgraph`` the compiled call
    raises it as an eager one does; with ``fullgraph`` Dynamo reports it (message included) as unsupported."""
    error = _TracedBackendError(message)
    error.impl, error.kind, error.reason = impl, kind, reason
    raise error


def get(name: str) -> Backend:
    """The backend registered under ``name`` (an alias is resolved). Raises `BackendError` if unknown."""
    key = _ALIASES.get(name, name)
    if key not in _MODULES:
        expected = f"expected one of {names()}"
        raise BackendError(f"unknown impl {name!r}: {expected}", impl=name, kind="unknown", reason=expected)
    if key not in _LOADED:  # once per backend: a dict hit afterwards, which torch.compile traces without a break
        _LOADED[key] = importlib.import_module(_MODULES[key], __name__)
    return _LOADED[key].BACKEND


def check(impl: Optional[str], problem: Optional[HeadProblem] = None) -> Optional[Backend]:
    """The backend that runs a call with ``impl``, once it is known to exist, to run here and to
    support the call; raises `BackendError` otherwise. The one check of a call against a backend:
    the core runs it before any work, the trainers when they are built.

    ``problem`` is the call, or a probe of it whose tensors give only the compute dtype and the
    device (see `align_losses.problem.HeadProblem`). ``impl`` None or ``"auto"`` defers to
    ``$ALIGN_LOSSES_IMPL`` and then to the decision table above. Checked in this order: the
    name, the call's features (the message names the backends that could run it), the
    environment. Without ``problem`` (a setting checked before any model exists) only the name
    and the environment are checked, and ``"auto"`` gives None: its choice needs the call.
    """
    impl = impl or "auto"
    if problem is None:
        if impl == "auto":
            return None
        backend = get(impl)
        _require_available(backend)
        return backend
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
        raise BackendError(
            f"impl {backend.name!r} does not support {', '.join(missing)}; "
            f"backends that can run this call: {able or 'none'}",
            impl=backend.name, kind="unsupported", reason=", ".join(missing),
        )
    _require_available(backend)
    return backend


def _require_available(backend: Backend) -> None:
    reason = backend.available()
    if reason is not None:
        raise BackendError(f"impl {backend.name!r} cannot run here: {reason}", impl=backend.name,
                           kind="unavailable", reason=reason)


def _auto_choice(problem: HeadProblem) -> str:
    if problem.hidden.device.type == "cuda":
        triton_backend = get("triton")
        if triton_backend.available() is None and not triton_backend.unsupported(problem):
            return "triton"
    return "torch"


def _can_run(name: str, problem: HeadProblem) -> bool:
    backend = get(name)
    return backend.available() is None and not backend.unsupported(problem)
