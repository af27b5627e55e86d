"""The head as registered PyTorch operators, for `torch.compile` and CUDA-graph capture.

``align_losses::head_forward`` and ``align_losses::head_backward`` (`torch.library.custom_op`) run the
``"torch"`` or ``"triton"`` backend's own forward and backward (`tiled_head.forward_outputs` /
`tiled_head.backward_grads`, `triton_head.forward_outputs` / `triton_head.backward_grads`: the code the
eager autograd Functions call) on every row of a flat problem, labels holding ``ignore_index`` included.
They have fake implementations (shapes only: no host read of a value) and a registered autograd formula, so
Dynamo records one node for each instead of tracing into the backend (whose tile loops and host reads would
break the graph), and AOTAutograd puts ``head_backward`` into the backward graph.

Inside the ops, not in the traced code, are what reads values: the label range check and the labelled rows.
Eagerly (and when a compiled graph runs) the forward finds them with one host synchronisation (the eager
core's `align_losses.ops.labels.labelled_positions`: same error for a bad label), runs the backend on
those rows only and scatters the outputs back; the backward finds them again with one synchronisation.
While a CUDA graph is being captured (or in a `no_host_sync` block), nothing waits for the device: the
labels are checked by a device-side assertion and the backend runs on all rows, ignored rows masked out
(their outputs 0, their upstream gradients 0, so they add nothing to any gradient).

Shapes and dtypes: ``hidden [N, D]`` (fp32/bf16/fp16), ``weight [V, D]``, ``bias [V]`` or None, ``labels [N]``
int64; ``head_forward`` returns ``values`` fp32 ``[K, N]`` (one row per output named in the ``outputs`` bit
mask, in `OUTPUTS` order; 0 at ignored rows) and, for the backward, ``lse [N]``, ``expected_z [N]`` (``[0]``
without the entropy) and ``label_logit [N]``, fp32. No vocabulary-parallel head (a process group is no
operator argument) and no filtering backward behind the ops.
"""

# No `from __future__ import annotations` here: `custom_op` reads the operators' schemas from the annotations.
import contextlib
import importlib
from typing import Optional

import torch
from torch import Tensor

from ..problem import DIFFERENTIABLE_OUTPUTS, OUTPUTS, HeadProblem, LogitTransform
from .labels import assert_labels_async, labelled_positions

#: Backends behind the ops, and the module of `align_losses.ops` holding each one's
#: ``forward_outputs`` / ``backward_grads`` (imported on first use: Triton loads with the triton one only).
_MODULES = {"torch": ".tiled_head", "triton": ".triton_head"}


def output_mask(names) -> int:
    """The ``outputs`` argument of the ops: bit ``i`` set for ``OUTPUTS[i]`` in ``names``."""
    return sum(1 << i for i, n in enumerate(OUTPUTS) if n in names)


def _names(mask: int) -> tuple:
    return tuple(n for i, n in enumerate(OUTPUTS) if mask >> i & 1)


_no_sync_depth = 0  # open `no_host_sync` blocks


@contextlib.contextmanager
def no_host_sync():
    """Run the head on the sync-free path eagerly too, as while a CUDA graph is captured: all rows through
    the op, labels checked by a device-side assertion. Warm up a step in this block before capturing it, so
    that the captured kernels (Triton's included) are compiled outside the capture."""
    global _no_sync_depth
    _no_sync_depth += 1
    try:
        yield
    finally:
        _no_sync_depth -= 1


def sync_free(device: torch.device) -> bool:
    """Whether nothing may wait for ``device``: a CUDA graph is being captured on its current stream, or a
    `no_host_sync` block is open."""
    return _no_sync_depth > 0 or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _rows(labels: Tensor, ignore_index: int, vocab: int, check: bool) -> Optional[Tensor]:
    """The labelled rows (int64 ``[M]``, after the range check when ``check``), or None for all rows: while
    capturing (checked on the device instead), or when every row is labelled (no gather needed)."""
    if sync_free(labels.device):
        if check:
            assert_labels_async(labels, ignore_index, vocab)
        return None
    if check:
        rows = labelled_positions(labels, ignore_index, vocab)
    else:
        rows = torch.nonzero(labels != ignore_index).squeeze(1)
    return None if rows.numel() == labels.numel() else rows


def _take(t: Optional[Tensor], rows: Optional[Tensor], dim: int = 0) -> Optional[Tensor]:
    return t if t is None or rows is None or t.numel() == 0 else t.index_select(dim, rows)


def _put(values: Tensor, rows: Optional[Tensor], n: int, dim: int = 0) -> Tensor:
    """``values`` (``[..., M]`` along ``dim``) scattered into zeros of ``n`` along ``dim``."""
    if rows is None or values.numel() == 0:
        return values
    shape = list(values.shape)
    shape[dim] = n
    return values.new_zeros(shape).index_copy_(dim, rows, values)


def _run_forward(backend: str, problem: HeadProblem, memory_budget: int, token_chunk: int):
    module = importlib.import_module(_MODULES[backend], __package__)
    if backend == "torch":
        from .tiled_head import Tiling

        tiling = Tiling.plan(problem.hidden.shape[0], problem.weight.shape[0], memory_budget, token_chunk or None)
        result, lse, expected_z = module.forward_outputs(problem, tiling)
        return result, lse, expected_z, torch.zeros_like(lse)
    cfg = module.FWD_CONFIGS[problem.hidden.dtype]
    result, lse, expected_z, label_logit, _ = module.forward_outputs(
        problem.hidden, problem.weight, problem.bias, problem.labels, problem.transform, problem.outputs, None, cfg)
    return result, lse, expected_z, label_logit


#: The operators' namespace: the package's name, so that a copy of the package under another name registers
#: its own operators instead of failing on names already taken.
NAMESPACE = __name__.split(".")[0]


@torch.library.custom_op(f"{NAMESPACE}::head_forward", mutates_args=())
def head_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, backend: str,
                 ignore_index: int, logit_scale: float, softcap: Optional[float], temperature: float, outputs: int,
                 memory_budget: int, token_chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See the module docstring. ``memory_budget``: bytes of the backend's temporaries (required for
    ``"torch"``; 0 for ``"triton"``'s default); ``token_chunk``: the ``"torch"`` backend's token block, 0 for
    its plan."""
    names = _names(outputs)
    n, vocab = labels.shape[0], weight.shape[0]
    rows = _rows(labels, ignore_index, vocab, check=True)
    safe = labels if rows is not None else torch.where(labels == ignore_index, 0, labels)
    bias = bias.contiguous() if bias is not None else None
    problem = HeadProblem(_rowmajor(_take(hidden, rows)), _rowmajor(weight), bias, _take(safe, rows),
                          LogitTransform(logit_scale, softcap, temperature), frozenset(names))
    result, lse, expected_z, label_logit = _run_forward(backend, problem, memory_budget, token_chunk)
    values = torch.stack([result[name] for name in names])
    if rows is None and n:
        values = torch.where(labels != ignore_index, values, 0.0)
    expected_z = expected_z if expected_z is not None else lse.new_empty(0)
    return (_put(values, rows, n, 1), _put(lse, rows, n), _put(expected_z, rows, n), _put(label_logit, rows, n))


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@head_forward.register_fake
def _head_forward_fake(hidden, weight, bias, labels, backend, ignore_index, logit_scale, softcap, temperature,
                       outputs, memory_budget, token_chunk):
    n = labels.shape[0]
    k = len(_names(outputs))
    f32 = dict(dtype=torch.float32)
    ez = n if "entropy" in _names(outputs) else 0
    return (hidden.new_empty((k, n), **f32), hidden.new_empty((n,), **f32), hidden.new_empty((ez,), **f32),
            hidden.new_empty((n,), **f32))


@torch.library.custom_op(f"{NAMESPACE}::head_backward", mutates_args=())
def head_backward(grad_values: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                  lse: Tensor, expected_z: Tensor, label_logit: Tensor, backend: str, ignore_index: int,
                  logit_scale: float, softcap: Optional[float], temperature: float, outputs: int, memory_budget: int,
                  token_chunk: int, need_hidden: bool, need_weight: bool, need_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum(grad_values * values)`` for `head_forward`'s inputs: ``grad_hidden [N, D]``,
    ``grad_weight [V, D]``, ``grad_bias [V]`` in the inputs' dtypes; ``[0]`` for one not needed."""
    names = _names(outputs)
    n, vocab = labels.shape[0], weight.shape[0]
    rows = _rows(labels, ignore_index, vocab, check=False)
    grad_values = grad_values.float()
    if rows is None:  # ignored rows (all rows while capturing): no upstream gradient, label 0 in range
        grad_values = torch.where(labels != ignore_index, grad_values, 0.0)
        labels = torch.where(labels == ignore_index, 0, labels)
    up = {name: _take(grad_values[i], rows) for i, name in enumerate(names) if name in DIFFERENTIABLE_OUTPUTS}
    hidden_rows, labels_rows = _rowmajor(_take(hidden, rows)), _take(labels, rows)
    lse_rows, ez_rows = _take(lse, rows), (_take(expected_z, rows) if expected_z.numel() else None)
    transform = LogitTransform(logit_scale, softcap, temperature)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    bias = bias.contiguous() if bias is not None else None
    module = importlib.import_module(_MODULES[backend], __package__)
    if backend == "torch":
        tiling = module.Tiling.plan(hidden_rows.shape[0], vocab, memory_budget, token_chunk or None)
        grads = module.backward_grads(hidden_rows, weight, bias, labels_rows, lse_rows, ez_rows, up, transform, None,
                                      vocab, tiling, need, sync_free=sync_free(hidden.device))
    else:
        cfg = module.BWD_CONFIGS[hidden.dtype]
        grads = module.backward_grads(hidden_rows, _rowmajor(weight), bias, labels_rows, _take(label_logit, rows),
                                      lse_rows, ez_rows, up, transform, None, vocab, cfg, memory_budget or None, need)
    grad_hidden, grad_weight, grad_bias = grads
    grad_hidden = _put(grad_hidden, rows, n) if grad_hidden is not None else None
    # a fresh empty tensor for each gradient not needed: an operator's outputs may not alias one another
    return tuple(g if g is not None else hidden.new_empty(0) for g in (grad_hidden, grad_weight, grad_bias))


@head_backward.register_fake
def _head_backward_fake(grad_values, hidden, weight, bias, labels, lse, expected_z, label_logit, backend,
                        ignore_index, logit_scale, softcap, temperature, outputs, memory_budget, token_chunk,
                        need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, *settings = inputs
    _, lse, expected_z, label_logit = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, expected_z, label_logit)
    ctx.settings = tuple(settings)  # backend, ignore_index, logit_scale, softcap, temperature, outputs, budget, chunk
    ctx.has_bias = bias is not None


def _backward(ctx, grad_values, grad_lse, grad_expected_z, grad_label_logit):
    # lse, expected_z and label_logit are saved for this backward only; nothing upstream differentiates them.
    none = (None,) * 8
    if grad_values is None:
        return (None, None, None, None, *none)
    hidden, weight, bias, labels, lse, expected_z, label_logit = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    gh, gw, gb = head_backward(grad_values, hidden, weight, bias, labels, lse, expected_z, label_logit, *ctx.settings,
                               need_h, need_w, need_b and ctx.has_bias)
    return (gh if need_h else None, gw if need_w else None, gb if (need_b and ctx.has_bias) else None, None, *none)


head_forward.register_autograd(_backward, setup_context=_setup_context)


def head(problem: HeadProblem, ignore_index: int, backend: str, memory_budget: Optional[int] = None,
         token_chunk: Optional[int] = None) -> dict:
    """Run ``backend`` (``"torch"`` or ``"triton"``) through `head_forward` on every row of ``problem``, whose
    ``labels [N]`` may hold ``ignore_index`` (checked inside the op); returns ``{output name: fp32 [N]}``, 0 and
    no gradient at the ignored rows. ``problem.shard`` must be None."""
    if problem.shard is not None:
        raise ValueError("the registered head ops take no vocabulary-parallel head (got a vocabulary shard)")
    names = _names(output_mask(problem.outputs))
    t = problem.transform
    values, _, _, _ = getattr(torch.ops, NAMESPACE).head_forward(
        problem.hidden, problem.weight, problem.bias, problem.labels, backend, ignore_index, t.logit_scale, t.softcap,
        t.temperature, output_mask(names), int(memory_budget or 0), int(token_chunk or 0))
    return dict(zip(names, values.unbind(0)))
