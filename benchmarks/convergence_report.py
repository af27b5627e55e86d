"""``benchmarks/convergence.py --report``: merge the run files into ``convergence-latest.{json,md,png}``.

Reads ``convergence-run-NAME.json`` (pretraining) and ``convergence-finetune-NAME.json`` (DPO / SFT) from
``--results`` (``-quick`` files under ``--quick``), and ``head-captured.json`` if it is there (head.py
``--captured``, for the distribution table). Every figure comes from those files; each run keeps its own date,
commit and device.

Comparisons (all against ``full-seed0``, the run with the same initial weights and data):
- training loss: means over windows of ``window`` steps (the runs see the same batches, so a window's difference is
  not a difference of content); the noise is the gap of the two full-logits seeds, ``|full-seed1 - full-seed0|``
  per window. A run is within the spread at a window when ``|run - full-seed0| <= |full-seed1 - full-seed0|``;
  reported: that share of the windows, the largest difference, and the root-mean-square of the differences over
  that of the spread (over the whole run and its last quarter);
- held-out loss: the same at every evaluation (one evaluator, the model's own full-logits loss, for every run);
- step time: median step wall time (steps 6 onwards) and its ratio to full-seed0's (the same device only);
- DPO and SFT: ours against TRL's step by step: the largest absolute difference of each logged curve (loss,
  reward accuracy, margins, chosen / rejected rewards; SFT: loss, token accuracy, entropy) and the median step times.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import _common

BASE, NOISE = "full-seed0", "full-seed1"
#: The settings every compared pretraining run must share with the reference run (besides its corpus): all but
#: its loss head and initial seed. `convergence.RESUME_KEYS` adds those two for a checkpoint.
SAME_SETTINGS = ("model", "steps", "seq_len", "batch", "micro_batch", "lr", "min_lr", "warmup", "weight_decay", "clip",
                 "data_seed", "dtype", "eval_every", "eval_windows")
RUN_ORDER = ("full-seed0", "full-seed1", "ours", "cce", "liger")
FT_PAIRS = (("dpo", "trl-dpo", "fused-dpo"), ("sft", "trl-sft", "fused-sft"))
DPO_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
SFT_KEYS = ("loss", "mean_token_accuracy", "entropy")


def load_files(folder: Path, quick: bool) -> tuple[dict, dict]:
    suffix = "-quick.json" if quick else ".json"
    runs, fts = {}, {}
    for path in sorted(folder.glob("convergence-*.json")):
        name = path.name
        if quick != name.endswith("-quick.json") or not name.endswith(suffix):
            continue
        data = json.loads(path.read_text())
        if data.get("kind") == "pretrain":
            runs[data["run"]] = data
        elif data.get("kind") == "finetune":
            fts[data["run"]] = data
    return runs, fts


def window_means(values: list, window: int) -> list:
    return [statistics.fmean(values[i: i + window]) for i in range(0, len(values) - window + 1, window)]


def rms(xs) -> float:
    xs = [x for x in xs if x is not None]
    return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else float("nan")


def compare_series(run: list, base: list, noise, at: list = None) -> dict:
    """``|run - base|`` against ``|noise - base|`` point by point; ``at``: the points' x values (steps; default 1,
    2, ...). The differences cover every point ``run`` and ``base`` share; the spread, the points within it and
    the ratios only the first ``spread_points`` of them, where ``noise`` exists too (a run still going has fewer)."""
    n = min(len(run), len(base))
    diff = [run[i] - base[i] for i in range(n)]
    out = {"points": n, "at": list(at[:n]) if at is not None else list(range(1, n + 1)), "diff": diff,
           "max_abs_diff": max((abs(d) for d in diff), default=None), "rms_diff": rms(diff)}
    if noise is not None:
        m = min(n, len(noise))
        spread = [abs(noise[i] - base[i]) for i in range(m)]
        inside = [abs(diff[i]) <= spread[i] for i in range(m)]
        q = m - m // 4
        out.update(spread=spread, spread_points=m, within=sum(inside), within_share=sum(inside) / m if m else None,
                   rms_spread=rms(spread),
                   rms_ratio=rms(diff[:m]) / rms(spread) if rms(spread) > 0 else None,
                   rms_ratio_last_quarter=(rms(diff[q:m]) / rms(spread[q:]) if m and rms(spread[q:]) > 0 else None))
    return out


def pretrain_comparisons(runs: dict, window: int) -> dict:
    out = {"window": window, "train": {}, "heldout": {}, "step_ms": {}}
    if BASE not in runs:
        return out
    base = runs[BASE]["history"]
    noise = runs.get(NOISE, {}).get("history")
    base_w = window_means(base["loss"], window)
    noise_w = window_means(noise["loss"], window) if noise else None
    base_ms = median_ms(runs[BASE])
    for name, r in runs.items():
        h = r["history"]
        ms = median_ms(r)
        out["step_ms"][name] = {"median_ms": ms, "vs_base": ms / base_ms if ms and base_ms else None,
                                "same_device_as_base": devices(r) == devices(runs[BASE]),
                                "tokens_per_s": (r["settings"]["batch"] * r["settings"]["seq_len"] / (ms / 1e3)
                                                 if ms else None)}
        if name == BASE:
            continue
        run_w = window_means(h["loss"], window)
        out["train"][name] = compare_series(run_w, base_w, noise_w if name != NOISE else None,
                                            at=[window * (i + 1) for i in range(len(run_w))])  # each window's last step
        out["heldout"][name] = heldout_series(h, base, noise if name != NOISE else None)
    return out


def heldout_series(run: dict, base: dict, noise) -> dict:
    """`compare_series` of the held-out losses at the evaluation steps all three have, step 0 left out (the runs of
    one initial seed are equal there, which would count as inside the spread)."""
    def by_step(h):
        return dict(zip(h["heldout_step"], h["heldout_loss"]))

    r, b = by_step(run), by_step(base)
    steps = sorted(set(r) & set(b) - {0})
    spread = None
    if noise is not None:  # the noise run's points, up to where it stops (compare_series compares a prefix)
        z = by_step(noise)
        spread = [z[st] for st in steps[:next((i for i, st in enumerate(steps) if st not in z), len(steps))]]
    return compare_series([r[st] for st in steps], [b[st] for st in steps], spread, at=steps)


def median_ms(r: dict):
    ms = r["history"]["step_ms"][5:] or r["history"]["step_ms"]
    return statistics.median(ms) if ms else None


def devices(r: dict) -> list:
    return sorted({seg.get("device") for seg in r.get("segments", [])})


def finetune_comparisons(fts: dict, warnings: list) -> dict:
    out = {}
    for algo, theirs, ours in FT_PAIRS:
        if theirs not in fts or ours not in fts:
            continue
        bases = {fts[n].get("base_weights_sha256") for n in (theirs, ours)}
        if len(bases) > 1 or None in bases:
            warnings.append(f"{theirs} and {ours} did not start from the same recorded base weights "
                            f"({', '.join(str(b)[:12] for b in sorted(bases, key=str))}): their curves are not compared")
            continue
        a, b = fts[theirs]["curves"], fts[ours]["curves"]
        keys = DPO_KEYS if algo == "dpo" else SFT_KEYS
        cmp = {}
        for k in keys:
            if k in a and k in b:
                n = min(len(a[k]), len(b[k]))
                d = [b[k][i] - a[k][i] for i in range(n) if a[k][i] is not None and b[k][i] is not None]
                cmp[k] = {"steps": n, "max_abs_diff": max((abs(x) for x in d), default=None), "rms_diff": rms(d),
                          "last_trl": a[k][n - 1] if n else None, "last_ours": b[k][n - 1] if n else None}
        ms = {n: statistics.median(fts[n]["step_ms"][2:] or fts[n]["step_ms"]) if fts[n]["step_ms"] else None
              for n in (theirs, ours)}
        out[algo] = {"trl": theirs, "ours": ours, "curves": cmp, "median_step_ms": ms,
                     "same_device": fts[theirs].get("device") == fts[ours].get("device")}
    return out


def fmt(x, spec=".4f"):
    return _common.fmt(x, spec)


def render(report: dict) -> str:
    runs, fts, cmp = report["runs"], report["finetunes"], report["comparisons"]
    out = ["# Convergence on real text: loss heads against the model's own full-logits loss", "",
           f"- report: {report['date']}, commit {report['commit']}",
           f"- corpus: {report['corpus_summary']}", ""]
    if report["warnings"]:
        out += ["Warnings:", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    if runs:
        any_run = runs[report["reference"]]
        s = any_run["settings"]
        out += [f"Pretraining: {any_run['params']['total'] / 1e6:.1f}M parameters (Qwen3-shaped, "
                f"{', '.join(f'{k}={v}' for k, v in s['model'].items())}), {s['steps']} steps of {s['batch']} x "
                f"{s['seq_len']} tokens, lr {s['lr']} -> {s['min_lr']} (cosine, {s['warmup']} warm-up), autocast "
                f"{s['dtype']}, data seed {s['data_seed']} for every run; the two full-logits runs differ in their "
                "initial weights only.", "",
                "| run | loss head | status | steps | final train loss (last window) | final held-out | step time "
                "(median) | vs full-seed0 | tokens/s | date | commit | device | corpus |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        w = cmp["pretrain"]["window"]
        for name in sorted(runs, key=lambda n: RUN_ORDER.index(n) if n in RUN_ORDER else 99):
            r = runs[name]
            h = r["history"]
            last = statistics.fmean(h["loss"][-w:]) if h["loss"] else None
            t = cmp["pretrain"]["step_ms"].get(name, {})
            segs = r.get("segments", [])
            out.append("| " + " | ".join([
                name, r["head"], r["status"], f"{r['steps_done']}/{s['steps']}", fmt(last), fmt(h["heldout_loss"][-1]),
                fmt(t.get("median_ms"), ".0f") + " ms", fmt(t.get("vs_base"), ".3f") + ("" if t.get("same_device_as_base", True) else " (other device)"),
                fmt(t.get("tokens_per_s"), ".0f"), ", ".join(sorted({g["date"] for g in segs})),
                ", ".join(sorted({g["commit"] for g in segs})), ", ".join(devices(r)),
                r["corpus"]["train_sha256"][:12]]) + " |")
        out += ["", f"Differences against full-seed0 (training loss: means over windows of {w} steps; held-out: every "
                "evaluation), beside the seed spread |full-seed1 - full-seed0| at the same points (max and RMS diff over all "
                "points; the spread and the ratios over those where full-seed1 has run):", "",
                "| run | curve | points within the spread | max abs diff | RMS diff | RMS spread | RMS diff / RMS spread "
                "| same, last quarter |", "|---|---|---|---|---|---|---|---|"]
        for kind in ("train", "heldout"):
            for name, c in cmp["pretrain"][kind].items():
                within = ((f"{c['within']}/{c['spread_points']}" + (
                              f" (of {c['points']}: the spread exists up to step {c['at'][c['spread_points'] - 1]})"
                              if c["spread_points"] < c["points"] and c["spread_points"] else ""))
                          if "within" in c else "(the noise itself)" if name == NOISE else "(no full-seed1 to compare with)")
                out.append("| " + " | ".join([name, "train" if kind == "train" else "held-out", within,
                                              fmt(c["max_abs_diff"]), fmt(c["rms_diff"]), fmt(c.get("rms_spread")),
                                              fmt(c.get("rms_ratio"), ".2f"), fmt(c.get("rms_ratio_last_quarter"), ".2f")])
                           + " |")
        out.append("")
        out += ["Held-out loss at each evaluation:", "",
                "| step | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        at = {name: dict(zip(r["history"]["heldout_step"], r["history"]["heldout_loss"])) for name, r in runs.items()}
        for st in sorted(set().union(*(set(a) for a in at.values()))):
            out.append(f"| {st} | " + " | ".join(fmt(at[name][st]) if st in at[name] else "-" for name in runs) + " |")
        out.append("")
    for algo, c in cmp["finetune"].items():
        a, b = fts[c["trl"]], fts[c["ours"]]
        s = a["settings"]
        out += [f"## {algo.upper()} from {a['base']} (step {a['base_step']}): {c['trl']} against {c['ours']}", "",
                f"{s['ft_steps']} steps of {s['ft_batch']} {'pairs' if algo == 'dpo' else 'sequences'}, prompt "
                f"{s['ft_prompt']} + completion {s['ft_completion']} tokens from {a['heldout_windows']} held-out windows, "
                f"lr {s['ft_lr']}" + (f", beta {s['ft_beta']}, rejected = {s['ft_corrupt']:.0%} of the completion's "
                                      "tokens replaced" if algo == "dpo" else f", label smoothing {s['ft_smoothing']}")
                + f". Median step: TRL {fmt(c['median_step_ms'][c['trl']], '.0f')} ms, ours "
                f"{fmt(c['median_step_ms'][c['ours']], '.0f')} ms ({a['device']}"
                + ("" if c["same_device"] else f" / {b['device']}") + f"; TRL {a['date']}, commit {a['commit']}; ours "
                f"{b['date']}, commit {b['commit']}; base weights sha256 {str(a.get('base_weights_sha256'))[:12]}).", "",
                "| curve | last TRL | last ours | max abs diff | RMS diff |", "|---|---|---|---|---|"]
        for k, v in c["curves"].items():
            out.append(f"| {k} | {fmt(v['last_trl'])} | {fmt(v['last_ours'])} | {fmt(v['max_abs_diff'], '.2e')} | "
                       f"{fmt(v['rms_diff'], '.2e')} |")
        out.append("")
    if report.get("head_captured"):
        hc = report["head_captured"]
        out += ["## The head on the trained distributions", "",
                f"`{hc['file']}` ({hc.get('date')}, commit {hc.get('commit')}, {hc.get('device')}): times and errors "
                "there; the distributions of its three regimes:", "",
                "| logits | logit std | entropy mean | top-1 mass | top-10 mass | top-100 mass |", "|---|---|---|---|---|---|"]
        for regime, d in hc["dist"].items():
            out.append(f"| {regime} | {d['logit_std_mean']:.2f} | {d['entropy_mean']:.3f} | {d['top1_mass_mean']:.3f} | "
                       f"{d['top10_mass_mean']:.3f} | {d['top100_mass_mean']:.3f} |")
        out += ["", "The captured regime's rows (time / floor, peak, the four gradient errors against fp32; bound as for "
                "peaky):", "", "| impl | time / floor | peak GiB | grad_h | grad_h fixed upstream | grad_w | grad_w fixed "
                "upstream | checks | error |", "|---|---|---|---|---|---|---|---|---|"]
        for r in hc.get("rows", []):
            checks = r.get("checks") or {}
            out.append("| " + " | ".join([r["impl"], fmt(r.get("ratio"), ".2f"), fmt(r.get("peak_gib"), ".3f"),
                                          fmt(r.get("grad_h_rel"), ".1e"), fmt(r.get("head_grad_h_rel"), ".1e"),
                                          fmt(r.get("grad_w_rel"), ".1e"), fmt(r.get("head_grad_w_rel"), ".1e"),
                                          " ".join(f"{k} {'ok' if v else 'no'}" for k, v in checks.items() if v is not None),
                                          str(r.get("error") or "")[:120]]) + " |")
        out.append("")
    if report.get("png"):
        out += [f"![curves]({os.path.basename(report['png'])})", ""]
    return "\n".join(out) + "\n"


def plot(report: dict, path: str):
    """Training loss, its difference to full-seed0 with the seed spread, the same for held-out; DPO and SFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, fts, cmp = report["runs"], report["finetunes"], report["comparisons"]
    finetuned = bool(cmp["finetune"])
    # The DPO and SFT columns only when a finetune pair is there to show (no blank panels before).
    fig, ax = plt.subplots(2, 4 if finetuned else 2, figsize=(22 if finetuned else 12, 9))
    w = cmp["pretrain"]["window"]
    colors = {n: f"C{i}" for i, n in enumerate(RUN_ORDER)}
    styles = {"ours": "--", "cce": ":", "liger": "-."}
    for name, r in runs.items():
        h = r["history"]
        wm = window_means(h["loss"], w)
        xs = [w * (i + 1) for i in range(len(wm))]
        ax[0, 0].plot(xs, wm, styles.get(name, "-"), label=name, color=colors.get(name))
        ax[1, 0].plot(h["heldout_step"], h["heldout_loss"], styles.get(name, "-"), marker=".", label=name,
                      color=colors.get(name))
    for row, kind in ((0, "train"), (1, "heldout")):
        a = ax[row, 1]
        for name, c in cmp["pretrain"][kind].items():
            xs = c["at"]
            a.plot(xs, c["diff"], styles.get(name, "-"), label=name, color=colors.get(name))
            if name == NOISE:
                a.fill_between(xs, [-abs(d) for d in c["diff"]], [abs(d) for d in c["diff"]], color="grey", alpha=0.2,
                               label="|seed spread|")
        a.axhline(0, color="k", lw=0.5)
        a.set_title(f"{'train (window means)' if kind == 'train' else 'held-out'} loss - full-seed0")
        a.set_xlabel("step")
        a.legend(fontsize=8)
    ax[0, 0].set_title(f"train loss (means over {w} steps)")
    ax[1, 0].set_title("held-out loss (full-logits evaluator)")
    for a in (ax[0, 0], ax[1, 0]):
        a.set_xlabel("step")
        a.legend(fontsize=8)
    panels = (("dpo", 0, (("loss", "rewards/accuracies"), ("rewards/margins", "rewards/chosen", "rewards/rejected"))),
              ("sft", 1, (("loss", "mean_token_accuracy"), ("entropy",))))
    for algo, row, groups in panels if finetuned else ():
        c = cmp["finetune"].get(algo)
        for col, keys in zip((2, 3), groups):
            a = ax[row, col]
            if not c:
                a.set_visible(False)
                continue
            twin = a.twinx() if len(keys) == 2 and col == 2 else None
            for name, style in ((c["trl"], "-"), (c["ours"], "--")):
                curves = fts[name]["curves"]
                for i, k in enumerate(keys):
                    if k in curves:
                        target = twin if (twin is not None and i == 1) else a
                        target.plot(range(1, len(curves[k]) + 1), curves[k], style, color=f"C{i}", label=f"{name} {k}")
            a.set_title(f"{algo.upper()}: TRL (solid) vs ours (dashed)")
            a.set_xlabel("step")
            a.set_ylabel(keys[0])
            a.legend(fontsize=7, loc="upper left")
            if twin is not None:
                twin.set_ylabel(keys[1])
                twin.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"convergence on real text ({report['date']}, commit {report['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def head_captured(results: Path, out: Path, quick: bool):
    for folder in (results, out):
        path = folder / ("head-captured-quick.json" if quick else "head-captured.json")
        if path.exists():
            rows = json.loads(path.read_text())
            dist = {}
            for r in rows:
                if r.get("dist") and r["logits"] not in dist:
                    dist[r["logits"]] = r["dist"]
            first = rows[0] if rows else {}
            keys = ("impl", "logits", "ms", "ratio", "floor_ms", "bound_ratio", "peak_gib", "target_peak_gib", "grad_h_rel",
                    "grad_w_rel", "head_grad_h_rel", "head_grad_w_rel", "seq_logp_err", "checks", "error")
            return {"file": os.path.relpath(path, _common.REPO), "date": first.get("date"), "commit": first.get("commit"),
                    "device": first.get("device"), "dist": dist,
                    "rows": [{k: r.get(k) for k in keys} for r in rows if r.get("logits") == "captured"]}
    return None


def comparable(runs: dict, fts: dict, warnings: list) -> tuple[str, dict, dict]:
    """The reference run (full-seed0, else the first in `RUN_ORDER`) and the runs and finetunes made on its corpus
    (and, for pretraining, with its `SAME_SETTINGS`); the others are left out with a warning."""
    reference = BASE if BASE in runs else min(runs, key=lambda n: RUN_ORDER.index(n) if n in RUN_ORDER else 99)
    ref = runs[reference]
    kept_runs, kept_fts = {}, {}
    for name, r in runs.items():
        other = [k for k in SAME_SETTINGS if r["settings"].get(k) != ref["settings"].get(k)]
        if r["corpus"] != ref["corpus"] or other:
            why = "another corpus" if r["corpus"] != ref["corpus"] else "other settings (" + ", ".join(other) + ")"
            warnings.append(f"{name} left out: made on {why} than {reference}")
            continue
        kept_runs[name] = r
    for name, f in fts.items():
        if f["corpus"] != ref["corpus"]:
            warnings.append(f"{name} left out: made on another corpus than {reference}")
            continue
        kept_fts[name] = f
    return reference, kept_runs, kept_fts


def report(args) -> int:
    results, out = Path(args.results), Path(args.out)
    runs, fts = load_files(results, args.quick)
    if not runs:
        print(f"no pretraining run files in {results}: the report compares against one")
        return 1
    warnings = []
    reference, runs, fts = comparable(runs, fts, warnings)
    for name, r in runs.items():
        if r["status"] != "done":
            warnings.append(f"{name} is {r['status']} ({r['steps_done']}/{r['settings']['steps']} steps)")
    for name, f in fts.items():  # a finetune starts from one run's final weights: that run's, as shown?
        base_weights = runs.get(f.get("base"), {}).get("weights_sha256")
        if base_weights and f.get("base_weights_sha256") != base_weights:
            warnings.append(f"{name} started from another {f['base']} than the curve shown (another session's run)")
    steps = runs[reference]["settings"]["steps"]
    window = max(1, steps // 40)
    corpus = runs[reference]["corpus"]
    report_ = {
        "date": _common.utc_now(), "commit": args.commit or _common.git_commit(), "reference": reference,
        "corpus": corpus,
        "corpus_summary": (f"{corpus['train_tokens']:,} training / {corpus['heldout_tokens']:,} held-out tokens, vocabulary "
                           f"{corpus['vocab_size']}, train sha256 {corpus['train_sha256'][:16]}, packages "
                           + ", ".join(f"{k} {v}" for k, v in corpus["versions"].items())),
        "warnings": warnings, "runs": runs, "finetunes": fts,
        "comparisons": {"pretrain": pretrain_comparisons(runs, window), "finetune": finetune_comparisons(fts, warnings)},
        "head_captured": head_captured(results, out, args.quick),
    }
    name = args.name or ("convergence-quick" if args.quick else "convergence-latest")
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    try:
        report_["png"] = plot(report_, str(png))
    except ImportError as exc:
        print(f"no plot ({exc}): run --report where matplotlib is installed")
        report_["png"] = None
    (out / f"{name}.json").write_text(json.dumps(report_, indent=1, default=str))
    (out / f"{name}.md").write_text(render(report_))
    print(f"wrote {out / name}.json, .md" + (", .png" if report_["png"] else ""))
    for w in warnings:
        print("warning:", w)
    return 0
