"""Skip markers shared by the Triton tests: a CUDA GPU, or Triton's CPU interpreter."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter, read as Triton reads it (``1``, ``true``, ...)."""
    if not HAS_TRITON:
        return False
    from align_losses.ops.triton_kernels import interpreting

    return interpreting()


INTERP = _interpreter_requested()

_needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


def gpu(test):
    """The ``gpu`` mark (so that ``pytest -m gpu`` selects the test) and a skip without CUDA and Triton."""
    return pytest.mark.gpu(_needs_gpu(test))


interp = pytest.mark.skipif(not INTERP, reason="set TRITON_INTERPRET=1 (and install triton) to run on the CPU")
