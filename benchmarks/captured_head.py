"""head.py's ``--captured`` input: a trained model's final hidden states, next-token labels and head weight (written
by ``benchmarks/convergence.py --capture``), and the statistics that compare their distributions with the
synthetic "flat" and "peaky" ones.

The capture file (``torch.save`` of a dict): ``hidden`` bf16 ``[rows, seq, D]`` (after the model's last norm),
``weight`` bf16 ``[V, D]`` (the trained ``lm_head``), ``labels`` int64 ``[rows, seq]`` (the next token at every
position), ``meta`` (where it came from). head.py treats it as one more logit regime, ``captured``, on a shape
of the file's size (rows / 2 pairs): the first quarter of every row is prompt (label -100) as in the synthetic
shapes, and the labels are the real next tokens (the same at every timed repetition: new labels would not be the
model's distribution any more).

`distribution_stats` summarises the softmax of the labelled tokens' logits (fp32, token chunks): the entropy
(nats; mean, median, 10th and 90th percentile), the probability mass of the top 1, 10 and 100 tokens, the
standard deviation of a token's logits over the vocabulary (the synthetic regimes are defined by it: 2 flat,
8 peaky), and the mean negative log-probability of the label.
"""

from __future__ import annotations

import math

CAPTURED = "captured"
TOPK = (1, 10, 100)


def load(path, device: str = "cpu") -> dict:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("hidden", "weight", "labels"):
        if key not in data:
            raise ValueError(f"{path}: no {key!r} (expected benchmarks/convergence.py --capture's file)")
    h, w, y = data["hidden"], data["weight"], data["labels"]
    if h.dim() != 3 or w.dim() != 2 or h.shape[-1] != w.shape[1] or tuple(y.shape) != tuple(h.shape[:2]):
        raise ValueError(f"{path}: hidden {tuple(h.shape)}, weight {tuple(w.shape)}, labels {tuple(y.shape)} do not fit")
    if h.shape[0] % 2:
        raise ValueError(f"{path}: {h.shape[0]} rows; DPO pairs need an even number")
    if int(y.min()) < 0 or int(y.max()) >= w.shape[0]:
        raise ValueError(f"{path}: labels outside [0, {w.shape[0]})")
    data["hidden"] = h.to(device=device, dtype=torch.bfloat16)
    data["weight"] = w.to(device=device, dtype=torch.bfloat16)
    data["labels"] = y.to(device=device, dtype=torch.long)
    return data


def shape_of(data: dict) -> dict:
    """``pairs, seq, hidden, vocab`` of a loaded capture."""
    rows, seq, hidden = data["hidden"].shape
    return {"pairs": rows // 2, "seq": seq, "hidden": hidden, "vocab": data["weight"].shape[0]}


def distribution_stats(h, w, labels, ignore: int = -100, chunk_bytes: int = 1 << 29) -> dict:
    """Entropy, top-k mass, logit std and label NLL of ``softmax(h @ w.T)`` over the labelled tokens (fp32)."""
    import torch

    with torch.no_grad():
        d = h.shape[-1]
        flat = labels.reshape(-1)
        idx = torch.nonzero(flat != ignore).squeeze(1)
        hs = h.reshape(-1, d)[idx].float()
        wf = w.float()
        lab = flat[idx]
        chunk = max(1, chunk_bytes // (4 * wf.shape[0]))
        ent, std, nll = [], [], []
        mass = {k: [] for k in TOPK}
        for s in range(0, idx.numel(), chunk):
            z = hs[s: s + chunk] @ wf.t()
            logp = torch.log_softmax(z, dim=1)
            p = logp.exp()
            ent.append(-(p * logp).sum(1))
            std.append(z.std(dim=1))
            nll.append(-logp.gather(1, lab[s: s + chunk, None]).squeeze(1))
            top = p.topk(min(max(TOPK), p.shape[1]), dim=1).values.cumsum(1)
            for k in TOPK:
                mass[k].append(top[:, min(k, top.shape[1]) - 1])
        ent, std, nll = torch.cat(ent), torch.cat(std), torch.cat(nll)
        q = torch.quantile(ent, torch.tensor([0.1, 0.5, 0.9], device=ent.device))
        out = {
            "tokens": int(idx.numel()),
            "entropy_mean": float(ent.mean()),
            "entropy_p10": float(q[0]),
            "entropy_median": float(q[1]),
            "entropy_p90": float(q[2]),
            "logit_std_mean": float(std.mean()),
            "label_nll_mean": float(nll.mean()),
            "max_entropy": math.log(w.shape[0]),
        }
        for k in TOPK:
            out[f"top{k}_mass_mean"] = float(torch.cat(mass[k]).mean())
        return out


def closest_regime(stats: dict):
    """Which synthetic regime the captured distributions are nearer to, by mean entropy and top-1 mass (a reading of
    the table, not a verdict: the filtering backward also depends on where the label sits, see the label NLL)."""
    if CAPTURED not in stats:
        return None
    cap = stats[CAPTURED]
    synth = {k: v for k, v in stats.items() if k != CAPTURED}
    if not synth:
        return None
    parts = []
    for key, what in (("entropy_mean", "mean entropy"), ("top1_mass_mean", "top-1 mass")):
        near = min(synth, key=lambda k: abs(synth[k][key] - cap[key]))
        lo, hi = min(v[key] for v in synth.values()), max(v[key] for v in synth.values())
        where = "between the synthetic regimes" if lo <= cap[key] <= hi else ("below" if cap[key] < lo else "above") + \
            " every synthetic regime"
        parts.append(f"{what} {cap[key]:.3f}: nearest {near} ({synth[near][key]:.3f}), {where}")
    return "Captured against synthetic: " + "; ".join(parts) + "."


def render(rows: list) -> list:
    """Markdown lines: the captured rows' times and errors, and the three regimes' distributions side by side."""
    from head import IMPLS, fmt_err, fmt_gib, fmt_ms, fmt_ratio, row_checks

    cap = [r for r in rows if r.get("logits") == CAPTURED]
    if not cap:
        return []
    first = cap[0]
    src = first.get("captured_meta") or {}
    out = [
        f"## captured: a trained model's hidden states and head (`{first.get('captured_path', '?')}`)",
        "",
        f"From `{src.get('base', '?')}` at step {src.get('step', '?')} (captured {src.get('date', '?')}, commit "
        f"{src.get('commit', '?')}, {src.get('device', '?')}); the real next tokens as labels; "
        f"N = {first.get('tokens_total')} ({first.get('tokens')} labelled), D = {first.get('hidden')}, "
        f"V = {first.get('vocab')}. Error bound as for peaky.",
        "",
        "| impl | peak above inputs | time | time / floor | grad_h err | grad_h err, fixed upstream | grad_w err "
        "| grad_w err, fixed upstream | max seq log-prob err | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cap:
        checks = row_checks(r)
        marks = " ".join(f"{lab}{'✓' if checks[key] else '✗'}" for key, lab in (("time", "t"), ("peak", "m"), ("err", "e"))
                         if checks[key] is not None and not r.get("error"))
        out.append("| " + " | ".join([
            IMPLS.get(r["impl"], r["impl"]), fmt_gib(r.get("peak_gib")), fmt_ms(r.get("ms")), fmt_ratio(r.get("ratio")),
            fmt_err(r.get("grad_h_rel")), fmt_err(r.get("head_grad_h_rel")), fmt_err(r.get("grad_w_rel")),
            fmt_err(r.get("head_grad_w_rel")), fmt_err(r.get("seq_logp_err")), marks]) + " |")
        if r.get("error"):
            out.append(f"| &nbsp;&nbsp;error | {str(r['error'])[:300]} | | | | | | | | |")
    stats = {}
    for r in rows:
        if r.get("config") == first.get("config") and r.get("dist") and r["logits"] not in stats:
            stats[r["logits"]] = r["dist"]
    if stats:
        out += [
            "",
            "Distributions of the labelled tokens (fp32 softmax of the logits), the synthetic regimes on the same shape:",
            "",
            "| logits | logit std | entropy mean (nats) | entropy p10 / median / p90 | top-1 mass | top-10 mass "
            "| top-100 mass | label NLL |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for regime, d in stats.items():
            out.append(f"| {regime} | {d['logit_std_mean']:.2f} | {d['entropy_mean']:.3f} | {d['entropy_p10']:.3f} / "
                       f"{d['entropy_median']:.3f} / {d['entropy_p90']:.3f} | {d['top1_mass_mean']:.3f} | "
                       f"{d['top10_mass_mean']:.3f} | {d['top100_mass_mean']:.3f} | {d['label_nll_mean']:.3f} |")
        out.append(f"\n(maximum entropy log V = {next(iter(stats.values()))['max_entropy']:.3f} nats)")
        line = closest_regime(stats)
        if line:
            out += ["", line]
    return out + [""]
