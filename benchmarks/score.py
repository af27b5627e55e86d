"""Scoring preference pairs (issue 5): `trainers.extract.extract_logps` against full logits, one process.

A Qwen3-1.7B-shaped model (random init, bf16, eval, no grad) scores N preference pairs of random token ids
(prompt P + completion C tokens, chosen and rejected: 2 sequences of P + C per pair, all the same length, so
no padding); a pair's two numbers are the summed completion log-probs of chosen and rejected.

    python benchmarks/score.py --commit $(git rev-parse --short HEAD)    # H200: ~1.5-2 min
    python benchmarks/score.py --pairs 2000 --baseline-pairs 512          # issue 5's full N (~3 min)
    python benchmarks/score.py --quick                                    # tiny model on CPU, seconds

Two scorers, the same batches (``--batch-size`` pairs = 2 x that many sequences per forward):
- ``ours``: `trainers.extract.extract_logps(model, dataset, tokenizer, batch_size=B, max_length=None)` on the
  pre-tokenised columns ``prompt_ids``/``chosen_ids``/``rejected_ids`` (its fused head: no ``[tokens, vocab]``
  logits). With ``--ours fused-forward`` (or when `trainers.extract` cannot be imported) a local loop over
  `trainers.fused_forward` (``model(..., fused_lm_head=True)``) with TRL's `DataCollatorForPreference` instead;
- ``baseline``: ``model(input_ids, attention_mask).logits`` (bf16) -> ``log_softmax`` in fp32 -> ``gather`` of
  the next tokens -> sum over the completion, per batch, the common hand-written scorer. It runs on the first
  ``--baseline-pairs`` pairs, first at the same batch size; an out-of-memory error is recorded as a result
  row and the batch size is halved until it runs (``--no-baseline-fallback`` stops at the first OOM).

Each scorer first runs one untimed warm-up batch. Measured: ``seconds`` (the scoring loop, synchronised),
``rows_per_s`` (pairs), ``tokens_per_s`` (2 x (P + C) x pairs / seconds), ``peak_gib``
(``max_memory_allocated`` during the scoring, the model's ``model_gib`` included) and, on the pairs both scored,
``max_abs_diff`` (and mean, and relative to |log-prob|) between ours and the baseline's log-probs. The baseline's
logits are rounded to bf16, so a difference of a fraction of a nat over a few thousand completion tokens is
expected; ours accumulates in fp32.

Outputs in ``--out`` (default ``benchmarks/results/``; ``--quick``: ``score-quick.*``): ``score-latest.json`` (a list of rows, one per scorer
attempt, with ``date``/``commit``/``device`` and the run's setup) and ``score-latest.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, however this is run
import _common  # noqa: E402 - puts the checkout on sys.path too
from _common import GiB, QUICK_MODEL, QWEN3_1_7B, build_model, load_tokenizer, log, meta_lines  # noqa: E402
from _common import fmt as _fmt, is_oom as _is_oom, md_escape, sync as _sync  # noqa: E402

DEFAULTS = dict(pairs=1024, baseline_pairs=256, prompt=1024, completion=3072, batch_size=8)
QUICK = dict(pairs=24, baseline_pairs=12, prompt=32, completion=96, batch_size=4)
VERSIONS = ("torch", "transformers", "trl", "datasets", "triton")


# ---------------------------------------------------------------------------------------------------------------------
# Model and data


def make_dataset(pairs: int, P: int, C: int, vocab: int, seed: int, avoid: set):
    """Pre-tokenised preference pairs of random ids in ``[0, vocab)`` (never the ids in ``avoid``)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    bad = np.array(sorted(i for i in avoid if i is not None and 0 <= i < vocab), dtype=np.int64)

    def column(n_per_row: int):
        values = rng.integers(0, vocab, size=pairs * n_per_row, dtype=np.int64)
        if len(bad):  # redraw special ids (EOS/pad) so the data is plain tokens
            hit = np.isin(values, bad)
            while hit.any():
                values[hit] = rng.integers(0, vocab, size=int(hit.sum()), dtype=np.int64)
                hit = np.isin(values, bad)
        offsets = np.arange(0, pairs * n_per_row + 1, n_per_row, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    table = pa.table({"prompt_ids": column(P), "chosen_ids": column(C), "rejected_ids": column(C)})
    return Dataset(table)


# ---------------------------------------------------------------------------------------------------------------------
# Scorers


def _collator(pad_id: int):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_id)


def _batches(dataset, n: int, batch_size: int, collate):
    for lo in range(0, n, batch_size):
        chunk = dataset[lo : min(n, lo + batch_size)]
        examples = [dict(zip(chunk, values)) for values in zip(*chunk.values())]
        yield lo, collate(examples)


def baseline_logps(model, batch: dict, device: str):
    """``[2B]`` summed completion log-probs from the full logits (bf16) -> fp32 log_softmax -> gather."""
    import torch

    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    mask = batch["completion_mask"].to(device)[:, 1:].bool()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1)
    del logits
    token = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    del logps
    return (token * mask).sum(-1)


def _score_loop(logps, dataset, n: int, batch_size: int, device: str, pad_id: int) -> tuple[dict, list]:
    """``logps(batch) -> [2B]`` over the first n pairs, after one untimed warm-up batch:
    ``(row, [(chosen, rejected)] of the first n pairs)``; raises on error (OOM included)."""
    import torch

    collate = _collator(pad_id)
    with torch.no_grad():
        _, warm = next(_batches(dataset, min(n, batch_size), batch_size, collate))
        logps(warm)  # warm-up, untimed
        del warm
        _sync(device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = []
        start = time.perf_counter()
        for _, batch in _batches(dataset, n, batch_size, collate):
            values = logps(batch).float().cpu()
            half = values.numel() // 2
            out.extend(zip(values[:half].tolist(), values[half:].tolist()))
        _sync(device)
        seconds = time.perf_counter() - start
    row = {"pairs": n, "seconds": seconds}
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    return row, out


def run_baseline(model, dataset, n: int, batch_size: int, device: str, pad_id: int) -> tuple[dict, list]:
    """``(row, [(chosen, rejected)] of the first n pairs)``; raises on error (OOM included)."""
    return _score_loop(lambda batch: baseline_logps(model, batch, device), dataset, n, batch_size, device, pad_id)


def run_ours_extract(model, dataset, tok, n: int, batch_size: int, device: str, impl: str) -> tuple[dict, list]:
    import torch
    from trainers.extract import extract_logps

    sub = dataset.select(range(n))
    warm = dataset.select(range(min(n, batch_size)))
    extract_logps(model, warm, tok, batch_size=batch_size, lce_impl=impl, max_length=None, progress=False)
    _sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    scored, summary = extract_logps(
        model, sub, tok, batch_size=batch_size, lce_impl=impl, max_length=None, progress=False, return_summary=True
    )
    _sync(device)
    wall = time.perf_counter() - start
    row = {
        "pairs": n,
        "seconds": summary.seconds,
        "wall_s": wall,
        "summary": summary.to_dict(),
    }
    for key in ("truncated_indices", "dropped_indices"):
        row["summary"].pop(key, None)
    if summary.truncated_rows or summary.dropped_rows:
        raise RuntimeError(f"extract_logps truncated {summary.truncated_rows} / dropped {summary.dropped_rows} rows")
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    out = list(zip(scored["chosen_logps"], scored["rejected_logps"]))
    return row, out


def run_ours_forward(model, dataset, n: int, batch_size: int, device: str, impl: str, pad_id: int) -> tuple[dict, list]:
    """The fallback: a local loop over the fused forward (``model(..., fused_lm_head=True)``)."""
    from trainers.fused_forward import FusedHeadSettings, install_fused_head

    install_fused_head(model, FusedHeadSettings(impl=impl))

    def logps(batch):
        input_ids = batch["input_ids"].to(device)
        cm = batch["completion_mask"].to(device)
        labels = input_ids.masked_fill(cm == 0, -100)
        o = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), labels=labels,
                  use_cache=False, fused_lm_head=True, fused_outputs=())
        return o.log_probs.sum(-1)

    return _score_loop(logps, dataset, n, batch_size, device, pad_id)


# ---------------------------------------------------------------------------------------------------------------------
# Output


def render_markdown(rows: list, meta: dict) -> str:
    lines = [
        "# Scoring preference pairs: extract_logps against full logits",
        "",
        *meta_lines(meta),  # date, commit, device, versions, command, model
        f"- data: {meta['data_desc']}",
        "",
        "rows/s = pairs per second of the scoring loop (after one warm-up batch); tokens/s = 2 x (prompt + "
        "completion) x pairs / seconds; peak = `max_memory_allocated` during the scoring, the model "
        f"({meta.get('model_gib', 0):.2f} GiB) included. diff = |ours - baseline| of the summed completion log-probs "
        "on the pairs both scored (chosen and rejected).",
        "",
        "| scorer | batch (pairs) | pairs | seconds | rows/s | tokens/s | peak | max abs diff | mean abs diff | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = md_escape(r.get("error") or "")[:160]
        lines.append(
            f"| {r['label']} | {r['batch_size']} | {r.get('pairs', '-')} | {_fmt(r.get('seconds'), '.2f', ' s')} | "
            f"{_fmt(r.get('rows_per_s'), '.2f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(r.get('peak_gib'), '.1f', ' GiB')} | {_fmt(r.get('max_abs_diff'), '.3g')} | "
            f"{_fmt(r.get('mean_abs_diff'), '.3g')} | {err} |"
        )
    ours = [r for r in rows if r["scorer"] == "ours" and not r.get("error")]
    base = [r for r in rows if r["scorer"] == "baseline" and not r.get("error")]
    if ours and base:
        o, b = ours[0], base[0]
        lines += [
            "",
            f"Ours against the baseline: {o['rows_per_s'] / b['rows_per_s']:.2f}x the rows/s"
            + (f", {o['peak_gib']:.1f} GiB against {b['peak_gib']:.1f} GiB peak" if o.get("peak_gib") is not None else "")
            + f" (batch {o['batch_size']} against {b['batch_size']}); largest log-prob difference "
            f"{_fmt(b.get('max_abs_diff'), '.3g')} nats (relative {_fmt(b.get('max_rel_diff'), '.2e')}) on "
            f"{b.get('compared_pairs')} pairs.",
        ]
    if meta.get("extrapolated"):
        lines += ["", meta["extrapolated"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _common.doc_parser(__doc__)
    d = DEFAULTS
    p.add_argument("--pairs", type=int, help=f"pairs ours scores (default {d['pairs']}; issue 5: 2000; --quick {QUICK['pairs']})")
    p.add_argument("--baseline-pairs", type=int,
                   help=f"pairs the baseline scores, the first ones (default {d['baseline_pairs']}; --quick {QUICK['baseline_pairs']}; 0: skip)")
    p.add_argument("--prompt", type=int, help=f"prompt tokens (default {d['prompt']})")
    p.add_argument("--completion", type=int, help=f"completion tokens, chosen and rejected (default {d['completion']})")
    p.add_argument("--batch-size", type=int, help=f"pairs per forward, both scorers (default {d['batch_size']})")
    p.add_argument("--no-baseline-fallback", action="store_true",
                   help="on a baseline OOM, do not retry at half the batch size")
    p.add_argument("--ours", default="extract", choices=("extract", "fused-forward"),
                   help="extract: trainers.extract.extract_logps (default); fused-forward: a local loop over "
                        "model(..., fused_lm_head=True)")
    p.add_argument("--impl", default="auto", help="lce_impl of ours (default auto)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="model dtype (default bfloat16; float32 on CPU)")
    _common.add_run_args(p, quick_help=f"tiny Qwen3-shaped model (vocab {QUICK_MODEL['vocab_size']}), {QUICK['pairs']} pairs "
                              f"of {QUICK['prompt']}+{QUICK['completion']}, on CPU unless --device cuda: a smoke test",
                 name_help="output file stem (default score-latest; score-quick with --quick)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.name = args.name or ("score-quick" if args.quick else "score-latest")
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pairs < 1 or args.batch_size < 1 or args.prompt < 1 or args.completion < 2 or args.baseline_pairs < 0:
        raise SystemExit("--pairs, --batch-size, --prompt must be >= 1, --completion >= 2, --baseline-pairs >= 0")
    args.baseline_pairs = min(args.baseline_pairs, args.pairs)
    _common.resolve_device_dtype(args)
    torch = _common.setup_torch(args.device)

    ours_mode = args.ours
    if ours_mode == "extract":
        try:
            import trainers.extract  # noqa: F401
        except Exception as exc:  # not landed (or broken): the fused-forward loop instead
            log(f"trainers.extract unavailable ({type(exc).__name__}: {exc}); scoring ours with --ours fused-forward")
            ours_mode = "fused-forward"

    model_kwargs = QUICK_MODEL if args.quick else QWEN3_1_7B
    P, C = args.prompt, args.completion
    seq_tokens = 2 * (P + C)
    meta = _common.run_meta(
        args.commit, _common.device_name(args.device), _common.versions(VERSIONS),
        _common.command_line(__file__, argv),
        model_desc=_common.model_desc(model_kwargs, args.quick,
                                      f", random init, {args.dtype}, attn {args.attn}, eval, no grad"),
        data_desc=f"{args.pairs} pairs (baseline: the first {args.baseline_pairs}), prompt {P} + completion {C} tokens "
        f"(chosen and rejected), random ids, no padding; ours = "
        + ("trainers.extract.extract_logps" if ours_mode == "extract" else "fused-forward loop")
        + f" (lce_impl {args.impl})",
    )
    row_meta = _common.row_meta(meta)
    setup = {"prompt": P, "completion": C, "tokens_per_pair": seq_tokens}
    log(f"device {meta['device']}; versions {meta['versions']}")
    log(meta["data_desc"] + f"; batch {args.batch_size} pairs; out {args.out}/{args.name}.{{json,md}}")

    tok = load_tokenizer()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    dataset = make_dataset(args.pairs, P, C, model_kwargs["vocab_size"], args.seed, {tok.pad_token_id, tok.eos_token_id})
    log(f"data: {len(dataset)} pairs in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    model = build_model(model_kwargs, args.device, getattr(torch, args.dtype), args.seed, args.attn)
    _sync(args.device)
    meta["model_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, {meta['model_gib']:.2f} GiB, "
        f"built in {time.perf_counter() - t0:.1f}s")
    rows: list = []
    results: dict = {}

    def finish(row: dict, scorer: str, label: str, batch_size: int, fn) -> bool:
        row.update({"scorer": scorer, "label": label, "batch_size": batch_size, **setup, **row_meta, "error": None})
        t = time.perf_counter()
        try:
            measured, values = fn()
            row.update(measured)
            row["rows_per_s"] = row["pairs"] / row["seconds"]
            row["tokens_per_s"] = row["pairs"] * seq_tokens / row["seconds"]
            results[scorer] = values
            ok = True
        except Exception as exc:
            row["error"] = ("OOM: " if _is_oom(exc) else "") + f"{type(exc).__name__}: {str(exc)[:400]}"
            if not _is_oom(exc):
                traceback.print_exc()
            del exc
            ok = False
        _common.free_memory(args.device)
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        if ok:
            log(f"  {label}: {row['pairs']} pairs in {row['seconds']:.2f}s = {row['rows_per_s']:.2f} rows/s, "
                f"{row['tokens_per_s']:,.0f} tokens/s, peak {_fmt(row.get('peak_gib'), '.2f', ' GiB')}")
        else:
            log(f"  {label}: ERROR {row['error'][:300]}")
        _common.write_outputs(rows, meta, args, render_markdown)
        return ok

    # ours
    label = ("extract_logps (ours)" if ours_mode == "extract" else "fused forward loop (ours)")
    log(f"{label}, batch {args.batch_size} ...")
    if ours_mode == "extract":
        fn = lambda: run_ours_extract(model, dataset, tok, args.pairs, args.batch_size, args.device, args.impl)  # noqa: E731
    else:
        fn = lambda: run_ours_forward(model, dataset, args.pairs, args.batch_size, args.device, args.impl, pad_id)  # noqa: E731
    finish({}, "ours", label, args.batch_size, fn)

    # baseline: same batch size first, halve on OOM
    if args.baseline_pairs > 0:
        bs = args.batch_size
        while bs >= 1:
            log(f"baseline (full logits -> log_softmax -> gather), batch {bs} ...")
            ok = finish({}, "baseline", "full logits -> log_softmax -> gather", bs,
                        lambda: run_baseline(model, dataset, args.baseline_pairs, bs, args.device, pad_id))
            if ok or args.no_baseline_fallback or not _is_oom(rows[-1]["error"] or ""):
                break
            bs //= 2

    # agreement on the pairs both scored
    if "ours" in results and "baseline" in results:
        import numpy as np

        n = min(len(results["ours"]), len(results["baseline"]))
        a = np.asarray(results["ours"][:n], dtype=np.float64)
        b = np.asarray(results["baseline"][:n], dtype=np.float64)
        diff = np.abs(a - b)
        stats = {
            "compared_pairs": n,
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "max_rel_diff": float((diff / np.maximum(np.abs(b), 1e-30)).max()),
            "mean_abs_logp": float(np.abs(b).mean()),
        }
        for r in rows:
            if r["scorer"] == "baseline" and not r["error"]:
                r.update(stats)
        log(f"agreement on {n} pairs: max |diff| {stats['max_abs_diff']:.4g} nats, mean {stats['mean_abs_diff']:.4g}, "
            f"max relative {stats['max_rel_diff']:.3g} (mean |logp| {stats['mean_abs_logp']:.5g})")
    ours_row = next((r for r in rows if r["scorer"] == "ours" and not r["error"]), None)
    if ours_row and args.pairs != 2000:
        meta["extrapolated"] = (f"At the measured rate ours would score issue 5's 2000 pairs in "
                                f"{2000 / ours_row['rows_per_s']:.0f} s.")
    paths = _common.write_outputs(rows, meta, args, render_markdown)
    log(f"wrote {paths['json']} and {paths['md']}")
    print(render_markdown(rows, meta), flush=True)
    return 0 if ours_row else 1


if __name__ == "__main__":
    sys.exit(main())
