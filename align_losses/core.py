"""The public entry points of the core: per-token log-probs and statistics of a linear head.

Both take ``hidden [..., D]``, ``weight [V, D]`` and integer ``labels`` shaped ``hidden.shape[:-1]``
and compute ``softmax(z)`` with ``z = transform(hidden @ weight.T + bias)`` for the labelled tokens
only, without building the ``[tokens, V]`` logits. Ignored tokens come back as 0 with zero gradient.

Eagerly, a call checks its labels and finds the labelled rows with one host synchronisation, then runs the
backend on those rows. Under `torch.compile`, while a CUDA graph is captured, or in an
`align_losses.ops.library.no_host_sync` block, the ``"torch"`` and ``"triton"`` backends run instead behind
registered operators (`align_losses.ops.library`) that take every row: the traced code reads no device value,
and a compiled ``hidden -> head -> loss -> backward`` is one graph.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from . import backends
from .ops.labels import labelled_positions
from .ops.library import sync_free
from .problem import DIFFERENTIABLE_OUTPUTS, OUTPUTS, HeadProblem, LogitTransform, VocabShard

STATS = tuple(n for n in OUTPUTS if n != "logprobs")  # what `outputs=` may name


@dataclass(frozen=True)
class TokenStats:
    """Per-token outputs of `linear_token_stats`, each float32 shaped like ``labels`` (0 where ignored).

    ``logprobs``, ``entropy``, ``mean_logit`` and ``logsumexp`` are differentiable;
    ``argmax_hit`` (1.0 where the label is the first maximum of the logits) and ``log_sum_p2``
    (``log sum_v p_v^2``) are not. Fields that were not requested are None.
    """

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None
    logsumexp: Optional[torch.Tensor] = None
    argmax_hit: Optional[torch.Tensor] = None
    log_sum_p2: Optional[torch.Tensor] = None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    impl: str = "auto",
    process_group=None,
    backend_options: Optional[Mapping] = None,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(z)``, float32 shaped like ``labels``.

    Args:
        hidden: ``[..., D]`` final hidden states (fp32, bf16 or fp16).
        weight: ``[V, D]`` output embedding, or with ``process_group`` this rank's contiguous
            shard ``[V_local, D]`` of it (ranks in order of the vocabulary).
        labels: integer ``hidden.shape[:-1]``; ``ignore_index`` or a vocabulary id (global ids
            when sharded).
        bias: ``[V]`` (or ``[V_local]``) head bias.
        shift: score ``labels[..., t + 1]`` at position ``t``; the last position gives 0. Packed
            rows mark each segment's first label with ``ignore_index``.
        temperature, softcap, logit_scale: ``z = softcap * tanh(a * logit_scale / softcap) / temperature``
            with ``a = hidden @ weight.T + bias`` (no tanh when ``softcap`` is None).
        impl: ``"auto"`` or a backend name (``backends.names()``).
        process_group: for a vocabulary-parallel head, the group whose ranks hold the shards.
        backend_options: backend-specific settings, e.g. ``{"memory_budget": bytes}`` for ``"torch"``.

    Every argument is checked before any work (`check_head_arguments` runs the checks of the non-tensor
    ones on their own). The result has a first-order backward only: a backward with ``create_graph=True``
    through it raises a RuntimeError saying so.
    """
    return linear_token_stats(
        hidden, weight, labels, outputs=(), bias=bias, ignore_index=ignore_index, shift=shift,
        temperature=temperature, softcap=softcap, logit_scale=logit_scale, impl=impl,
        process_group=process_group, backend_options=backend_options,
    ).logprobs


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    outputs: Sequence[str] = ("entropy",),
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    impl: str = "auto",
    process_group=None,
    backend_options: Optional[Mapping] = None,
) -> TokenStats:
    """`linear_logprobs` plus the statistics named in ``outputs``, from the same pass.

    ``outputs`` is any subset of ``("entropy", "mean_logit", "logsumexp", "argmax_hit", "log_sum_p2")``;
    the mean logit is over the full vocabulary and, like the entropy, of the transformed logits ``z``.
    Returns a `TokenStats`; see `linear_logprobs` for the other arguments.
    """
    transform = check_head_arguments(
        outputs=outputs, ignore_index=ignore_index, shift=shift, impl=impl, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, process_group=process_group, backend_options=backend_options,
    )
    wanted = frozenset(("logprobs", *outputs))
    options = dict(backend_options or {})
    _check_inputs(hidden, weight, labels, bias, process_group)  # the transform: checked by check_head_arguments
    labels = labels.long()  # a narrower dtype would wrap ignore_index (-100 is 156 in uint8)
    backend = _checked_backend(impl, hidden, weight, bias, labels, transform, wanted, process_group, options)

    weight, bias, process_group = _local_head(weight, bias, process_group)
    shard = _vocab_shard(weight, process_group)
    targets = _shift(labels, ignore_index) if shift else labels
    flat_targets = targets.reshape(-1)
    if shard is None and backend.run_traceable is not None and _no_host_reads(hidden.device):
        traced = _run_traceable(backend, hidden, weight, bias, flat_targets, ignore_index, transform, wanted, options)
        if traced is not None:
            return TokenStats(**{n: v.view(labels.shape) for n, v in traced.items()})
    kept = _labelled_positions(flat_targets, ignore_index, shard.size if shard else weight.shape[0])
    hidden_kept, weight, bias = _compute_dtype(_gather_rows(hidden.reshape(-1, hidden.shape[-1]), kept), weight, bias)
    problem = HeadProblem(
        hidden=hidden_kept,
        weight=weight,
        bias=bias,
        labels=flat_targets.index_select(0, kept),
        transform=transform,
        outputs=wanted,
        shard=shard,
        options=options,
    )
    with torch.autocast(hidden.device.type, enabled=False):
        per_token = backend.run(problem)
    _refuse_double_backward(per_token)
    scattered = {n: _scatter(v, kept, labels.shape, n in DIFFERENTIABLE_OUTPUTS) for n, v in per_token.items()}
    return TokenStats(**scattered)


def _checked_backend(impl, hidden, weight, bias, labels, transform, wanted, process_group, options) -> backends.Backend:
    """The backend of the call, after `backends.check` (which raises `backends.BackendError`, or a backend's
    option check's ValueError): eagerly on a probe of the call, under `torch.compile` once at trace time."""
    if not torch.compiler.is_compiling():
        return backends.check(impl, _probe(hidden, weight, bias, labels, transform, wanted, process_group, options))
    name, refusal = _checked_backend_name(
        impl, hidden.device, _call_dtype(hidden), bias is not None,
        _transform_flags(transform), tuple(sorted(wanted)),
        process_group is not None or _row_sharded(weight), tuple(sorted(options.items())))
    if refusal is not None:
        message, kind, reason = refusal
        if kind is None:  # a malformed option value
            raise ValueError(message)
        backends.raise_backend_error(message, impl=name, kind=kind, reason=reason)
    return backends.get(name)


def _no_host_reads(device: torch.device) -> bool:
    """Whether the call must not read device values on the host: under `torch.compile` (a read breaks the
    graph), while a CUDA graph is captured (a read fails the capture) or in a `library.no_host_sync` block.
    The labels are then checked, and the labelled rows found, inside the registered op
    (`align_losses.ops.library`)."""
    return torch.compiler.is_compiling() or sync_free(device)


def _run_traceable(backend, hidden, weight, bias, flat_targets, ignore_index, transform, wanted, options):
    """The call through ``backend.run_traceable``, on every row (ignored ones give 0); None where that backend
    has no such path for these options. Outputs ``{name: fp32 [N]}``, the non-differentiable ones detached."""
    hidden_all, weight, bias = _compute_dtype(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    problem = HeadProblem(hidden=hidden_all, weight=weight, bias=bias, labels=flat_targets, transform=transform,
                          outputs=wanted, shard=None, options=options)
    with torch.autocast(hidden.device.type, enabled=False):
        per_token = backend.run_traceable(problem, ignore_index)
    if per_token is None:
        return None
    if not torch.compiler.is_compiling():  # the sync-free path runs eagerly: the same guard as eager calls
        _refuse_double_backward(per_token)
    return {n: (v if n in DIFFERENTIABLE_OUTPUTS else v.detach()) for n, v in per_token.items()}


def _refuse_double_backward(per_token: Mapping[str, torch.Tensor]) -> None:
    """Make a backward with ``create_graph=True`` through the head fail at once with a clear message.

    The backends' backward passes are not differentiable (they reuse their buffers in place), so a second
    backward through them would fail with PyTorch's in-place-modification error or give no second-order
    term. Autograd runs a backward with ``create_graph=True`` in grad mode, which a pre-hook on each distinct
    backward node of the outputs (usually one) can see before the backend's backward runs.
    """
    nodes = {}
    for name, value in per_token.items():
        if name in DIFFERENTIABLE_OUTPUTS and value.grad_fn is not None:
            nodes[id(value.grad_fn)] = value.grad_fn
    for node in nodes.values():
        node.register_prehook(_no_double_backward)


def _no_double_backward(grad_outputs):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "align_losses: the fused linear head has no double backward: expected a backward without "
            "create_graph=True through linear_logprobs / linear_token_stats, got one with create_graph=True "
            "(a gradient penalty or a Hessian-vector product). Compute the logits explicitly "
            "(hidden @ weight.T) where second-order gradients are needed."
        )
    return None


def _transform_flags(transform: LogitTransform) -> tuple:
    """Which parts of ``transform`` are not the identity, as plain bools ``(logit_scale, softcap, temperature)``:
    all a backend check reads of it. Branching on a symbolic float's comparison (``torch.compile(dynamic=True)``)
    guards on it, so the graph is traced again only when a part turns on or off."""
    # A branch, not bool(): under Dynamo, bool() of a symbolic comparison stays symbolic; an if specialises it.
    scaled = True if transform.logit_scale != 1.0 else False  # noqa: SIM210
    tempered = True if transform.temperature != 1.0 else False  # noqa: SIM210
    return (scaled, transform.softcap is not None, tempered)


def _checked_backend_name(impl: str, device: torch.device, dtype: torch.dtype, has_bias: bool,
                          transform: tuple, outputs: tuple, sharded: bool, options: tuple) -> tuple:
    """`backends.check` on a tensor-free description of the call, for `torch.compile`: ``(backend name, None)``,
    or ``(impl, (message, kind, reason))`` of the `backends.BackendError` it raised (kind None for another
    ValueError), raised again by the caller in the traced code: one raised in here would reach the user
    wrapped in Dynamo's internal error.

    Dynamo runs it once, when it traces the call (the registry imports modules and probes the environment,
    which it cannot trace), and keeps the result as a constant of the graph: the same settings give the same
    backend, and ``$ALIGN_LOSSES_IMPL`` is read when the call is traced, not at every call of the graph.
    Its arguments and result are plain values (``transform``: `_transform_flags`, for which a stand-in
    transform is built): the Dynamo of torch 2.11 cannot take a frozen dataclass such as `LogitTransform` as a
    constant, and symbolic floats are no constants at all.
    """
    scaled, capped, tempered = transform
    probe = HeadProblem(
        hidden=torch.empty(0, 1, dtype=dtype, device=device), weight=torch.empty(0, 1, dtype=dtype, device=device),
        bias=torch.empty(0, dtype=dtype, device=device) if has_bias else None,
        labels=torch.empty(0, dtype=torch.int64, device=device), transform=LogitTransform(logit_scale=2.0 if scaled else 1.0, softcap=1.0 if capped else None,
                                  temperature=2.0 if tempered else 1.0),
        outputs=frozenset(outputs), shard=VocabShard(start=0, size=0, group=None) if sharded else None,
        options=dict(options),
    )
    try:
        return backends.check(impl, probe).name, None
    except backends.BackendError as error:
        return error.impl, (str(error), error.kind, error.reason)
    except ValueError as error:  # a backend's option check
        return impl, (str(error), None, None)


# `torch.compiler.assume_constant_result` sets this mark; it imports Dynamo (and with it Triton) to do so,
# which importing the package must not (tests/test_compile.py checks the mark is still the one it sets).
_checked_backend_name._dynamo_marked_constant = True


def _call_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The compute dtype of a call: autocast's where it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _probe(hidden, weight, bias, labels, transform, outputs, process_group, options) -> HeadProblem:
    """A stand-in for the call that the backend check (`backends.check`) reads before any work: its
    tensors give the compute dtype and the device (their shapes and values are not read, so the
    inputs themselves serve where the dtype matches: each new tensor costs the host time before the
    first kernel)."""
    dtype = _call_dtype(hidden)
    sharded = process_group is not None or _row_sharded(weight)
    return HeadProblem(
        hidden=hidden if hidden.dtype == dtype else hidden.new_empty((0, hidden.shape[-1]), dtype=dtype),
        weight=weight,
        bias=bias,
        labels=labels,
        transform=transform,
        outputs=outputs,
        shard=VocabShard(start=0, size=0, group=process_group) if sharded else None,
        options=options,
    )


class _GatherRows(torch.autograd.Function):
    """``rows.index_select(0, index)`` for unique indices; the backward writes the gradient rows back
    with a plain scatter into zeros (index_select's own backward is an ``index_add``, which runs on
    atomics in 16-bit dtypes: 0.5 ms for 24k rows of 2048 bf16 on an H200)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = rows.shape[0]
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.num_rows, *grad.shape[1:]))
        return out.index_copy_(0, index, grad), None


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``[M, D]`` of ``rows [N, D]`` at the labelled positions ``index`` (sorted, unique):
    ``rows`` itself, no copy, when every position is labelled."""
    if index.numel() == rows.shape[0]:
        return rows
    return _GatherRows.apply(rows, index)


def _scatter(values: torch.Tensor, kept: torch.Tensor, shape: torch.Size, differentiable: bool) -> torch.Tensor:
    out = values.new_zeros(shape.numel()).index_copy(0, kept, values)
    if not differentiable:
        out = out.detach()
    return out.view(shape)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``out[..., t] = labels[..., t + 1]``, and ``ignore_index`` at the last position."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _compute_dtype(hidden, weight, bias):
    """Cast to autocast's dtype when autocast is on, once, here: backward reuses these tensors."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias)


def _local_head(weight: torch.Tensor, bias: Optional[torch.Tensor], process_group):
    """Plain tensors for a DTensor head.

    A head sharded by rows over a 1-D mesh is taken to be tensor parallel (every rank of the mesh
    holds the same tokens) and used shard by shard, as a vocabulary-parallel head over the mesh's
    group; gradients flow back into the local shards. Any other layout is gathered. Under FSDP2,
    where ranks hold different tokens, the head must reach the core unsharded by FSDP itself (run
    the call inside the head module's forward, as `trainers.fused_forward` does), never as a shard.
    """
    if type(weight).__name__ != "DTensor":
        return weight, bias, process_group
    if _row_sharded(weight):
        local_bias = bias.to_local() if bias is not None else None
        return weight.to_local(), local_bias, weight.device_mesh.get_group()
    full_bias = bias.full_tensor() if bias is not None else None
    return weight.full_tensor(), full_bias, process_group


def _row_sharded(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a DTensor split by rows (the vocabulary) over a 1-D mesh."""
    if type(weight).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import Shard

    return weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)


def _vocab_shard(weight: torch.Tensor, process_group) -> Optional[VocabShard]:
    if process_group is None:
        return None
    import torch.distributed as dist

    sizes = torch.zeros(dist.get_world_size(process_group), dtype=torch.int64, device=weight.device)
    sizes[dist.get_rank(process_group)] = weight.shape[0]
    dist.all_reduce(sizes, group=process_group)
    rank = dist.get_rank(process_group)
    return VocabShard(start=int(sizes[:rank].sum()), size=int(sizes.sum()), group=process_group)


#: Size options that several backends take ("torch" both, "triton" the budget), checked here once for all:
#: ``-1`` would run hundreds of times slower with one-token tiles, ``0`` silently mean the default, and
#: ``"512MB"`` or ``2.5`` fail deep inside a backend.
SIZE_OPTIONS = {"memory_budget": "a positive int of bytes, e.g. 512 * 2**20", "token_chunk": "a positive int of tokens"}

#: Largest factor ``|logit_scale| / temperature`` (and ``softcap / temperature``) accepted: it leaves float32
#: (max 3.4e38) room for raw logits up to 2**27 before the logits overflow to inf and every result is NaN.
MAX_LOGIT_FACTOR = 2.0**100


def check_size_option(key: str, value, name: Optional[str] = None) -> None:
    """Refuse ``value`` for the size option ``key`` (a `SIZE_OPTIONS` key) unless it is None or a positive int;
    the ValueError calls the option ``name`` (default ``backend_options[key]``; a trainer config names its own
    field) and says what was given. A NumPy integer is an int here; a bool is not."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"{name or f'backend_options[{key!r}]'} must be None or {SIZE_OPTIONS[key]}; got {value!r}")


def check_head_arguments(
    *,
    outputs: Sequence[str] = (),
    ignore_index: int = -100,
    shift: bool = False,
    impl: str = "auto",
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    process_group=None,
    backend_options: Optional[Mapping] = None,
) -> LogitTransform:
    """Check the non-tensor arguments of `linear_token_stats` as it does, before any of them is used, and
    return their logit transform; lets a module refuse bad settings when it is built.

    Raises TypeError for a value of the wrong type (a bool is not a number) and ValueError for a bad value,
    each naming what was expected and what was given.
    """
    _check_arguments(outputs, impl, temperature, softcap, logit_scale, process_group, backend_options)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int (the label value of unscored tokens); got {ignore_index!r}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be True or False; got {shift!r}")
    transform = LogitTransform(
        logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap), temperature=float(temperature)
    )
    _check_transform(transform)
    return transform


def _check_arguments(outputs, impl, temperature, softcap, logit_scale, process_group, backend_options) -> None:
    if isinstance(outputs, str):
        raise ValueError(f"outputs must be a sequence of names, e.g. ({outputs!r},); got the string {outputs!r}")
    if not isinstance(outputs, (tuple, list, set, frozenset)):
        raise TypeError(
            f"outputs must be a tuple of names from {list(STATS)} (() for log-probs only); got {outputs!r}"
        )
    unknown = set(outputs) - set(STATS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}: expected a subset of {list(STATS)}")
    if not isinstance(impl, str) or not impl:
        raise ValueError(f"impl must be 'auto' or a backend name from {backends.names()}; got {impl!r}")
    for name, value in (("temperature", temperature), ("logit_scale", logit_scale), ("softcap", softcap)):
        if value is None and name == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            expected = "None or a positive number" if name == "softcap" else "a number"
            raise TypeError(f"{name} must be {expected} (a bool is not a number); got {value!r}")
    if backend_options is not None and not isinstance(backend_options, Mapping):
        raise TypeError(f"backend_options must be a mapping of option names to values, or None; got {backend_options!r}")
    for key in SIZE_OPTIONS:
        check_size_option(key, (backend_options or {}).get(key))
    if process_group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be None or a torch.distributed.ProcessGroup (the group whose ranks hold the "
                f"vocabulary shards); got {type(process_group).__name__}"
            )


def _check_inputs(hidden, weight, labels, bias, process_group) -> None:
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be None or a torch.Tensor [V]; got {type(bias).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"expected hidden [..., D] and weight [V, D]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is [..., {hidden.shape[-1]}] but weight is "
            f"[{weight.shape[0]}, {weight.shape[1]}] (expected [V, {hidden.shape[-1]}])"
        )
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden size D must be >= 1; got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if bias is not None and not bias.dtype.is_floating_point:
        raise ValueError(f"bias must be a floating tensor; got {bias.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},); got {tuple(bias.shape)}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        if not (torch.is_autocast_enabled(hidden.device.type) and hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
            raise ValueError(f"hidden and weight must share a floating dtype outside autocast; got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError(f"hidden, weight and labels must be on one device; got {hidden.device}, {weight.device}, {labels.device}")
    if bias is not None and bias.device != weight.device:
        raise ValueError(f"bias must be on the weight's device {weight.device}; got {bias.device}")
    if weight.shape[0] == 0 and process_group is None:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if process_group is not None and type(weight).__name__ == "DTensor":
        raise ValueError(
            "pass either a DTensor weight (its mesh says how it is split) or a plain local shard with "
            "process_group, not both"
        )


def _check_transform(transform: LogitTransform) -> None:
    if not 0 < transform.temperature < math.inf:
        raise ValueError(f"temperature must be > 0 and finite; got {transform.temperature}")
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) the values may be SymFloats, which
    # Dynamo compares (guarding on the result) but cannot pass to math.isfinite
    if not -math.inf < transform.logit_scale < math.inf:
        raise ValueError(f"logit_scale must be finite; got {transform.logit_scale}")
    if transform.softcap is not None and not 0 < transform.softcap < math.inf:
        raise ValueError(f"softcap must be None or > 0 and finite; got {transform.softcap}")
    factors = [("|logit_scale| / temperature", abs(transform.logit_scale) / transform.temperature)]
    if transform.softcap is not None:
        factors.append(("softcap / temperature", transform.softcap / transform.temperature))
    for what, factor in factors:
        if not factor <= MAX_LOGIT_FACTOR:
            raise ValueError(
                f"{what} = {factor:g} scales the logits beyond float32's range (expected <= 2**100 = "
                f"{MAX_LOGIT_FACTOR:.3g}; the logits would overflow to inf and every result be NaN): got "
                f"temperature={transform.temperature!r}, logit_scale={transform.logit_scale!r}, softcap={transform.softcap!r}"
            )


def _labelled_positions(targets: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """Indices of the labelled entries of the flat ``targets``, after checking their range (one host
    synchronisation: `align_losses.ops.labels.labelled_positions`, which the registered ops share)."""
    return labelled_positions(targets, ignore_index, vocab)
