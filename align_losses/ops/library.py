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
(their hidden states selected away to 0, their outputs 0, their upstream gradients 0, so they add nothing to
any gradient even where their hidden states hold NaN or inf), or, given a bound
`MAX_LABELLED`, on that many rows found by ``nonzero_static`` (labelled rows first, padding masked out).

Shapes and dtypes: ``hidden [N, D]`` (fp32/bf16/fp16), ``weight [V, D]``, ``bias [V]`` or None, ``labels [N]``
int64; ``head_forward`` returns ``values`` fp32 ``[K, N]`` (one row per output named in the ``outputs`` bit
mask, in `OUTPUTS` order; 0 at ignored rows) and, for the backward, ``lse [N]``, ``expected_z [N]`` (``[0]``
without the entropy) and ``label_logit [N]``, fp32. No vocabulary-parallel head (a process group is no
operator argument) and no filtering backward behind the ops.
"""

# No `from __future__ import annotations` here: `custom_op` reads the operators' schemas from the annotations.
import contextlib
import importlib
import numbers
from dataclasses import dataclass
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


#: The backend option bounding the labelled tokens of a call on the sync-free path, which then runs that many
#: rows, labelled ones first, instead of all of them (a CUDA graph has fixed shapes, so without a bound every
#: row, ignored ones included, goes through the GEMMs). More labelled tokens than the bound is an error
#: raised on the device. Eager and compiled calls, which find the labelled rows exactly, do not read it.
MAX_LABELLED = "max_labelled"


def check_max_labelled(value) -> None:
    """Refuse a ``max_labelled`` option that is not None or a positive int."""
    # numbers.Integral, as the core's checks of the other size options: a NumPy integer is an int here too
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"backend_options[{MAX_LABELLED!r}] must be None or a positive int of tokens (a bound on "
                         f"the labelled tokens of a call on the sync-free path); got {value!r}")


_no_sync_depth = 0  # open `no_host_sync` blocks


@contextlib.contextmanager
def no_host_sync():
    """Run the head on the sync-free path eagerly too, as while a CUDA graph is captured: all rows (or
    `MAX_LABELLED` rows) through the op, labels checked by a device-side assertion. Warm up a step in this block before capturing it, so
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


@dataclass(frozen=True)
class _Rows:
    """The rows of a flat problem ``[N]`` that the backend runs, and how its outputs go back.

    ``index`` int64 ``[M]``: the rows run (None: all ``N``); ``valid`` bool (``[M]``, or ``[N]`` with all rows):
    False where a row's outputs and gradients must be 0 (an ignored label, or padding up to ``max_labelled``;
    None when every row run is labelled). Padding entries of ``index`` hold ``N``: gathered as row ``N - 1``,
    scattered into a spare slot that is dropped.
    """

    index: Optional[Tensor]
    valid: Optional[Tensor]
    n: int

    def take(self, t: Tensor, dim: int = 0) -> Tensor:
        """The rows run of ``t`` (``N`` along ``dim``)."""
        if self.index is None:
            return t
        return t.index_select(dim, self.index.clamp(max=self.n - 1) if self.valid is not None else self.index)

    def put(self, values: Tensor, dim: int = 0) -> Tensor:
        """``values`` (``M`` along ``dim``) scattered into zeros of ``N`` along ``dim``."""
        if self.index is None:
            return values
        shape = list(values.shape)
        shape[dim] = self.n + (self.valid is not None)  # the spare slot of the padding
        out = values.new_zeros(shape).index_copy_(dim, self.index, values)
        return out.narrow(dim, 0, self.n).contiguous() if self.valid is not None else out

    def mask(self, t: Tensor, fill) -> Tensor:
        """``t`` (rows run, along the last dimension) with ``fill`` at the rows that are not valid."""
        return t if self.valid is None else torch.where(self.valid, t, fill)

    def zero_rows(self, hidden: Tensor) -> Tensor:
        """``hidden`` (rows run, ``[M, D]``) with zeros at the rows that are not valid, by a select, not a
        product: a NaN or inf in an ignored row (or the row a padding entry gathers) would otherwise reach
        the logits there and, through ``0 * NaN``, every gradient. Costs a copy on the sync-free path only."""
        return hidden if self.valid is None else torch.where(self.valid[:, None], hidden, 0)


def _rows(labels: Tensor, ignore_index: int, vocab: int, check: bool, max_labelled: int) -> _Rows:
    """The rows to run: eagerly the labelled rows (after the range check when ``check``; one host
    synchronisation), all rows when every row is labelled; without host synchronisation (`sync_free`) all rows,
    or ``max_labelled`` rows holding the labelled ones first, the labels checked on the device."""
    n = labels.shape[0]
    labelled = labels != ignore_index
    if sync_free(labels.device):
        if check:
            assert_labels_async(labels, ignore_index, vocab)
        if not max_labelled or n == 0:
            return _Rows(None, labelled, n)
        if check:
            torch._assert_async(labelled.sum() <= max_labelled,
                                f"more labelled tokens than backend_options['max_labelled'] = {max_labelled}")
        index = torch.nonzero_static(labelled, size=max_labelled, fill_value=n).squeeze(1)
        return _Rows(index, index < n, n)
    if check:
        index = labelled_positions(labels, ignore_index, vocab)
    else:
        index = torch.nonzero(labelled).squeeze(1)
    return _Rows(None if index.numel() == n else index, None, n)


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _run_forward(backend: str, problem: HeadProblem, memory_budget: int, token_chunk: int,
                 compile_tiles: Optional[bool]):
    module = importlib.import_module(_MODULES[backend], __package__)
    if backend == "torch":
        tiling = module.Tiling.for_option(problem.hidden, problem.weight.shape[0], memory_budget, token_chunk or None,
                                          compile_tiles, softcap=problem.transform.softcap is not None)
        return module.forward_outputs(problem, tiling)
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
                 memory_budget: int, token_chunk: int, max_labelled: int, compile_tiles: Optional[bool] = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See the module docstring. ``memory_budget``: bytes of the backend's temporaries (required for
    ``"torch"``; 0 for ``"triton"``'s default); ``token_chunk``: the ``"torch"`` backend's token block, 0 for
    its plan; ``max_labelled``: a bound on the labelled rows for the sync-free path, 0 for none (all rows);
    ``compile_tiles``: the ``"torch"`` backend's option `align_losses.ops.tiles.COMPILE_TILES` (None: its
    default; not read by ``"triton"``)."""
    names = _names(outputs)
    rows = _rows(labels, ignore_index, weight.shape[0], check=True, max_labelled=max_labelled)
    bias = bias.contiguous() if bias is not None else None
    # labels contiguous: the Triton kernels index them as such (a strided [N] view reaches here unchanged when
    # every row is labelled)
    problem = HeadProblem(_rowmajor(rows.zero_rows(rows.take(hidden))), _rowmajor(weight), bias,
                          _rowmajor(rows.mask(rows.take(labels), 0)),
                          LogitTransform(logit_scale, softcap, temperature), frozenset(names))
    result, lse, expected_z, label_logit = _run_forward(backend, problem, memory_budget, token_chunk, compile_tiles)
    values = rows.mask(torch.stack([result[name] for name in names]), 0.0)
    expected_z = rows.put(expected_z) if expected_z is not None else lse.new_empty(0)  # [0] without the entropy
    return rows.put(values, 1), rows.put(lse), expected_z, rows.put(label_logit)


@head_forward.register_fake
def _head_forward_fake(hidden, weight, bias, labels, backend, ignore_index, logit_scale, softcap, temperature,
                       outputs, memory_budget, token_chunk, max_labelled, compile_tiles=None):
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
                  token_chunk: int, max_labelled: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                  compile_tiles: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum(grad_values * values)`` for `head_forward`'s inputs: ``grad_hidden [N, D]``,
    ``grad_weight [V, D]``, ``grad_bias [V]`` in the inputs' dtypes; ``[0]`` for one not needed. The other
    arguments are `head_forward`'s (``compile_tiles`` last in both, with a default, as it came last)."""
    names = _names(outputs)
    n, vocab = labels.shape[0], weight.shape[0]
    rows = _rows(labels, ignore_index, vocab, check=False, max_labelled=max_labelled)
    grad_values = rows.mask(rows.take(grad_values.float(), 1), 0.0)  # no upstream gradient at rows not valid
    up = {name: grad_values[i] for i, name in enumerate(names) if name in DIFFERENTIABLE_OUTPUTS}
    hidden_rows, labels_rows = _rowmajor(rows.zero_rows(rows.take(hidden))), _rowmajor(rows.mask(rows.take(labels), 0))
    lse_rows, ez_rows = rows.take(lse), (rows.take(expected_z) if expected_z.numel() else None)
    transform = LogitTransform(logit_scale, softcap, temperature)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    bias = bias.contiguous() if bias is not None else None
    weight = _rowmajor(weight)  # as in the forward: every gradient then is row-major, as the fake says
    module = importlib.import_module(_MODULES[backend], __package__)
    if backend == "torch":
        no_wait = sync_free(hidden.device)
        tiling = module.Tiling.for_option(hidden_rows, vocab, memory_budget, token_chunk or None, compile_tiles,
                                          softcap=softcap is not None, need=(need_hidden, need_weight),
                                          sync_free=no_wait)
        grads = module.backward_grads(hidden_rows, weight, bias, labels_rows, rows.take(label_logit), lse_rows,
                                      ez_rows, up, transform, None, vocab, tiling, need, sync_free=no_wait)
    else:
        cfg = module.BWD_CONFIGS[hidden.dtype]
        grads = module.backward_grads(hidden_rows, weight, bias, labels_rows, rows.take(label_logit),
                                      lse_rows, ez_rows, up, transform, None, vocab, cfg, memory_budget or None, need)
    grad_hidden, grad_weight, grad_bias = grads
    grad_hidden = rows.put(grad_hidden) if grad_hidden is not None else None
    # a fresh empty tensor for each gradient not needed: an operator's outputs may not alias one another
    return tuple(g if g is not None else hidden.new_empty(0) for g in (grad_hidden, grad_weight, grad_bias))


@head_backward.register_fake
def _head_backward_fake(grad_values, hidden, weight, bias, labels, lse, expected_z, label_logit, backend,
                        ignore_index, logit_scale, softcap, temperature, outputs, memory_budget, token_chunk,
                        max_labelled, need_hidden, need_weight, need_bias, compile_tiles=None):
    # row-major, as the backends return them from row-major inputs (empty_like would follow a transposed weight)
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if (need_bias and bias is not None) else hidden.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, *settings = inputs
    _, lse, expected_z, label_logit = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, expected_z, label_logit)
    *settings, ctx.compile_tiles = settings
    ctx.settings = tuple(settings)  # backend ... max_labelled: head_forward's arguments after the tensors
    ctx.has_bias = bias is not None


def _backward(ctx, grad_values, grad_lse, grad_expected_z, grad_label_logit):
    # lse, expected_z and label_logit are saved for this backward only; nothing upstream differentiates them.
    none = (None,) * 10  # head_forward's arguments after the tensors
    if grad_values is None:
        return (None, None, None, None, *none)
    hidden, weight, bias, labels, lse, expected_z, label_logit = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    gh, gw, gb = head_backward(grad_values, hidden, weight, bias, labels, lse, expected_z, label_logit, *ctx.settings,
                               need_h, need_w, need_b and ctx.has_bias, ctx.compile_tiles)
    return (gh if need_h else None, gw if need_w else None, gb if (need_b and ctx.has_bias) else None, None, *none)


head_forward.register_autograd(_backward, setup_context=_setup_context)


def head(problem: HeadProblem, ignore_index: int, backend: str, memory_budget: Optional[int] = None,
         token_chunk: Optional[int] = None, max_labelled: Optional[int] = None,
         compile_tiles: Optional[bool] = None) -> dict:
    """Run ``backend`` (``"torch"`` or ``"triton"``) through `head_forward` on every row of ``problem``, whose
    ``labels [N]`` may hold ``ignore_index`` (checked inside the op); returns ``{output name: fp32 [N]}``, 0 and
    no gradient at the ignored rows. ``problem.shard`` must be None. ``max_labelled``: see `MAX_LABELLED`;
    ``compile_tiles``: see `align_losses.ops.tiles.COMPILE_TILES`."""
    if problem.shard is not None:
        raise ValueError("the registered head ops take no vocabulary-parallel head (got a vocabulary shard)")
    names = _names(output_mask(problem.outputs))
    t = problem.transform
    values, _, _, _ = getattr(torch.ops, NAMESPACE).head_forward(
        problem.hidden, problem.weight, problem.bias, problem.labels, backend, ignore_index, t.logit_scale, t.softcap,
        t.temperature, output_mask(names), int(memory_budget or 0), int(token_chunk or 0), int(max_labelled or 0),
        compile_tiles)
    return dict(zip(names, values.unbind(0)))
