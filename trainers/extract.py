"""Per-sequence log-probs of a dataset under a model (and a reference), exactly as TRL's trainers see them.

    from trainers.extract import extract_logps

    scored, summary = extract_logps(model, dataset, tokenizer, ref_model=ref, beta=0.1, return_summary=True)

`extract_logps` tokenises the rows the way the matching TRL trainer does, by calling that trainer's own
``_prepare_dataset`` (so the same EOS handling, chat template, prompt/completion split):

=================================================  ==============  =============================================
columns (plain text or conversational)             kind            tokenised and truncated like
=================================================  ==============  =============================================
``prompt``, ``chosen``, ``rejected`` (or           ``preference``  `trl.DPOTrainer` + `DataCollatorForPreference`
``chosen``/``rejected`` with an implicit prompt;
or ``prompt_ids``/``chosen_ids``/``rejected_ids``)
``prompt``, ``completion``, ``label``              ``unpaired``    `trl.KTOTrainer` + its unpaired collator
(or ``prompt_ids``/``completion_ids``/``label``)
``prompt``, ``completion``                         ``completion``  `trl.SFTTrainer`, completion-only loss
(or ``prompt_ids``/``completion_ids``)
=================================================  ==============  =============================================

and scores them through the fused head (`trainers.fused_forward`, the core `align_losses.linear_token_stats`)
under ``torch.no_grad()``: no ``[tokens, vocab]`` logits are built, so memory does not grow with the vocabulary.
A sequence's log-prob is the sum over its completion tokens of ``log p(token | previous tokens)``, the number the
trainer's loss uses; its token count is the number of tokens in that sum.

Truncation follows the trainer's config (``max_length`` defaults to the TRL config's default, 1024):

* preference: each of prompt+chosen and prompt+rejected is cut to ``max_length`` (``keep_start`` keeps the
  beginning, ``keep_end`` the end); with ``keep_start``, a row whose prompt alone has ``>= max_length`` tokens is
  dropped by `trl.DPOTrainer`;
* unpaired: cut to ``max_length`` keeping the start; a row whose prompt has ``>= max_length`` tokens is dropped;
* completion: prompt+completion cut to ``max_length`` (``keep_start``/``keep_end``); a row left with no
  completion token is dropped.

Dropped rows stay in the returned dataset with null (None) in the new columns. Truncated and dropped rows are
counted in the `ExtractionSummary` and logged as a warning. Rows are scored in batches sorted by length (less
padding) and come back in their original order.

`reference_columns(trainer, dataset)` is the same loop for a `FusedDPOTrainer` with
``precompute_ref_log_probs=True``: the trainer's collator and its ``compute_ref_log_probs`` (reference model or
adapter-free policy, ``ld_alpha``, autocast) give the ``ref_chosen_logps`` and ``ref_rejected_logps`` columns
TRL's own precomputation adds, with the same values (TRL's batches by default, so bit for bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

PREFERENCE, UNPAIRED, COMPLETION = "preference", "unpaired", "completion"
KINDS = (PREFERENCE, UNPAIRED, COMPLETION)

#: Column sets that select each kind, text first, then already tokenised.
KIND_COLUMNS = {
    PREFERENCE: (
        ("prompt", "chosen", "rejected"), ("chosen", "rejected"), ("prompt_ids", "chosen_ids", "rejected_ids")
    ),
    UNPAIRED: (("prompt", "completion", "label"), ("prompt_ids", "completion_ids", "label")),
    COMPLETION: (("prompt", "completion"), ("prompt_ids", "completion_ids")),
}

#: The TRL trainer whose tokenisation and truncation each kind follows.
KIND_TRAINER = {PREFERENCE: "DPO", UNPAIRED: "KTO", COMPLETION: "SFT"}

_TRAINER_DEFAULT = object()


# ---------------------------------------------------------------------------------------------------------------------
# Result summary


@dataclass
class ExtractionSummary:
    """What `extract_logps` (or `reference_columns`) did.

    Attributes:
        kind: ``"preference"``, ``"unpaired"`` or ``"completion"``.
        rows: rows of the input dataset.
        scored_rows: rows that were scored (``rows - dropped_rows``).
        truncated_rows: scored rows at least one of whose sequences was cut to ``max_length``.
        dropped_rows: rows the matching trainer drops (see the module docstring); their new columns are None.
        truncated_indices, dropped_indices: the row indices of both (in the input order).
        completion_tokens: tokens summed into the log-probs of one model (chosen plus rejected for preference data).
        forward_tokens: non-padding tokens run through the model(s), the reference included.
        padded_tokens: tokens run through the model(s), padding included.
        seconds: wall time of the scoring loop (tokenisation excluded).
        max_length, truncation_mode: the truncation settings used.
        beta: the beta of the rewards, or None.
        reward_accuracy: preference data with a reference: fraction of rows with ``chosen_reward > rejected_reward``
            (with ``beta`` None, of rows whose chosen log-ratio beats the rejected one).
        mean_margin: preference data with a reference: mean of ``margin`` (log-ratio units when ``beta`` is None).
        mean_reward: unpaired data with a reference: mean reward (log-ratio without ``beta``) per label,
            ``{"desirable": ..., "undesirable": ...}``.
    """

    kind: str
    rows: int
    scored_rows: int = 0
    truncated_rows: int = 0
    dropped_rows: int = 0
    truncated_indices: list = field(default_factory=list)
    dropped_indices: list = field(default_factory=list)
    completion_tokens: int = 0
    forward_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    max_length: Optional[int] = None
    truncation_mode: str = "keep_start"
    beta: Optional[float] = None
    reward_accuracy: Optional[float] = None
    mean_margin: Optional[float] = None
    mean_reward: Optional[dict] = None

    @property
    def tokens_per_second(self) -> float:
        """Non-padding tokens through the model(s) per second of scoring."""
        return self.forward_tokens / self.seconds if self.seconds > 0 else float("nan")

    def lines(self) -> list[str]:
        """A human-readable summary, one item per line."""
        out = [
            f"rows: {self.rows} ({self.kind}; scored {self.scored_rows}, truncated {self.truncated_rows}, "
            f"dropped {self.dropped_rows}; max_length={self.max_length}, {self.truncation_mode})",
            f"tokens: {self.completion_tokens} scored, {self.forward_tokens} through the model(s) "
            f"({self.padded_tokens} with padding) in {self.seconds:.2f}s = {self.tokens_per_second:,.0f} tokens/s",
        ]
        unit = f"beta={self.beta:g}" if self.beta is not None else "log-ratio, no beta"
        if self.reward_accuracy is not None:
            out.append(f"reward accuracy: {self.reward_accuracy:.4f}")
            out.append(f"mean margin: {self.mean_margin:.6g} ({unit})")
        if self.mean_reward:
            parts = ", ".join(f"{k} {v:.6g}" for k, v in self.mean_reward.items())
            out.append(f"mean reward: {parts} ({unit})")
        return out

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["tokens_per_second"] = self.tokens_per_second
        return data


# ---------------------------------------------------------------------------------------------------------------------
# Kinds and tokenisation


def detect_kind(columns: Sequence[str]) -> str:
    """The kind of a dataset with these columns (see the module table), or a ValueError naming what is missing."""
    cols = set(columns)
    for kind in KINDS:
        if any(set(option) <= cols for option in KIND_COLUMNS[kind]):
            return kind
    raise ValueError(f"missing columns: the dataset has {sorted(cols)}, but extraction needs {wanted_columns()}")


def wanted_columns(kind: Optional[str] = None) -> str:
    """The column sets of ``kind`` (default: every kind), in words, for messages."""
    kinds = [kind] if kind else KINDS
    return " or ".join(
        "{" + ", ".join(option) + "}" + f" ({k})" for k in kinds for option in KIND_COLUMNS[k]
    )


def _tokenized(kind: str, columns) -> bool:
    return "prompt_ids" in columns and not any(
        set(option) <= set(columns) for option in KIND_COLUMNS[kind] if "prompt_ids" not in option
    )


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def tokenize(dataset, processing_class, kind: str):
    """``dataset`` tokenised by the matching TRL trainer's ``_prepare_dataset``, without truncation or filtering.

    Returns a dataset with ``prompt_ids`` + ``chosen_ids`` + ``rejected_ids`` (preference), ``prompt_ids`` +
    ``completion_ids`` (+ ``label``) (unpaired), or ``input_ids`` + ``labels`` (completion), one row per input row,
    in order. TRL's methods are called with a stand-in ``self`` carrying what they read (the tokenizer and, for
    SFT, the completion-only flag); truncation is applied later, as the trainers' collators do.
    """
    import trl

    tok = _tokenizer_of(processing_class)
    if tok.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; TRL's trainers append it to plain-text completions")
    columns = dataset.column_names
    if kind == PREFERENCE:
        if _tokenized(kind, columns):
            return dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        stub = types.SimpleNamespace(_tokenizer=tok)
        args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
        with _quiet_datasets():
            out = trl.DPOTrainer._prepare_dataset(stub, dataset, processing_class, args, "extraction")
        return out.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    if kind in (UNPAIRED, COMPLETION) and _tokenized(kind, columns):
        keep = ["prompt_ids", "completion_ids"] + (["label"] if kind == UNPAIRED else [])
        data = dataset.select_columns(keep)
        if kind == COMPLETION:
            data = data.map(_ids_to_labels, remove_columns=["prompt_ids", "completion_ids"])
        return data
    if kind == UNPAIRED:
        stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=False)
        args = types.SimpleNamespace(dataset_num_proc=None, max_length=None)
        with _quiet_datasets():
            out = trl.KTOTrainer._prepare_dataset(stub, dataset, processing_class, args, "extraction")
        return out.select_columns(["prompt_ids", "completion_ids", "label"])
    # Completion: SFT's prompt/completion path with completion-only loss gives `input_ids` and `labels`.
    stub = types.SimpleNamespace(_tokenizer=tok, completion_only_loss=True, chat_template=None)
    args = types.SimpleNamespace(
        dataset_num_proc=None, max_length=None, truncation_mode="keep_start", dataset_text_field="text",
        assistant_only_loss=False, shuffle_dataset=False, seed=0,
    )
    with _quiet_datasets():
        out = trl.SFTTrainer._prepare_dataset(stub, dataset, processing_class, args, False, None, "extraction")
    return out.select_columns(["input_ids", "labels"])


def _ids_to_labels(example):
    ids = list(example["prompt_ids"]) + list(example["completion_ids"])
    return {"input_ids": ids, "labels": [-100] * len(example["prompt_ids"]) + list(example["completion_ids"])}


# ---------------------------------------------------------------------------------------------------------------------
# Lengths, truncation and dropping (the trainers' rules)


def _list_lengths(dataset, column: str):
    import numpy as np
    import pyarrow.compute as pc

    parts = [
        pc.list_value_length(batch[column]).to_numpy(zero_copy_only=False)
        for batch in dataset.with_format("arrow").iter(batch_size=65536)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class _Plan:
    """Per row: the sort key (longest sequence after truncation), whether it is truncated, whether it is dropped."""

    lengths: Any
    truncated: Any
    dropped: Any


def _plan(kind: str, tokens, max_length: Optional[int], truncation_mode: str) -> _Plan:
    import numpy as np

    if kind == PREFERENCE:
        prompt = _list_lengths(tokens, "prompt_ids")
        full = np.maximum(prompt + _list_lengths(tokens, "chosen_ids"), prompt + _list_lengths(tokens, "rejected_ids"))
    elif kind == UNPAIRED:
        prompt = _list_lengths(tokens, "prompt_ids")
        full = prompt + _list_lengths(tokens, "completion_ids")
    else:
        full = _list_lengths(tokens, "input_ids")
    if max_length is None:
        no = np.zeros(len(full), dtype=bool)
        return _Plan(full, no, no.copy())
    truncated = full > max_length
    if kind == PREFERENCE:
        dropped = prompt >= max_length if truncation_mode == "keep_start" else np.zeros(len(full), dtype=bool)
    elif kind == UNPAIRED:
        dropped = prompt >= max_length
    else:  # SFT drops rows whose labels are all -100 after truncation
        dropped = np.zeros(len(full), dtype=bool)
        for i in np.nonzero(truncated)[0]:
            labels = tokens[int(i)]["labels"]
            kept = labels[:max_length] if truncation_mode == "keep_start" else labels[-max_length:]
            dropped[i] = all(label == -100 for label in kept)
    return _Plan(np.minimum(full, max_length), truncated & ~dropped, dropped)


def _cut(values: list, max_length: Optional[int], truncation_mode: str) -> list:
    """SFT's truncation of a row (``keep_start``: the first ``max_length`` items, ``keep_end``: the last)."""
    if max_length is None:
        return values
    return values[:max_length] if truncation_mode == "keep_start" else values[-max_length:]


# ---------------------------------------------------------------------------------------------------------------------
# Batches: collation and scoring


def _collator(kind: str, pad_token_id: int, max_length, truncation_mode, pad_to_multiple_of):
    if kind == PREFERENCE:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        return DataCollatorForPreference(
            pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode,
            pad_to_multiple_of=pad_to_multiple_of,
        )
    if kind == UNPAIRED:
        from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

        return DataCollatorForUnpairedPreference(
            pad_token_id=pad_token_id, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
        )
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def sft_collate(examples):
        cut = [
            {key: _cut(e[key], max_length, truncation_mode) for key in ("input_ids", "labels")} for e in examples
        ]
        return collate(cut)

    return sft_collate


def _labels_and_mask(kind: str, batch: dict):
    """``(labels [S, T], shifted mask [S, T - 1])``: the completion tokens of each sequence, -100 elsewhere."""
    if kind == COMPLETION:
        labels = batch["labels"]
        return labels, labels[:, 1:] != -100
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return labels, batch["completion_mask"][:, 1:].bool()


def _sequence_logps(model, kind: str, batch: dict) -> torch.Tensor:
    """``[S]`` summed completion log-probs of every sequence of ``batch`` under ``model`` (fused head installed)."""
    labels, shift_mask = _labels_and_mask(kind, batch)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False,
        fused_lm_head=True, fused_outputs=(),
    )
    # Prompt-learning PEFT prepends virtual tokens; keep the real positions (as TRL does).
    return out.log_probs[:, -shift_mask.size(1):].sum(dim=-1)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _input_device(model) -> torch.device:
    from .fused_forward import unwrap_transformers_model

    inner = unwrap_transformers_model(model)
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(inner.parameters()).device


@contextlib.contextmanager
def fused_head(model, impl: str = "auto"):
    """While active, ``model`` answers ``fused_lm_head=True`` calls through `align_losses` and is in eval mode.

    Installs `trainers.fused_forward`'s head on the transformers model (under PEFT, its base model) and, on exit,
    restores exactly what was there (TRL's fused head, an earlier install with other settings, or nothing) and
    the training flag.
    """
    from . import fused_forward as ff

    inner = ff.unwrap_transformers_model(model)
    was_training = model.training
    try:
        with ff.temporary_fused_head(inner, ff.FusedHeadSettings(impl=impl or "auto")):
            ff.check_impl(impl or "auto", inner, ff.fused_settings(inner))
            model.eval()
            yield model
    finally:
        model.train(was_training)


def _progress(total: int, desc: str, enabled: Optional[bool]):
    from tqdm.auto import tqdm

    disable = (not enabled) if enabled is not None else bool(os.environ.get("TQDM_DISABLE", ""))
    return tqdm(total=total, desc=desc, unit="row", disable=disable, dynamic_ncols=True)


def _score_rows(
    tokens,
    plan: _Plan,
    batch_size: int,
    collate: Callable[[list], dict],
    score: Callable[[dict], dict],
    progress: Optional[bool],
    desc: str,
    summary: ExtractionSummary,
    sort_by_length: bool = True,
    rows: Optional[range] = None,
    bar=None,
) -> dict:
    """Score the kept rows of ``tokens`` (those in ``rows``, default all) in batches; ``{name: list}`` with one
    entry per row of ``rows``, in order.

    With ``sort_by_length`` the batches hold rows of similar length, longest first; otherwise consecutive rows.
    ``score(batch)`` returns ``{name: [B] tensor}`` for the ``B`` rows of a collated batch; rows not scored
    (dropped) get None. ``bar``: a progress bar to advance (default: one of its own).
    """
    import numpy as np

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    rows = range(len(plan.lengths)) if rows is None else rows
    n = len(rows)
    kept = np.nonzero(~plan.dropped[rows.start : rows.stop])[0] + rows.start
    order = kept
    if sort_by_length:  # longest first (an out-of-memory error shows at once); stable: ties keep their order
        order = kept[np.argsort(-plan.lengths[kept], kind="stable")]
    results: dict[str, list] = {}
    start = time.perf_counter()
    with contextlib.nullcontext(bar) if bar is not None else _progress(len(order), desc, progress) as bar:
        for lo in range(0, len(order), batch_size):
            idx = [int(i) for i in order[lo : lo + batch_size]]
            chunk = tokens[idx]
            examples = [dict(zip(chunk, values)) for values in zip(*chunk.values())]
            batch = collate(examples)
            summary.padded_tokens += int(batch["input_ids"].numel())
            mask = batch.get("attention_mask")  # packed batches have none: every token is real
            summary.forward_tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            out = score(batch)
            for name, values in out.items():
                column = results.setdefault(name, [None] * n)
                for i, v in zip(idx, values.detach().cpu().tolist()):
                    column[i - rows.start] = v
            bar.update(len(idx))
    summary.seconds += time.perf_counter() - start
    return results


def _scored_tokens(batch: dict) -> int:
    """Completion tokens with a predecessor in a padded (``[S, T]``) or packed (``sequence_lengths``) batch."""
    mask = batch.get("completion_mask")
    if mask is None:
        return 0
    lengths = batch.get("sequence_lengths")
    if lengths is None:
        return int(mask[..., 1:].sum())
    starts = torch.cumsum(lengths, 0) - lengths
    return int(mask.sum() - mask[0, starts].sum())


def _warn_truncation(summary: ExtractionSummary, what: str) -> None:
    if summary.truncated_rows:
        logger.warning(
            "%s: %d of %d rows are longer than max_length=%s and were truncated (%s) before scoring, as the trainer "
            "truncates them; their log-probs cover the kept tokens only. First rows: %s",
            what, summary.truncated_rows, summary.rows, summary.max_length, summary.truncation_mode,
            summary.truncated_indices[:10],
        )
    if summary.dropped_rows:
        logger.warning(
            "%s: %d of %d rows have a prompt that fills max_length=%s (or no completion token left after truncation); "
            "the trainer drops them, and their columns are None. First rows: %s",
            what, summary.dropped_rows, summary.rows, summary.max_length, summary.dropped_indices[:10],
        )


# ---------------------------------------------------------------------------------------------------------------------
# The library call


def _trainer_max_length(kind: str) -> Optional[int]:
    import trl

    config = {PREFERENCE: trl.DPOConfig, UNPAIRED: trl.KTOConfig, COMPLETION: trl.SFTConfig}[kind]
    return {f.name: f for f in dataclasses.fields(config)}["max_length"].default


def _add_columns(dataset, columns: dict):
    from datasets import Value

    clash = [name for name in columns if name in dataset.column_names]
    if clash:
        logger.info("replacing the existing columns %s", clash)
        dataset = dataset.remove_columns(clash)
    for name, values in columns.items():
        dtype = "int64" if name.endswith("tokens") else "float64"
        dataset = dataset.add_column(name, values, feature=Value(dtype))
    return dataset


def _column_names(kind: str) -> tuple:
    return ("chosen", "rejected") if kind == PREFERENCE else ("",)


def _name(side: str, what: str) -> str:
    return f"{side}_{what}" if side else what


def extract_logps(
    model,
    dataset,
    processing_class,
    *,
    ref_model=None,
    beta: Optional[float] = None,
    batch_size: int = 8,
    lce_impl: str = "auto",
    max_length=_TRAINER_DEFAULT,
    truncation_mode: str = "keep_start",
    kind: Optional[str] = None,
    pad_to_multiple_of: Optional[int] = None,
    progress: Optional[bool] = None,
    return_summary: bool = False,
):
    """Add per-sequence log-probs (and reference log-probs and implicit rewards) of ``model`` to ``dataset``.

    Args:
        model: a transformers causal LM (or a PEFT model around one), on the device to run on. It is put in eval
            mode for the call and restored; its ``forward`` is patched for the call only.
        dataset: a `datasets.Dataset` (see the module docstring for the accepted columns). A null (None or
            missing) value in a column the tokenisation reads, or an unpaired ``label`` other than True/False or
            0/1, is a ValueError naming the row and the column, before any work.
        processing_class: the tokenizer (or processor) the trainer would use.
        ref_model: a reference model: adds ``ref_*logps`` columns.
        beta: with ``ref_model``, adds the implicit rewards ``beta * (logps - ref_logps)`` (and ``margin`` for
            preference data); a finite number >= 0.
        batch_size: rows per forward (a preference row is two sequences, as in the trainer's batches).
        lce_impl: the `align_losses` backend (``"auto"``, ``"torch"``, ...).
        max_length: truncation length; defaults to the matching TRL config's default (1024). None: no truncation.
        truncation_mode: ``"keep_start"`` or ``"keep_end"`` (preference and completion data; unpaired data
            always keeps the start, as `trl.KTOTrainer` does).
        kind: force ``"preference"``, ``"unpaired"`` or ``"completion"`` instead of detecting it from the columns.
        pad_to_multiple_of: pad batches to a multiple of this (as the trainer's config does; no effect on values).
        progress: show a progress bar (None: unless ``TQDM_DISABLE`` is set).
        return_summary: return ``(dataset, ExtractionSummary)`` instead of the dataset.

    Returns:
        The dataset, all rows in their original order, with the new columns. Preference data: ``chosen_logps``,
        ``rejected_logps``, ``chosen_tokens``, ``rejected_tokens`` [+ ``ref_chosen_logps``, ``ref_rejected_logps``]
        [+ ``chosen_reward``, ``rejected_reward``, ``margin``]. Unpaired and completion data: ``logps``,
        ``tokens`` [+ ``ref_logps``] [+ ``reward``]. Rows the trainer would drop have None there.
    """
    job = prepare_logps(
        model, dataset, processing_class, ref_model=ref_model, beta=beta, batch_size=batch_size, lce_impl=lce_impl,
        max_length=max_length, truncation_mode=truncation_mode, kind=kind, pad_to_multiple_of=pad_to_multiple_of,
        progress=progress,
    )
    result, summary = job.finish(job.score(range(len(dataset))))
    return (result, summary) if return_summary else result


def check_dataset(dataset, kind: Optional[str] = None, where: str = "the dataset") -> str:
    """The checks of `extract_logps` on ``dataset`` alone, before any tokenisation; returns its kind.

    ``kind`` None detects it from the columns. Raises ValueError for a missing column, a null (None or missing)
    value in a column the tokenisation reads (naming the row and the column) and an unpaired ``label`` other
    than True/False or 0/1; an empty dataset too.
    """
    from .dataset_checks import check_rows

    if len(dataset) == 0:
        raise ValueError(f"{where} is empty: expected at least one row")
    if kind is None:
        kind = detect_kind(dataset.column_names)
    elif kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    options = [option for option in KIND_COLUMNS[kind] if set(option) <= set(dataset.column_names)]
    if not options:
        raise ValueError(
            f"missing columns: {where} has {sorted(dataset.column_names)}, but needs {wanted_columns(kind)}"
        )
    check_rows(dataset, options[0], where)
    return kind


def prepare_logps(
    model,
    dataset,
    processing_class,
    *,
    ref_model=None,
    beta: Optional[float] = None,
    batch_size: int = 8,
    lce_impl: str = "auto",
    max_length=_TRAINER_DEFAULT,
    truncation_mode: str = "keep_start",
    kind: Optional[str] = None,
    pad_to_multiple_of: Optional[int] = None,
    progress: Optional[bool] = None,
) -> "LogpsJob":
    """`extract_logps` in steps: its checks and the tokenisation now, and a `LogpsJob` that scores any range
    of rows (`LogpsJob.score`) and adds the columns (`LogpsJob.finish`). Lets a caller keep the rows it has
    scored as it goes (the ``align-losses logps`` command writes them chunk by chunk, for ``--resume``).
    Arguments as `extract_logps`."""
    from datasets import Dataset

    from align_losses.losses.common import check_coefficient

    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset (map-style); got {type(dataset).__name__}")
    if beta is not None and ref_model is None:
        raise ValueError("beta needs a ref_model: the implicit reward is beta * (logps - ref_logps)")
    if beta is not None:
        check_coefficient(beta, "beta")
    if ref_model is not None and ref_model is model:
        raise ValueError("ref_model is the same object as model; pass a separate copy or leave ref_model out")
    if not isinstance(lce_impl, str) or not lce_impl:
        raise ValueError(f"lce_impl must be 'auto' or a backend name (align_losses.backends.names()); got {lce_impl!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end'; got {truncation_mode!r}")
    kind = check_dataset(dataset, kind)
    if kind == UNPAIRED and truncation_mode != "keep_start":
        raise ValueError("unpaired (KTO) data is always truncated with 'keep_start', as trl.KTOTrainer does")
    if max_length is _TRAINER_DEFAULT:
        max_length = _trainer_max_length(kind)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int of tokens or None; got {max_length!r}")

    tokens = tokenize(dataset, processing_class, kind)
    plan = _plan(kind, tokens, max_length, truncation_mode)
    summary = ExtractionSummary(
        kind=kind, rows=len(dataset), max_length=max_length, truncation_mode=truncation_mode, beta=beta,
        truncated_indices=[int(i) for i in plan.truncated.nonzero()[0]],
        dropped_indices=[int(i) for i in plan.dropped.nonzero()[0]],
    )
    summary.truncated_rows, summary.dropped_rows = len(summary.truncated_indices), len(summary.dropped_indices)
    summary.scored_rows = summary.rows - summary.dropped_rows
    tok = _tokenizer_of(processing_class)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return LogpsJob(
        kind=kind, dataset=dataset, tokens=tokens, plan=plan, summary=summary,
        collate=_collator(kind, pad_id, max_length, truncation_mode, pad_to_multiple_of),
        models=[("", model)] + ([("ref_", ref_model)] if ref_model is not None else []),
        beta=beta, batch_size=batch_size, lce_impl=lce_impl, progress=progress,
    )


@dataclass
class LogpsJob:
    """A checked and tokenised `extract_logps` call (from `prepare_logps`), scored a range of rows at a time.

    A row's values depend only on the rows scored with it in one `score` call (they are batched by length;
    padding changes the float32 sums in the last place), so the same ranges give the same values, bit for bit.
    """

    kind: str
    dataset: Any
    tokens: Any
    plan: _Plan
    summary: ExtractionSummary
    collate: Callable[[list], dict]
    models: list
    beta: Optional[float]
    batch_size: int
    lce_impl: str
    progress: Optional[bool]

    @property
    def score_columns(self) -> list:
        """The names `score` returns, in the order of the output columns."""
        sides = _column_names(self.kind)
        names = [_name(s, "logps") for s in sides] + [_name(s, "tokens") for s in sides]
        if len(self.models) > 1:
            names += [f"ref_{_name(s, 'logps')}" for s in sides]
        return names

    def progress_bar(self):
        """A progress bar over every row the job scores (the dropped rows excluded), for `score`'s ``bar``."""
        return _progress(int((~self.plan.dropped).sum()), self._description, self.progress)

    @property
    def _description(self) -> str:
        return f"log-probs ({KIND_TRAINER[self.kind]} tokenisation)"

    def score(self, rows: range, bar=None) -> dict:
        """``{name: list}`` (`score_columns`) for the rows in ``rows``, in order; None for dropped rows."""
        sides = _column_names(self.kind)
        kind, models = self.kind, self.models

        def score(batch):
            out = {}
            _, shift_mask = _labels_and_mask(kind, batch)
            counts = shift_mask.sum(dim=-1)
            for side, values in zip(sides, counts.chunk(len(sides))):
                out[_name(side, "tokens")] = values
            for prefix, m in models:
                logps = _sequence_logps(m, kind, _to_device(batch, _input_device(m)))
                for side, values in zip(sides, logps.float().chunk(len(sides))):
                    out[prefix + _name(side, "logps")] = values
            return out

        forward, padded = self.summary.forward_tokens, self.summary.padded_tokens
        with contextlib.ExitStack() as stack, torch.no_grad():
            for _, m in models:
                stack.enter_context(fused_head(m, self.lce_impl))
            columns = _score_rows(
                self.tokens, self.plan, self.batch_size, self.collate, score, self.progress, self._description,
                self.summary, rows=rows, bar=bar,
            )
        # every model runs every batch
        self.summary.forward_tokens = forward + (self.summary.forward_tokens - forward) * len(models)
        self.summary.padded_tokens = padded + (self.summary.padded_tokens - padded) * len(models)
        return {name: columns.get(name, [None] * len(rows)) for name in self.score_columns}

    def finish(self, columns: dict):
        """``(dataset with the new columns, ExtractionSummary)`` from `score`'s columns of every row, in order."""
        n = len(self.dataset)
        if set(columns) != set(self.score_columns) or any(len(v) != n for v in columns.values()):
            raise ValueError(f"finish needs the columns {self.score_columns} of all {n} rows")
        sides = _column_names(self.kind)
        summary = self.summary
        summary.completion_tokens = int(
            sum(sum(v for v in columns[_name(s, "tokens")] if v is not None) for s in sides)
        )
        ordered = {name: columns[name] for name in self.score_columns}
        _add_rewards(ordered, self.kind, self.beta, len(self.models) > 1, self.dataset, summary)
        _warn_truncation(summary, "extract_logps")
        return _add_columns(self.dataset, ordered), summary


def _add_rewards(columns: dict, kind: str, beta, has_ref: bool, dataset, summary: ExtractionSummary) -> None:
    """Reward columns (with ``beta``) and the summary's reward statistics (with a reference)."""
    if not has_ref:
        return
    scale = 1.0 if beta is None else float(beta)

    def ratio(side, i):
        lp, ref = columns[_name(side, "logps")][i], columns[f"ref_{_name(side, 'logps')}"][i]
        return None if lp is None or ref is None else scale * (lp - ref)

    n = len(dataset)
    if kind == PREFERENCE:
        chosen = [ratio("chosen", i) for i in range(n)]
        rejected = [ratio("rejected", i) for i in range(n)]
        margin = [None if c is None else c - r for c, r in zip(chosen, rejected)]
        if beta is not None:
            columns.update(chosen_reward=chosen, rejected_reward=rejected, margin=margin)
        scored = [m for m in margin if m is not None]
        if scored:
            summary.reward_accuracy = sum(c > r for c, r in zip(chosen, rejected) if c is not None) / len(scored)
            summary.mean_margin = math.fsum(scored) / len(scored)
        return
    reward = [ratio("", i) for i in range(n)]
    if beta is not None:
        columns["reward"] = reward
    if kind == UNPAIRED:
        labels = dataset["label"]
        groups = {"desirable": [], "undesirable": []}
        for r, label in zip(reward, labels):
            if r is not None:
                groups["desirable" if label else "undesirable"].append(r)
        summary.mean_reward = {k: math.fsum(v) / len(v) for k, v in groups.items() if v}
    else:
        scored = [r for r in reward if r is not None]
        summary.mean_reward = {"all": math.fsum(scored) / len(scored)} if scored else None


# ---------------------------------------------------------------------------------------------------------------------
# FusedDPOTrainer's precomputed reference log-probs


def reference_columns(
    trainer, dataset, name: str = "train", batch_size: Optional[int] = None, *, sort_by_length: bool = False
):
    """``dataset`` (tokenised by the trainer) with ``ref_chosen_logps`` and ``ref_rejected_logps`` added.

    The drop-in for ``DPOTrainer._precompute_ref_logps(dataset, name, batch_size)``: the trainer's
    ``data_collator`` and ``compute_ref_log_probs`` (so the reference model, or the policy with its adapters
    off, ``ld_alpha``, autocast and truncation are the trainer's), rows back in order. Truncated rows are counted
    and logged; the `ExtractionSummary` is kept in ``trainer._reference_summary[name]``.

    By default the batches are TRL's (``batch_size`` consecutive rows), which gives the values of TRL's own
    precomputation bit for bit. ``sort_by_length=True`` batches rows of similar length (less padding, faster on
    data of mixed lengths); a row's value then depends on its batch's padded width only through float32 rounding
    (about one unit in the last place of the sum). With a datasets cache (a dataset backed by files and caching on), the
    columns are cached under a fingerprint of the dataset, the reference weights and the truncation settings.
    Several processes, or DeepSpeed without a separate reference model, fall back to TRL's own loop.
    """
    import trl
    from datasets import Dataset, IterableDataset, concatenate_datasets, is_caching_enabled
    from datasets.fingerprint import Hasher

    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style Dataset "
            "or set `precompute_ref_log_probs=False`."
        )
    args = trainer.args
    if batch_size is None:
        batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
    if trainer.accelerator.num_processes > 1 or (trainer.ref_model is None and trainer.is_deepspeed_enabled):
        return trl.DPOTrainer._precompute_ref_logps(trainer, dataset, name, batch_size)

    cache_file = None
    if is_caching_enabled() and dataset.cache_files and getattr(trainer, "_precompute_model_hash", None):
        fingerprint = Hasher.hash(
            ("align-losses.reference_columns", dataset._fingerprint, trainer._precompute_model_hash,
             args.max_length, args.truncation_mode, getattr(trainer, "ld_alpha", None), batch_size, sort_by_length)
        )
        cache_file = dataset._get_cache_file_path(fingerprint)
        if os.path.exists(cache_file):
            return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    model = trainer.ref_model or trainer.model
    device = trainer.accelerator.device
    ids = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    plan = _plan(PREFERENCE, ids, args.max_length, args.truncation_mode)
    plan.dropped[:] = False  # the trainer's own filter has run already
    summary = ExtractionSummary(
        kind=PREFERENCE, rows=len(dataset), scored_rows=len(dataset), max_length=args.max_length,
        truncation_mode=args.truncation_mode, truncated_indices=[int(i) for i in plan.truncated.nonzero()[0]],
    )
    summary.truncated_rows = len(summary.truncated_indices)

    def score(batch):
        summary.completion_tokens += _scored_tokens(batch)
        chosen, rejected = trainer.compute_ref_log_probs(model, _to_device(batch, device))
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    columns = _score_rows(
        dataset, plan, batch_size, trainer.data_collator, score, None,
        f"Computing reference log probs for {name} dataset", summary, sort_by_length=sort_by_length,
    )
    _warn_truncation(summary, f"reference log-probs ({name})")
    trainer._reference_summary = getattr(trainer, "_reference_summary", {})
    trainer._reference_summary[name] = summary

    # float32, the dtype TRL's precomputation stores
    table = Dataset.from_dict(
        {k: torch.tensor(v, dtype=torch.float32).numpy() for k, v in columns.items()}
    )
    if cache_file is not None:  # written once, read back by the next run with the same fingerprint
        table = table.map(
            batched=True, new_fingerprint=fingerprint, cache_file_name=cache_file,
            desc=f"Caching reference log probs for {name} dataset",
        )
    for key in columns:
        if key in dataset.column_names:
            dataset = dataset.remove_columns(key)
    return concatenate_datasets([dataset, table], axis=1)
