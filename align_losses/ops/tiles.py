"""The ``"torch"`` backend's per-tile math, as pure functions of one raw tile of logits.

`fold_tile` (forward) folds a tile ``a [T, W]`` (fp32 GEMM output, before bias and transform) into the
tokens' running statistics (`align_losses.ops.stats.RowStats`); `tile_grad` (backward) turns a recomputed
tile into ``dL/da`` as a GEMM operand, the tokens' label entries of it and its column sums. Both are pure:
they mutate none of their inputs, read no device value on the host and make no shape depend on a value, so
the same code runs eagerly and through `torch.compile` (`run_tile`), where Inductor fuses each into a few
kernels that read the raw tile once or twice instead of a dozen eager passes over it.

Two steps pick their kernels by mode, with the same values either way: a token's label column is read or
changed with ``gather`` / ``scatter`` eagerly (a broadcast compare would materialise a ``[T, W]`` mask and a
select), with a compare of the column index against the label when compiled (a gather or scatter would split
Inductor's fused kernel); row-wise dot products are ``einsum`` eagerly (no product tile) and a product summed
when compiled (``einsum`` would lower to a batched GEMM). A third agrees to fp32 rounding only: compiled and for the
losses' statistics, `fold_tile` sums a tile's exponentials relative to the tile's own max (softmax's form, which
Inductor reads in one pass); otherwise relative to the running max (eagerly in the tile's own memory).

Whether the tiles run compiled is the backend option `COMPILE_TILES` (None: on where Inductor emits Triton
kernels, i.e. CUDA or XPU with Triton installed; `compiled_tiles`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from ..packages import installed
from ..problem import LogitTransform
from .stats import RowStats, shift_sums

#: The ``"torch"`` backend option choosing compiled (True) or eager (False) tiles; None: `compiled_tiles`'s choice.
COMPILE_TILES = "compile_tiles"

#: Devices whose tiles are compiled by default: Inductor generates fused Triton kernels for them.
_COMPILED_DEVICES = ("cuda", "xpu")


def check_compile_tiles(value) -> None:
    """Refuse a ``compile_tiles`` option that is not None, True or False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"backend_options[{COMPILE_TILES!r}] must be None (compiled on CUDA/XPU with Triton, eager "
                         f"elsewhere), True (compiled with torch.compile) or False (eager); got {value!r}")


def compiled_tiles(option: Optional[bool], device: torch.device) -> bool:
    """Whether tiles on ``device`` run compiled: ``option`` when given, else on CUDA/XPU with Triton importable
    and, on CUDA, a GPU that Triton compiles for (compute capability 7.0 or newer). Elsewhere they run eagerly:
    on a CPU the GEMMs dominate, so Inductor's C++ kernels gain little (0.87x the eager step at 2048 tokens, D 1024,
    V 32768 on a 2-core AMX Xeon, benchmarks/NOTES-torch.md), against a first call of ~12 s and a C++ toolchain."""
    if option is not None:
        return option
    if device.type not in _COMPILED_DEVICES or not installed("triton"):
        return False
    return device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] >= 7


class Upstream(NamedTuple):
    """The upstream gradients of one tile's tokens, fp32 ``[T]`` each, None for an output without one."""

    logprobs: Optional[torch.Tensor]
    logsumexp: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    mean_logit: Optional[torch.Tensor]


class TileGrad(NamedTuple):
    """What the backward needs of one tile (see `tile_grad`)."""

    grad_op: torch.Tensor  # [T, W] operand dtype: dL/da, the label entries zeroed when asked
    bias_sum: Optional[torch.Tensor]  # fp32 [W]: sum over tokens of dL/da (label entries included)


def logits(a: torch.Tensor, bias: Optional[torch.Tensor], t: LogitTransform, owns_a: bool = False) -> torch.Tensor:
    """Logits ``z = transform(a + bias)``, fp32 ``[T, W]``, from the raw tile ``a`` (fp32 ``[T, W]``) and
    ``bias [W]`` (any float dtype) or None: ``a`` itself when there is nothing to apply. ``a`` is left unchanged
    unless ``owns_a`` (see `run_tile`), when the steps work in it."""
    owned = owns_a  # whether z is ours to change in place
    z = a
    if bias is not None:
        z, owned = (z.add_(bias.float()) if owned else z + bias.float()), True
    if t.logit_scale != 1.0:
        z, owned = (z.mul_(t.logit_scale) if owned else z * t.logit_scale), True
    if t.softcap is not None:
        z, owned = (z.div_(t.softcap) if owned else z / t.softcap).tanh_().mul_(t.softcap), True
    if t.temperature != 1.0:
        z = z.div_(t.temperature) if owned else z / t.temperature
    return z


def fold_tile(a: torch.Tensor, state: RowStats, bias: Optional[torch.Tensor], labels: torch.Tensor,
              first: torch.Tensor, t: LogitTransform, owns_a: bool = False) -> RowStats:
    """``state`` (the tokens' statistics over the vocabulary before this tile) with the tile folded in.

    ``a`` fp32 ``[T, W]``: the raw tile of vocabulary ids ``first .. first + W - 1`` (``first`` int64, 0-dim,
    a tensor so that a compiled call is not specialised on it); ``bias [W]`` or None; ``labels`` int64 ``[T]``
    global ids. Returns new tensors (``[T]`` each); the fields that are None in ``state`` stay None. No input
    is changed, ``a`` aside when ``owns_a`` (see `run_tile`).
    """
    z = logits(a, bias, t, owns_a)
    label_logit = state.label_logit + _pick(z, labels - first)
    sum_z = state.sum_z + z.sum(dim=1) if state.sum_z is not None else None
    if _softmax_form(z, state):
        return _fold_softmax_form(z, state, label_logit, sum_z)
    if state.argmax is not None:
        block_max, block_arg = z.max(dim=1)  # the first maximum of the tile
    else:
        block_max, block_arg = z.amax(dim=1), None
    new_max = torch.maximum(state.max, block_max)
    # Logits of -inf only so far (a bias that masks part of the vocabulary): shift by 0, not -inf.
    shift_to = torch.where(new_max > -math.inf, new_max, 0.0)
    rescale = torch.exp(state.max - shift_to)
    # Eagerly, without the entropy (whose sum needs z - max beside exp(z - max)), exp(z - max) takes z's own
    # memory: one fp32 tile, not three. Compiled, the steps fuse and hold no tile at all.
    in_place = owns_a and state.sum_exp_z is None
    z_rel = z.sub_(shift_to[:, None]) if in_place else z - shift_to[:, None]
    p = z_rel.exp_() if in_place else torch.exp(z_rel)
    sum_exp_z = sum_exp2 = argmax = None
    if state.sum_exp_z is not None:
        # Relative to the max twice (see `Stats`); where z = -inf, p = 0 adds 0, not 0 x -inf = NaN.
        z_rel = z_rel.clamp_(min=torch.finfo(z_rel.dtype).min)
        moved = shift_sums(state.sum_exp_z, state.sum_exp, state.max - shift_to, rescale)
        sum_exp_z = moved + _row_dot(p, z_rel)
    del z_rel
    if state.sum_exp2 is not None:
        sum_exp2 = state.sum_exp2 * rescale * rescale + _row_dot(p, p)
    if state.argmax is not None:
        # Tiles arrive in increasing vocabulary order: only a strictly larger maximum moves the argmax, so
        # ties keep the first index.
        argmax = torch.where(block_max > state.max, block_arg + first, state.argmax)
    return RowStats(
        max=new_max,
        sum_exp=state.sum_exp * rescale + p.sum(dim=1),
        label_logit=label_logit,
        sum_exp_z=sum_exp_z,
        sum_z=sum_z,
        sum_exp2=sum_exp2,
        argmax=argmax,
    )


#: The narrowest tile that `fold_tile` folds in softmax's own form when compiled: Inductor's
#: ``unroll_reductions_threshold`` (8 in torch 2.11-2.13), below which it unrolls a reduction instead of taking
#: its online softmax. With a larger torch value the widths in between would still take the softmax form, which
#: Inductor would then compute in two reductions (the max, then the sum) instead of one: the same values.
SOFTMAX_FORM_MIN_WIDTH = 8


def _softmax_form(z: torch.Tensor, state: RowStats) -> bool:
    """Whether `fold_tile` takes softmax's own form (`_fold_softmax_form`): while compiled, for the max and the sum
    alone (the losses' case: no entropy, no sum of squares, no argmax), on a tile at least `SOFTMAX_FORM_MIN_WIDTH`
    wide. The width test is evaluated on the dynamic width, so it becomes a guard of the compiled graph: Inductor
    then knows the width is at least its threshold (which it needs to lower the pattern to its online softmax),
    and a narrower tile compiles another graph instead of failing a check. Traced into a caller's own compile (a
    vocabulary-parallel head, which does not run behind the registered op), the guard is the caller's: a width the
    caller declared dynamic with a range below the threshold (``mark_dynamic(..., min=...)``, export's ``Dim``) then
    fails Dynamo's constraint check."""
    return (torch.compiler.is_compiling() and state.sum_exp_z is None and state.sum_exp2 is None
            and state.argmax is None and z.shape[1] >= SOFTMAX_FORM_MIN_WIDTH)


def _fold_softmax_form(z: torch.Tensor, state: RowStats, label_logit: torch.Tensor,
                       sum_z: Optional[torch.Tensor]) -> RowStats:
    """`fold_tile`'s max and sum of exponentials in softmax's own form: the tile's max, the sum of ``exp(z - that
    max)``, both merged into the running statistics afterwards. Inductor lowers ``amax``, ``sub``, ``exp``, ``sum``
    over one dimension (with ``keepdim``) to one online-softmax pass (its ``prepare_softmax_online``, on CUDA and
    XPU), which reads the tile once; shifting by the running max first, as `fold_tile` otherwise does, takes two
    reductions over it (the kernel times of both: benchmarks/NOTES-torch.md). The values agree to fp32 rounding:
    the same terms, summed relative to another max."""
    tile_max = z.amax(dim=1, keepdim=True)
    tile_sum = (z - tile_max).exp().sum(dim=1, keepdim=True).squeeze(1)
    tile_max = tile_max.squeeze(1)
    new_max = torch.maximum(state.max, tile_max)
    shift_to = torch.where(new_max > -math.inf, new_max, 0.0)  # -inf only so far: shift by 0, as fold_tile does
    # A tile row of -inf only (a bias masking those ids) has no meaningful sum (NaN from -inf - -inf eagerly, a count
    # from Inductor's online softmax): it adds nothing.
    added = torch.where(tile_max > -math.inf, tile_sum * torch.exp(tile_max - shift_to), 0.0)
    return RowStats(max=new_max, sum_exp=state.sum_exp * torch.exp(state.max - shift_to) + added,
                    label_logit=label_logit, sum_exp_z=None, sum_z=sum_z, sum_exp2=None, argmax=None)


def tile_grad(a: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, first: torch.Tensor,
              lse: torch.Tensor, expected_z: Optional[torch.Tensor], up: Upstream, t: LogitTransform, vocab: int,
              operand_dtype: torch.dtype, zero_entries: bool, need_bias_sum: bool,
              shift: Optional[torch.Tensor] = None, owns_a: bool = False) -> TileGrad:
    """``dL/da`` of one recomputed tile, for the upstream gradients ``up`` of its tokens.

    ``dL/dz_v = p_v (g_lse - g_logp - g_ent (z_v - E[z])) + g_mean / V + g_logp [v = label]``, chained through
    the transform. ``a``, ``bias``, ``labels``, ``first``: as in `fold_tile`; ``lse`` and ``expected_z``
    (``E_p[z]``, None without an entropy gradient) fp32 ``[T]`` from the forward; ``vocab``: the full vocabulary
    size ``V``. ``zero_entries``: zero the label entries in ``grad_op``; the caller adds them in fp32 after the
    GEMMs (`label_entries`, `align_losses.ops.tiled_head`). ``bias_sum`` is None unless ``need_bias_sum``. No
    input is changed, ``a`` aside when ``owns_a`` (see `run_tile`).

    ``shift`` (fp32 ``[T]``, ``lse - log|s c|`` with `row_scale`'s ``s c``; the losses' case):
    ``dL/da = s (p c + g_logp [label])``, and ``grad_op`` is ``p |s c| = exp(z - shift)``, the caller applying
    ``sign(s c)`` outside the tile. Folding ``|s c|`` into the exponent costs no pass, and the operand is rounded
    once, as ``p c`` was: rounding ``p`` and ``c h`` separately doubled the weight gradient's rounding error. It
    needs upstream gradients on the log-probs and logsumexp only, no softcap and no ``need_bias_sum``.
    """
    z = logits(a, bias, t, owns_a)
    local = labels - first
    if shift is not None:
        z_rel = z.sub_(shift[:, None]) if owns_a else z - shift[:, None]
        if owns_a and operand_dtype != z_rel.dtype:
            p = torch.exp(z_rel, out=torch.empty(z_rel.shape, dtype=operand_dtype, device=z_rel.device))  # one pass
        elif owns_a:
            p = z_rel.exp_()
        else:
            p = torch.exp(z_rel).to(operand_dtype)
        return TileGrad(_zero_at(p, local) if zero_entries else p, None)
    grad = _logit_grad(z, lse, expected_z, up, vocab)
    if up.logprobs is not None and (need_bias_sum or not zero_entries):
        grad = _add_at(grad, local, up.logprobs)
    grad = _dz_da_(grad, z, t)
    del z
    bias_sum = grad.sum(dim=0) if need_bias_sum else None
    if zero_entries:
        grad = _zero_at(grad, local)
    # Rounded to the operand dtype only as a GEMM input; every sum above stays fp32.
    return TileGrad(grad.to(operand_dtype), bias_sum)


def _logit_grad(z: torch.Tensor, lse: torch.Tensor, expected_z: Optional[torch.Tensor], up: Upstream,
                vocab: int) -> torch.Tensor:
    """``dL/dz`` fp32 ``[T, W]`` of the logits ``z [T, W]`` without the label term ``g_logp [v = label]``."""
    grad = torch.exp(z - lse[:, None])  # p
    coef = torch.zeros_like(lse)
    if up.logsumexp is not None:
        coef = coef + up.logsumexp
    if up.logprobs is not None:
        coef = coef - up.logprobs
    if up.entropy is not None:
        factor = (z - expected_z[:, None]).mul_(-up.entropy[:, None]).add_(coef[:, None])
        grad = grad.mul_(factor.masked_fill_(grad == 0, 0.0))  # z = -inf (p = 0): 0, not 0 x inf
        del factor
    else:
        grad = grad.mul_(coef[:, None])
    if up.mean_logit is not None:
        grad = grad.add_((up.mean_logit / vocab)[:, None])
    return grad


def label_entries(label_logit: torch.Tensor, lse: torch.Tensor, expected_z: Optional[torch.Tensor], up: Upstream,
                  t: LogitTransform, vocab: int, inside: torch.Tensor) -> torch.Tensor:
    """Each token's label entry of ``dL/da`` (fp32 ``[M]``; 0 where ``inside`` is False: a label in another
    vocabulary shard): `tile_grad`'s formula at ``z = label_logit`` (the forward's label logits), computed once
    per backward instead of picked out of every tile."""
    grad = _logit_grad(label_logit[:, None], lse, expected_z, up, vocab).squeeze(1)
    if up.logprobs is not None:
        grad = grad + up.logprobs
    return torch.where(inside, _dz_da_(grad, label_logit, t), 0.0)


def row_scale(up: Upstream, t: LogitTransform) -> Optional[torch.Tensor]:
    """``s c`` (fp32 ``[M]``) with ``dL/da = s (p c + g_logp [label])``, where ``dL/da`` has that form: upstream
    gradients on the log-probs and the logsumexp only (the losses' case) and no softcap; else None.
    ``c = g_lse - g_logp``, ``s = logit_scale / temperature``."""
    if t.softcap is not None or up.entropy is not None or up.mean_logit is not None:
        return None
    if up.logprobs is None and up.logsumexp is None:
        return None
    present = [g for g in (up.logsumexp, up.logprobs) if g is not None]
    coef = torch.zeros_like(present[0])
    if up.logsumexp is not None:
        coef = coef + up.logsumexp
    if up.logprobs is not None:
        coef = coef - up.logprobs
    return coef * (t.logit_scale / t.temperature)


def _dz_da_(grad_z: torch.Tensor, z: torch.Tensor, t: LogitTransform) -> torch.Tensor:
    """Chain ``dL/dz`` (a temporary of the caller's, changed in place) to ``dL/da``:
    ``dz/da = s/T * (1 - tanh^2)`` with ``tanh = z T / c``."""
    if t.softcap is not None:
        grad_z = grad_z.mul_(z.mul(t.temperature / t.softcap).square_().neg_().add_(1.0))
    factor = t.logit_scale / t.temperature
    if factor != 1.0:
        grad_z = grad_z.mul_(factor)
    return grad_z


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(dim=1)``, fp32 ``[T]`` from two ``[T, W]`` tiles (see the module docstring for the kernels)."""
    if torch.compiler.is_compiling():
        return (x * y).sum(dim=1)
    return torch.einsum("ij,ij->i", x, y)


def _hits(tile: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """bool ``[T, W]``: True at each token's label column ``local [T]`` (none where outside ``0 .. W - 1``)."""
    return torch.arange(tile.shape[1], device=tile.device) == local[:, None]


def _column(tile: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column [T, 1] int64, inside [T] bool)``: ``local`` clamped into the tile, and whether it was inside."""
    inside = (local >= 0) & (local < tile.shape[1])
    return local.clamp(0, tile.shape[1] - 1)[:, None], inside


def _pick(tile: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T]``: ``tile[t, local[t]]``, 0 where ``local[t]`` is outside the tile."""
    if torch.compiler.is_compiling():
        return torch.where(_hits(tile, local), tile, 0.0).sum(dim=1)  # one term per row at most: exact
    column, inside = _column(tile, local)
    return torch.where(inside, tile.gather(1, column).squeeze(1), 0.0)


def _add_at(tile: torch.Tensor, local: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``tile`` (a temporary, changed in place eagerly) plus ``values [T]`` at each token's label column."""
    if torch.compiler.is_compiling():
        return tile + torch.where(_hits(tile, local), values[:, None], 0.0)
    column, inside = _column(tile, local)
    return tile.scatter_add_(1, column, torch.where(inside, values, 0.0)[:, None])


def _zero_at(tile: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``tile`` (a temporary, changed in place eagerly) with 0 at each token's label column."""
    if torch.compiler.is_compiling():
        return torch.where(_hits(tile, local), 0.0, tile)
    column, inside = _column(tile, local)
    return tile.scatter_(1, column, torch.where(inside, 0.0, tile.gather(1, column).squeeze(1))[:, None])


_compiled: dict = {}  # tile function -> its torch.compile wrapper, built on first use
_eager_after_failure: set = set()  # tile functions whose default (not asked-for) compilation failed once
_ran_compiled: set = set()  # tile functions that have run compiled at least once

#: Graphs Dynamo may build for each tile function before giving up (its default, 8, is per function too). One
#: is built per combination of the flags (bias or not, the outputs and upstream gradients present, dtypes),
#: transform constants and Dynamo's specialisations of sizes and view offsets 0 and 1 (a tile of one token or
#: one vocabulary id, a last token block of one) and, for `fold_tile`'s softmax form, a tile narrower than
#: `SOFTMAX_FORM_MIN_WIDTH`: a long run with a few of each meets 8, and with
#: ``fullgraph=True`` Dynamo then raises instead of running the function eagerly.
RECOMPILE_LIMIT = 64


def inductor_options() -> dict:
    """The Inductor options the tile functions compile with: n-d tiling (``triton.prefer_nd_tiling``) where this
    torch has it. A tile's kernels then index its rows and columns as two grid dimensions instead of one flat
    index divided by the dynamic width at every element (the label compare needs the column), which takes a few
    percent off the step (`tile_grad`'s kernels above all; benchmarks/NOTES-torch.md). Only Triton kernels read
    it: the C++ kernels of a CPU are unchanged."""
    import torch._inductor.config as inductor_config  # imported by compiling anyway; not at import time

    return {"triton.prefer_nd_tiling": True} if hasattr(inductor_config.triton, "prefer_nd_tiling") else {}


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _recompile_limit_name() -> str:
    """Dynamo's per-function graph limit: ``recompile_limit`` (torch 2.7 on), ``cache_size_limit`` before."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def _own(x):
    """``x`` with each tensor of at most one dimension that is a view replaced by a copy (recursively through
    tuples such as `RowStats`): Dynamo guards a view on its base's size and its offset, so the rows and
    vocabulary slices of one call would otherwise build graphs the next call, with other blocks, cannot use.
    These are ``[T]`` and ``[W]`` vectors, a negligible copy beside the ``[T, W]`` tile."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x._base is not None and x.dim() <= 1 else x
    if isinstance(x, tuple):
        items = [_own(item) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def compiled_before(fn: Callable) -> bool:
    """Whether ``fn`` has run compiled through `run_tile` in this process, i.e. its compilation, which can fail on
    first use, has worked."""
    return fn in _ran_compiled


def compiles(fn: Callable, compiled: bool, fallback: bool = False) -> bool:
    """Whether `run_tile` runs ``fn`` compiled with these arguments: ``compiled``, unless ``fn`` failed to compile
    before and ``fallback`` lets it run eagerly instead."""
    return compiled and not (fallback and fn in _eager_after_failure)


def run_tile(fn: Callable, compiled: bool, a: torch.Tensor, *args, fallback: bool = False):
    """``fn(a, *args)`` (`fold_tile` or `tile_grad`) on a fresh raw tile ``a`` that the caller gives up.

    Eagerly ``fn`` owns ``a`` and applies the bias and transform in it (a copy would cost a tile allocation
    and a pass: 10-15% of a CPU step with a bias). When ``compiled``, ``fn`` runs pure, through
    ``torch.compile(fn, dynamic=True, fullgraph=True)`` with `inductor_options`: dynamic shapes because the
    token and vocabulary counts of tiles change from call to call, and a static graph would compile again for
    each; no gradient tracking, so that a call from a forward (grad mode on) and one from a backward (off)
    share one graph. Up to `RECOMPILE_LIMIT` graphs per function. While a CUDA graph is being captured nothing
    is compiled (compiling launches and times kernels): a call that would need a new graph is an error, so warm
    the step up first, outside the capture, with the same shapes.

    ``fallback`` (the option left at its default, None): a failure to compile (no working Triton toolchain,
    the recompile limit met) warns once and runs this function's tiles eagerly from then on, with the same
    values; without it (``compile_tiles=True``) the failure is an error naming the option.
    """
    if not compiles(fn, compiled, fallback):
        return fn(a, *args, owns_a=True)
    if torch.compiler.is_compiling():  # inside a caller's own graph: traced into it (Dynamo cannot nest)
        return fn(a, *args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True, options=inductor_options())
    capturing = _capturing(a.device)
    args = _own(args)
    try:
        with torch.no_grad(), (torch.compiler.set_stance("fail_on_recompile") if capturing
                               else contextlib.nullcontext()):
            try:
                result = _compiled[fn](a, *args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                # Dynamo's own limit met: again with ours. Patching the config on every call instead would
                # cost a third of a cached call's host time, paid at every tile.
                limit_name = _recompile_limit_name()
                limit = max(getattr(torch._dynamo.config, limit_name), RECOMPILE_LIMIT)
                with torch._dynamo.config.patch(**{limit_name: limit}):
                    result = _compiled[fn](a, *args)
            _ran_compiled.add(fn)
            return result
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # compilation runs here, on first use: say how to do without it
        if fallback and not capturing:
            _eager_after_failure.add(fn)
            warnings.warn(
                f"align_losses: the 'torch' backend's compiled tile function {fn.__name__} failed "
                f"({type(error).__name__}: {str(error)[:300]}); its tiles run eagerly from now on, with the same "
                f"values (pass backend_options={{{COMPILE_TILES!r}: False}} to choose that and silence this, or "
                f"True to make a failure an error)", RuntimeWarning, stacklevel=2)
            return fn(a, *args, owns_a=True)
        if capturing:
            raise RuntimeError(
                f"align_losses: the 'torch' backend's compiled tile function {fn.__name__} has no graph for these "
                f"inputs and cannot be compiled while a CUDA graph is being captured ({type(error).__name__}: "
                f"{error}); run the step once before the capture with the same shapes (in align_losses."
                f"no_host_sync()), or pass backend_options={{{COMPILE_TILES!r}: False}} to run its tiles eagerly"
            ) from error
        raise RuntimeError(
            f"align_losses: the 'torch' backend's compiled tile function {fn.__name__} failed ({type(error).__name__}: "
            f"{error}); pass backend_options={{{COMPILE_TILES!r}: False}} to run its tiles eagerly"
        ) from error
