"""Host-side pieces of the ``"triton"`` backend that its dense path (`align_losses.ops.triton_head`)
and its filtering backward (`align_losses.ops.triton_filter`) share: the kernels' precision and
logit-transform arguments, the per-token upstream terms of ``dL/da``, the default size of the
backward's buffer, and the fp32 label-entry additions that finish both backwards' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..problem import DIFFERENTIABLE_OUTPUTS, LogitTransform, VocabShard
from .gemm import tf32_matmuls
from .triton_kernels import interpreting, label_rows_kernel, label_weight_rows_kernel

#: Bytes of the backward's ``dL/da`` chunk buffer on top of ``M x D`` operand-dtype elements
#: (the hidden-state gradient in the operand dtype is only allocated after the chunk loop, so
#: the buffer may use that room too). The loop's peak is the weight gradient, the fp32
#: hidden-state accumulator, this buffer and the core's copy of the labelled hidden states.
#: Wider chunks are faster (fewer chunks); this is the largest of the sizes tried that kept that
#: peak within the gradients + 0.15 GiB + 4 B x M x D (the timings and peaks are in
#: benchmarks/NOTES-triton.md).
EXTRA_BUFFER_BYTES = 80 * 2**20


def dot_prec(dtype: torch.dtype) -> str:
    """The kernels' ``DOT_PREC``: how ``tl.dot`` multiplies operands of ``dtype`` here (fp32 ones as PyTorch's own
    CUDA matmuls would: `tf32_matmuls`)."""
    if interpreting():
        return "interp"
    if dtype == torch.float32:
        return "tf32" if tf32_matmuls() else "ieee"
    return "ieee"  # ignored for 16-bit operands


@dataclass
class Upstream:
    """The per-token upstream terms of ``dL/da`` (fp32 ``[M]`` each; zeros where absent).

    ``dL/dz = p * (coef - g_entropy * (z - E[z])) + g_mean / V + g_logprob * onehot(label)``.
    """

    coef: torch.Tensor  # g_logsumexp - g_logprob
    g_entropy: torch.Tensor
    g_mean: torch.Tensor  # already divided by the vocabulary size
    g_logprob: torch.Tensor
    expected_z: torch.Tensor
    has_entropy: bool
    has_mean: bool
    has_logprob: bool

    @staticmethod
    def of(up: dict, m: int, expected_z: Optional[torch.Tensor], vocab: Optional[int], device) -> "Upstream":
        """From the upstream gradients by output name; ``vocab`` (the full vocabulary size) is
        needed only with a mean-logit gradient."""
        up = {n: g.float().contiguous() for n, g in up.items() if n in DIFFERENTIABLE_OUTPUTS}
        zero = torch.zeros(m, dtype=torch.float32, device=device)
        coef = zero.clone()
        if "logsumexp" in up:
            coef += up["logsumexp"]
        if "logprobs" in up:
            coef -= up["logprobs"]
        has_ent = "entropy" in up and expected_z is not None
        return Upstream(
            coef=coef, g_entropy=up["entropy"] if has_ent else zero,
            g_mean=up["mean_logit"] / vocab if "mean_logit" in up else zero,
            g_logprob=up.get("logprobs", zero), expected_z=expected_z if has_ent else zero,
            has_entropy=has_ent, has_mean="mean_logit" in up, has_logprob="logprobs" in up,
        )

    def kernel_args(self) -> tuple:
        """``Ez, Coef, GEnt, GMean`` as the kernels take them (``g_logprob`` goes apart)."""
        return self.expected_z, self.coef, self.g_entropy, self.g_mean

    def kernel_flags(self) -> dict:
        return dict(HAS_ENT=self.has_entropy, HAS_MEAN=self.has_mean)


def transform_flags(t: LogitTransform) -> dict:
    """The kernels' constexpr switches for a logit transform."""
    return dict(SOFTCAP=t.softcap is not None, SCALED=(t.logit_scale != 1.0 or t.temperature != 1.0))


def transform_args(t: LogitTransform) -> tuple:
    """``scale, softcap, inv_temp, dz_factor, t_over_c`` as the backward kernels take them."""
    return (float(t.logit_scale), float(t.softcap or 1.0), 1.0 / float(t.temperature),
            float(t.logit_scale) / float(t.temperature),
            (float(t.temperature) / float(t.softcap)) if t.softcap is not None else 1.0)


#: Rows and columns of one `label_rows_kernel` program.
_ADD_LABEL_ROWS_TILE = (16, 256)


def add_label_rows(acc: torch.Tensor, coef: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   offset: int) -> None:
    """``acc[t] += coef[t] * weight[labels[t] - offset]`` in place, in one kernel (tokens labelled in
    other shards skipped). ``acc`` fp32 ``[M, D]`` (contiguous), ``coef`` fp32 ``[M]``, ``labels``
    ``[M]`` global ids, ``weight`` this shard's ``[V, D]`` rows from ``offset``.
    """
    m, d = acc.shape
    br, bd = _ADD_LABEL_ROWS_TILE
    label_rows_kernel[(triton.cdiv(m, br), triton.cdiv(d, bd))](
        acc, coef, weight, labels, m, d, weight.shape[0], weight.stride(0), offset, BR=br, BD=bd, num_warps=4,
    )


#: Sorted tokens and columns of one `label_weight_rows_kernel` program, and the tokens per step of
#: a run it sums past its block. 128 columns were faster than 256 at every label mix timed; a
#: longer step shortens a frequent label's tail but slows uniform labels more than that gains
#: (benchmarks/NOTES-triton.md).
_ADD_LABEL_WEIGHT_TILE = (16, 128)
_ADD_LABEL_WEIGHT_TAIL = 64


def add_label_weight_rows(grad_weight: torch.Tensor, entry: torch.Tensor, hidden: torch.Tensor,
                          labels: torch.Tensor, offset: int) -> None:
    """``grad_weight[labels[t] - offset] += entry[t] * hidden[t]`` over the tokens, summed per row in
    fp32 and added before the row's one rounding in this kernel, in a fixed order (deterministic,
    unlike atomics). ``grad_weight`` this shard's ``[V, D]`` rows from ``offset``; ``entry`` fp32
    ``[M]``; ``labels`` ``[M]`` global ids (those of other shards skipped).
    """
    v, d = grad_weight.shape
    m = labels.shape[0]
    if m == 0:
        return
    bt, bd = _ADD_LABEL_WEIGHT_TILE
    ordered, order = torch.sort(labels, stable=True)
    label_weight_rows_kernel[(triton.cdiv(m, bt), triton.cdiv(d, bd))](
        grad_weight, hidden, entry, ordered, order, m, v, d, grad_weight.stride(0), hidden.stride(0), offset,
        BT=bt, BD=bd, TAIL=_ADD_LABEL_WEIGHT_TAIL, num_warps=4,
    )


def hidden_grad(acc: torch.Tensor, label_coef: Optional[torch.Tensor], weight: torch.Tensor, labels: torch.Tensor,
                shard: Optional[VocabShard], dtype: torch.dtype) -> torch.Tensor:
    """The hidden-state gradient ``[M, D]`` in the operand dtype from the fp32 accumulator: each
    token's ``label_coef`` (fp32 ``[M]``, or None) times its label's weight row added, then summed
    over the vocabulary shards."""
    if label_coef is not None and acc.numel() > 0:
        add_label_rows(acc, label_coef, weight, labels, shard.start if shard is not None else 0)
    if shard is not None:
        import torch.distributed as dist

        dist.all_reduce(acc, group=shard.group)
    return acc.to(dtype)
