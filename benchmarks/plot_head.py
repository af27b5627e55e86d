"""Plot benchmarks/head.py's results: time / floor against peak memory, one panel per shape.

    python benchmarks/plot_head.py benchmarks/results/head-latest.json [out.png]

One point per impl and shape at its worse (higher) time / floor of the two logit regimes, with a bar
down to the other regime's; x is the peak above the inputs (the larger of the two regimes), log scale.
The dashed lines are the targets of docs/targets.md: 1.40x the floor and the shape's peak limit
(grads + 0.15 GiB + 4 B x labelled tokens x D); the target corner is shaded. The red dotted line is the
four-GEMM bound measured in the same run (the higher of the two regimes), where an exact head that
keeps no [N, V] tensor can at best get.
"""

from __future__ import annotations

import json
import os
import sys

TARGET_RATIO = 1.40


def _points(rows):
    """{config: {impl: (peak, ratio_hi, ratio_lo, target_peak)}} from the rows without errors."""
    out = {}
    for r in rows:
        if r.get("error") or r.get("ratio") is None or r.get("peak_gib") is None:
            continue
        cfg = out.setdefault(r["config"], {})
        peak, ratio = r["peak_gib"], r["ratio"]
        if r["impl"] in cfg:
            p0, hi, lo, tp = cfg[r["impl"]]
            cfg[r["impl"]] = (max(p0, peak), max(hi, ratio), min(lo, ratio), tp)
        else:
            cfg[r["impl"]] = (peak, ratio, ratio, r.get("target_peak_gib"))
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(rows)
    configs = [c for c in dict.fromkeys(r["config"] for r in rows) if c in points]
    if not configs:
        print("plot_head: no successful rows to plot", flush=True)
        return None
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(impls) <= 10 else "tab20")
    colors = {name: cmap(i % cmap.N) for i, name in enumerate(impls)}
    markers = {name: ("*" if name.startswith("ours") else "o") for name in impls}

    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, len(configs), figsize=(max(9.0, 5.2 * len(configs)), 5.0), squeeze=False)
    for ax, config in zip(axes[0], configs):
        pts = points[config]
        target_peak = next((p[3] for p in pts.values() if p[3]), None)
        xs = [p[0] for p in pts.values()]
        ys = [p[1] for p in pts.values()]
        xmin, xmax = min(xs + [target_peak or xs[0]]) / 1.6, max(xs + [target_peak or xs[0]]) * 1.6
        ymax = max(ys + [TARGET_RATIO]) * 1.1
        if target_peak:
            ax.axvline(target_peak, ls="--", color="grey", lw=1)
            ax.fill_between([xmin, target_peak], 0, TARGET_RATIO, color="tab:green", alpha=0.08, lw=0)
        ax.axhline(TARGET_RATIO, ls="--", color="grey", lw=1)
        ax.axhline(1.0, ls=":", color="black", lw=0.8)
        bound = max((r["bound_ratio"] for r in rows if r["config"] == config and r.get("bound_ratio")), default=None)
        if bound:
            ax.axhline(bound, ls=":", color="tab:red", lw=1)
            ax.text(xmin * 1.05, bound, "four cuBLAS GEMMs", color="tab:red", fontsize=7, va="bottom")
        for name, (peak, hi, lo, _) in pts.items():
            ax.plot([peak, peak], [lo, hi], color=colors[name], lw=1.5, alpha=0.6)
            ax.scatter([peak], [hi], color=colors[name], marker=markers[name], s=90 if markers[name] == "*" else 40,
                       label=name, zorder=3, edgecolors="black", linewidths=0.4)
        any_row = next(r for r in rows if r["config"] == config)
        ax.set_title(f"{config}: {any_row['tokens']} labelled tokens, D {any_row['hidden']}, V {any_row['vocab']}",
                     fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(0, ymax)
        ax.set_xlabel("peak above inputs (GiB)")
        ax.set_ylabel("time / three-GEMM floor")
        ax.grid(True, which="both", alpha=0.25)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[0][1:]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=min(5, len(seen)), fontsize=8, frameon=False)
    meta = next((r for r in rows if r.get("date")), {})
    fig.suptitle(f"DPO loss head, fwd+bwd, bf16 — {meta.get('device', '')} — {meta.get('date', '')} — "
                 f"commit {meta.get('commit', '')}\npoint: the worse logit regime, bar: down to the other; "
                 f"dashed: targets (1.40x floor, peak limit); red dotted: four cuBLAS GEMMs, same run", fontsize=9)
    rows_of_legend = (len(seen) + 4) // 5
    fig.tight_layout(rect=(0, 0.05 + 0.035 * rows_of_legend, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    src = argv[0]
    dst = argv[1] if len(argv) > 1 else os.path.splitext(src)[0] + ".png"
    with open(src) as f:
        rows = json.load(f)
    out = plot(rows, dst)
    if out:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
