"""GEMMs with fp32 results from any operand dtype, for both heads' tiles (pure PyTorch).

On CUDA, half-precision operands go to tensor cores with an fp32 output, so a product is never rounded
to bf16; an accumulation is the GEMM's own ``C += A B`` (no product temporary). Elsewhere the operands
are upcast, which is exact and the only way CPUs offer. `mm_into`'s in-place and ``out=`` forms are not
autocast-eligible, so its result is fp32 under any autocast; `matmul_fp32` on fp32 or CPU operands is, so a
caller under autocast must turn it off (the torch head's forward and backward do).
"""

from __future__ import annotations

import torch


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as a new fp32 tensor, fp32 accumulation."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` (``first``) or ``acc += a @ b``, into the fp32 ``acc``, fp32 accumulation."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif a.is_cuda:
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif first:  # CPU (and the Triton interpreter in tests): upcast, exact
        torch.mm(a.float(), b.float(), out=acc)
    else:
        acc.addmm_(a.float(), b.float())
