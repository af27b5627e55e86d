"""GEMMs with fp32 results from any operand dtype, for both heads' tiles (pure PyTorch).

On CUDA, half-precision operands go to tensor cores with an fp32 output, so a product is never rounded
to bf16; an accumulation is the GEMM's own ``C += A B`` (no product temporary). Elsewhere the operands
are upcast, which is exact and the only way CPUs offer (CPU torch has no bf16 GEMM with an fp32 output). On
the CPU, two bf16 operands' upcasts go through oneDNN's bf16 kernels (`cpu_bf16_kernels`): their products are
exact in fp32 and their sums fp32, so the result is an fp32 GEMM's, several times faster on CPUs with bf16 units. `mm_into`'s in-place and ``out=`` forms are not
autocast-eligible, so its result is fp32 under any autocast; `matmul_fp32` on fp32 or CPU operands is, so a
caller under autocast must turn it off (the torch head's forward and backward do).
"""

from __future__ import annotations

import contextlib

import torch


def upcasts(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `matmul_fp32` and `mm_into` copy operands of ``dtype`` on ``device`` to fp32 first (a copy the size
    of the operand, twice its bytes for half precision): everywhere but CUDA, for all but fp32."""
    return dtype != torch.float32 and device.type != "cuda"


def tf32_matmuls() -> bool:
    """Whether PyTorch runs fp32 CUDA matmuls in TF32. Read from the per-backend precision setting where torch has
    one (2.9 on): there, once TF32 was set through the new API (``torch.backends.fp32_precision = "tf32"``, as
    transformers' TrainingArguments does under ``torch_compile``), reading the legacy ``allow_tf32`` raises a
    RuntimeError. The setting also reflects ``allow_tf32 = True`` set the legacy way."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as a new fp32 tensor, fp32 accumulation."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    with cpu_bf16_kernels(a, b):
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
    else:  # CPU (and the Triton interpreter in tests): upcast, exact
        with cpu_bf16_kernels(a, b):
            if first:
                torch.mm(a.float(), b.float(), out=acc)
            else:
                acc.addmm_(a.float(), b.float())


def writes_bf16(a: torch.Tensor) -> bool:
    """Whether `mm_rounded` has the GEMM itself write a bf16 product of operands like ``a`` (bf16 on CUDA), rather
    than making it in fp32 and casting it (elsewhere: no gain over `matmul_fp32` and a cast; fp16: cuBLAS may then
    accumulate in fp16, under PyTorch's ``allow_fp16_accumulation``)."""
    return a.is_cuda and a.dtype == torch.bfloat16


def mm_rounded(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` in ``out``'s dtype (the operands'): an fp32 accumulation rounded once, as `matmul_fp32`
    followed by a cast (to the order of the fp32 sums). Where `writes_bf16`, cuBLAS writes the rounded product itself,
    with no fp32 temporary and no cast, and with PyTorch's reduced-precision reductions turned off for the call
    (`_exact_reductions`: a split-K GEMM would otherwise round its partial sums to bf16 before adding them)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif writes_bf16(a):
        with _exact_reductions():
            torch.mm(a, b, out=out)
    else:
        out.copy_(matmul_fp32(a, b))


@contextlib.contextmanager
def _exact_reductions():
    """CUDA bf16 GEMMs without reduced-precision reductions, PyTorch's setting restored after, split-K part
    included where this torch has one (2.9 on). The setting is the process's: a GEMM another thread launches in
    between runs with it too (exact reductions, slower at most)."""
    matmul = torch.backends.cuda.matmul
    name = "allow_bf16_reduced_precision_reduction"
    split_k = getattr(matmul, f"{name}_split_k", None)  # None: a torch whose setting is one bool
    before = getattr(matmul, name)
    setattr(matmul, name, False if split_k is None else (False, split_k))
    try:
        yield
    finally:
        setattr(matmul, name, before if split_k is None else (before, split_k))


@contextlib.contextmanager
def cpu_bf16_kernels(a: torch.Tensor, b: torch.Tensor):
    """On the CPU with bf16 ``a`` and ``b``: the fp32 GEMMs of their upcasts run on oneDNN's bf16 kernels
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, restored after; torch 2.9 on). The upcasts are
    bf16 values, which those kernels take unrounded, so this changes speed, not values. Other operands (fp16,
    whose values bf16 cannot hold), devices or torch versions: unchanged."""
    settings = getattr(torch.backends.mkldnn, "matmul", None)
    if (a.device.type != "cpu" or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16
            or not hasattr(settings, "fp32_precision")):
        yield
        return
    before = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before
