"""Whether an optional package is installed, looked up once per process.

``importlib.util.find_spec`` takes some 50 us; the backends' availability checks and the ``"torch"`` backend's
choice of compiled tiles ask on every call, before its first kernel. Tests that pretend a package is missing or
present patch ``find_spec`` and call ``installed.cache_clear()``.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def installed(name: str) -> bool:
    """Whether the top-level package ``name`` can be imported (it is not imported)."""
    return importlib.util.find_spec(name) is not None
