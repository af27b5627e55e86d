"""The loss part of a GRPO step: TRL 1.16's GRPOTrainer (its chunked head) against FusedGRPOTrainer (ours).

A Qwen3-1.7B-shaped model (random init, bf16, gradient checkpointing) and a reference copy of it; one prompt
(``--prompt`` tokens) with ``--completions`` synthetic completions (random token ids, no generation) of up
to L tokens each (``--lengths``; the lengths vary over [3L/4, L], right-padded). For each head and length,
in its own subprocess, the three log-prob passes of a step, through each trainer's own methods:

* ``old``: the old policy's log-probs (``_get_per_token_logps_and_entropies`` on the policy, no gradient),
* ``ref``: the reference model's (the same, on the reference copy, ``beta`` > 0),
* ``policy``: ``compute_loss`` (the policy's log-probs and entropies with gradient, TRL's ``dapo`` loss with the
  two above as ``old_per_token_logps``/``ref_per_token_logps``) and its backward,

as a step with ``num_iterations > 1`` and ``beta > 0`` runs them. Per pass: the median time over ``--reps`` runs
after one warm-up (CUDA events), and the peak memory above what was allocated before it
(``reset_peak_memory_stats``; the policy's includes its bf16 gradients, freed between runs).

Logit regimes: the LM head's weight is scaled so that the logits' standard deviation over the completion
tokens is 2 (``flat``) or 8 (``peaky``, as ``benchmarks/head.py``'s), measured on the model's own hidden states
(the head is tied to the embeddings, so the scale is refined once). Time and memory are measured in the peaky
regime only (they do not depend on it); errors in both.

Errors, of each head's per-token log-probs (the ``old`` pass output; the policy pass computes the same)
against float64 log-softmax of the full logits from the same bf16 hidden states and weight, over the
completion tokens: ``logp_err_max``/``logp_err_mean`` (nats per token), ``seq_logp_err_max`` (the largest
error of a completion's summed log-prob), and the importance ratios those errors put in a step whose old
log-probs were exact (a sampler's): per token ``|exp(err) - 1|`` (``ratio_err_max``/``ratio_err_mean``,
GRPO's ``importance_sampling_level="token"``), per sequence ``|exp(mean err) - 1|`` (``seq_ratio_err_max``,
GSPO's ``"sequence"``) and ``|exp(sum err) - 1|`` (``seq_sum_ratio_err_max``, RLOO's).

    python3 benchmarks/rl_step.py --commit $(git rev-parse --short HEAD) --out benchmarks/results   # H100: ~4 min
    python3 benchmarks/rl_step.py --quick                          # tiny model on CPU, < 1 min

Outputs in ``--out``: ``rl-step-latest.json`` (rows) and ``.md`` (``--quick``: ``rl-step-quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from _common import GiB, fmt, log  # noqa: E402

HEADS = {
    "trl": "TRL 1.16 `GRPOTrainer` (its chunked head, `add_fused_lm_head`)",
    "ours": "`FusedGRPOTrainer` (align-losses, `lce_impl=auto`)",
}
REGIMES = {"peaky": 8.0, "flat": 2.0}  # target std of the logits; time and memory in the first only
PASSES = ("old", "ref", "policy")
DEFAULT_LENGTHS = "1024,4096"


# ---------------------------------------------------------------------------------------------------------------------
# Options


def build_parser():
    p = _common.doc_parser(__doc__)
    p.add_argument("--lengths", default=None, help=f"comma-separated completion lengths (default {DEFAULT_LENGTHS}; "
                   "--quick: 32,64)")
    p.add_argument("--heads", default="trl,ours", help="comma-separated subset of trl,ours")
    p.add_argument("--model", choices=sorted(_common.MODELS), default=None,
                   help="model shape (default qwen3-1.7b; --quick: tiny)")
    p.add_argument("--completions", type=int, default=None, help="completions per prompt (default 8; --quick: 4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 256; --quick: 16)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (the reference pass runs; default 0.04)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per pass after one warm-up (default 3)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default bf16 (CPU: float32)")
    p.add_argument("--child-timeout", type=int, default=300, help="seconds per child process (default 300)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # HEAD:LENGTH:JSON_PATH, set by the parent
    _common.add_run_args(p, "a tiny model on CPU (smoke test)", "output name (default rl-step-latest; --quick: "
                         "rl-step-quick)")
    return p


def resolve(args) -> None:
    _common.resolve_device_dtype(args)
    args.model = args.model or ("tiny" if args.quick else "qwen3-1.7b")
    args.lengths = [int(x) for x in (args.lengths or ("32,64" if args.quick else DEFAULT_LENGTHS)).split(",")]
    args.heads = [h for h in args.heads.split(",") if h]
    unknown = set(args.heads) - set(HEADS)
    if unknown:
        raise SystemExit(f"unknown heads {sorted(unknown)}; expected a subset of {list(HEADS)}")
    args.completions = args.completions or (4 if args.quick else 8)
    args.prompt = args.prompt or (16 if args.quick else 256)
    args.name = args.name or ("rl-step-quick" if args.quick else "rl-step-latest")
    if args.reps < 1:
        raise SystemExit("--reps must be at least 1")


# ---------------------------------------------------------------------------------------------------------------------
# One (head, length) configuration, in a child process


def make_batch(torch, vocab: int, prompt: int, completions: int, length: int, device: str, seed: int) -> dict:
    """TRL's per-step inputs for one prompt and its completions: random ids, lengths in [3L/4, L], right padding."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (1, prompt), generator=g).expand(completions, prompt).contiguous()
    completion_ids = torch.randint(0, vocab, (completions, length), generator=g)
    lengths = length - torch.randint(0, length // 4 + 1, (completions,), generator=g)
    completion_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(completions, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(torch, batch: dict):
    """``(input_ids, attention_mask, logits_to_keep)`` as TRL builds them."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return ids, mask, batch["completion_ids"].shape[1]


def no_grad_passes(torch, trainer):
    """The context of TRL's no-gradient passes: no grad, gradient checkpointing off (as in its generation step)."""
    import contextlib

    from trl.models.utils import disable_gradient_checkpointing

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs))
    return stack


def hidden_states(torch, trainer, model, ids, mask, keep):
    """``[B, keep, D]`` last hidden states before each completion label, from the backbone the heads read,
    under the accelerator's autocast as TRL's passes run it."""
    with no_grad_passes(torch, trainer), trainer.accelerator.autocast():
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -keep - 1:-1]


def scale_head(torch, trainer, models, target_std: float, batch: dict) -> float:
    """Scale the (tied) head weight of every model in ``models`` so that the first's logits over the first
    completion's tokens have std ``target_std``; twice, since tied embeddings move the hidden states too.
    Returns the std reached."""
    ids, mask, keep = model_inputs(torch, batch)
    ids, mask = ids[:1], mask[:1]

    def std():
        h = hidden_states(torch, trainer, models[0], ids, mask, keep)[0, :2048].float()
        with torch.no_grad():
            return float((h @ models[0].lm_head.weight.float().T).std())

    for _ in range(2):
        factor = target_std / std()
        with torch.no_grad():
            for m in models:
                m.lm_head.weight.mul_(factor)
    return std()


def reference_logps(torch, trainer, model, batch: dict, chunk: int = 1024):
    """float64 ``[B, C]`` log-probs of the completion labels from the full logits (hidden states and weight as the
    heads see them: in the autocast dtype; divided by the sampling temperature)."""
    ids, mask, keep = model_inputs(torch, batch)
    hidden = hidden_states(torch, trainer, model, ids, mask, keep)
    # Both heads cast hidden states and weight to the autocast dtype (bf16) before their GEMM: so does the reference.
    dtype = torch.bfloat16 if trainer.args.bf16 else model.lm_head.weight.dtype
    flat_h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    labels = ids[:, -keep:].reshape(-1)
    w64 = model.lm_head.weight.detach().to(dtype).double()
    out = torch.empty(labels.shape, dtype=torch.float64, device=labels.device)
    with torch.no_grad():
        for s in range(0, flat_h.shape[0], chunk):
            logits = (flat_h[s:s + chunk].double() @ w64.T) / trainer.temperature
            out[s:s + chunk] = logits.log_softmax(-1).gather(-1, labels[s:s + chunk, None]).squeeze(-1)
    del w64
    return out.view(ids.shape[0], keep)


def log_prob_errors(torch, logps, reference, mask) -> dict:
    """Errors of ``logps`` [B, C] against the float64 ``reference`` over ``mask``, and the importance ratios they
    give against exact old log-probs (see the module docstring)."""
    m = mask.bool()
    err = (logps.double() - reference).masked_fill(~m, 0.0)
    count = m.sum(-1).clamp(min=1)
    token = err[m]
    seq_sum = err.sum(-1)
    return {
        "logp_err_max": float(token.abs().max()),
        "logp_err_mean": float(token.abs().mean()),
        "seq_logp_err_max": float(seq_sum.abs().max()),
        "ratio_err_max": float(token.exp().sub(1).abs().max()),
        "ratio_err_mean": float(token.exp().sub(1).abs().mean()),
        "seq_ratio_err_max": float((seq_sum / count).exp().sub(1).abs().max()),
        "seq_sum_ratio_err_max": float(seq_sum.exp().sub(1).abs().max()),
        "ref_logp_mean": float(reference[m].mean()),
    }


class PassClock:
    """Times one pass (CUDA events; CPU: perf_counter) and reads its peak memory above what was allocated before."""

    def __init__(self, torch, device: str):
        self.torch, self.cuda = torch, device == "cuda"

    def __call__(self, fn):
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - t0) * 1e3, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / GiB


def build_trainer(head: str, model, tokenizer, args, length: int, out_dir: str):
    """TRL's GRPOTrainer or ours on ``model``, ``beta=0`` at construction (the reference is attached after)."""
    import torch
    import trl
    from datasets import Dataset

    from trainers import FusedGRPOConfig, FusedGRPOTrainer

    cls, config_cls = (trl.GRPOTrainer, trl.GRPOConfig) if head == "trl" else (FusedGRPOTrainer, FusedGRPOConfig)
    config = config_cls(
        output_dir=out_dir, per_device_train_batch_size=args.completions, num_generations=args.completions,
        max_completion_length=length, beta=0.0, loss_type="dapo", bf16=args.dtype == "bfloat16",
        use_cpu=args.device == "cpu", gradient_checkpointing=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=args.seed,
    )
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                  train_dataset=Dataset.from_dict({"prompt": ["x"] * args.completions}), processing_class=tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    assert trainer.model is model and next(model.parameters()).dtype == getattr(torch, args.dtype)
    return trainer


def attach_reference(trainer, head: str, ref, beta: float) -> None:
    """The reference model as GRPOTrainer's ``__init__`` sets it up for ``beta > 0`` (TRL's head or ours on it)."""
    trainer.ref_model, trainer.beta = ref, beta
    if head == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(ref, temperature=trainer.temperature)
    else:
        trainer._install_fused_heads()


def run_passes(torch, trainer, batch: dict, reps: int, device: str) -> dict:
    """Times and peaks of the three passes (median / max over ``reps`` runs after one warm-up, which autotunes
    and compiles); the old log-probs."""
    ids, mask, keep = model_inputs(torch, batch)
    rows = ids.shape[0]
    clock = PassClock(torch, device)

    def logps(model):
        with no_grad_passes(torch, trainer):
            return trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, batch_size=rows)[0]

    times = {p: [] for p in PASSES}
    peaks = {p: [] for p in PASSES}

    def measure(name, fn):
        out, ms, gib = clock(fn)
        times[name].append(ms)
        peaks[name].append(gib)
        return out

    for _ in range(1 + reps):
        old = measure("old", lambda: logps(trainer.model))
        ref = measure("ref", lambda: logps(trainer.ref_model))
        trainer.model.zero_grad(set_to_none=True)
        inputs = dict(batch, old_per_token_logps=old, ref_per_token_logps=ref)

        def policy():
            loss = trainer.compute_loss(trainer.model, inputs)
            loss.backward()
            return loss.detach()

        loss = measure("policy", policy)
    trainer.model.zero_grad(set_to_none=True)
    timed = {p: sorted(v[1:])[len(v[1:]) // 2] for p, v in times.items()}
    peak = {p: (max(v[1:]) if v[0] is not None else None) for p, v in peaks.items()}
    return {"ms": timed, "ms_all": times, "peak_gib": peak, "loss": float(loss), "old_logps": old}


def child(args, head: str, length: int) -> dict:
    """One head at one completion length: passes timed (peaky), errors in both regimes. Returns its row."""
    torch = _common.setup_torch(args.device)
    dtype = getattr(torch, args.dtype)
    _, model_kwargs = _common.MODELS[args.model]
    model = _common.build_model(model_kwargs, args.device, dtype, args.seed, args.attn, train=True)
    ref = _common.build_model(model_kwargs, args.device, dtype, args.seed, args.attn, train=False)
    tokenizer = _common.load_tokenizer()
    batch = make_batch(torch, model_kwargs["vocab_size"], args.prompt, args.completions, length, args.device,
                       args.seed + length)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(head, model, tokenizer, args, length, out_dir)
        attach_reference(trainer, head, ref, args.beta)
        row = {"head": head, "head_desc": HEADS[head], "length": length, "prompt": args.prompt,
               "completions": args.completions, "tokens": int(batch["completion_mask"].sum()),
               "backend": trainer.lce_backend if head == "ours" else "trl-chunked",
               "base_gib": torch.cuda.memory_allocated() / GiB if args.device == "cuda" else None,
               "errors": {}, "logit_std": {}}
        for i, (regime, target) in enumerate(REGIMES.items()):
            row["logit_std"][regime] = scale_head(torch, trainer, [model, ref], target, batch)
            if i == 0:
                measured = run_passes(torch, trainer, batch, args.reps, args.device)
                old = measured.pop("old_logps")
                row.update(measured)
            else:
                ids, mask, keep = model_inputs(torch, batch)
                with no_grad_passes(torch, trainer):
                    old = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, batch_size=ids.shape[0])[0]
            reference = reference_logps(torch, trainer, model, batch)
            row["errors"][regime] = log_prob_errors(torch, old, reference, batch["completion_mask"])
            log(f"{head} L={length} {regime}: std {row['logit_std'][regime]:.2f}, "
                f"logp err max {row['errors'][regime]['logp_err_max']:.3g}")
    return row


# ---------------------------------------------------------------------------------------------------------------------
# The parent: one child per (head, length), the outputs


def run_child(args, argv, head: str, length: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{head}:{length}:{path}"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        os.unlink(path)
        return {"head": head, "length": length, "error": f"timed out after {args.child_timeout} s"}
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"head": head, "length": length, "error": " | ".join(tail)[-800:]}
        with open(path) as f:
            row = json.load(f)
    finally:
        os.unlink(path)
    row["child_s"] = round(time.time() - t0, 1)
    return row


def render(rows: list, meta: dict) -> str:
    lines = ["# The loss part of a GRPO step: TRL 1.16's GRPOTrainer against FusedGRPOTrainer", ""]
    lines += _common.meta_lines(meta) + [""]
    lines += [
        "Per head and completion length: one prompt, "
        f"{meta.get('completions')} synthetic completions (lengths in [3L/4, L]), beta {meta.get('beta')}, dapo loss, "
        "gradient checkpointing. Times: median of the timed runs (ms); peaks: GiB above what was allocated before "
        "the pass (the policy pass includes its bf16 gradients). Errors: the old pass's per-token log-probs "
        "against float64 log-softmax of the full logits (same hidden states and weight); ratio errors are "
        "|exp(err) - 1| per token, |exp(mean err) - 1| (GSPO) and |exp(sum err) - 1| (RLOO) per sequence.",
        "",
        "| L | head | backend | old ms | ref ms | policy fwd+bwd ms | total ms | peak old / ref / policy GiB "
        "| logp err max / mean (peaky) | seq logp err max (peaky) | token ratio err max (peaky) "
        "| seq ratio err max, mean / sum (peaky) | logp err max / mean (flat) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['head']} | error: {_common.md_escape(r['error'][:200])} |" + " |" * 10)
            continue
        ms, pk = r["ms"], r["peak_gib"]
        e, f = r["errors"].get("peaky", {}), r["errors"].get("flat", {})
        lines.append(
            f"| {r['length']} | {r['head']} | {r['backend']} | {fmt(ms['old'], '.1f')} | {fmt(ms['ref'], '.1f')} "
            f"| {fmt(ms['policy'], '.1f')} | {fmt(sum(ms.values()), '.1f')} "
            f"| {' / '.join(fmt(pk[p], '.2f') for p in PASSES)} "
            f"| {fmt(e.get('logp_err_max'), '.2e')} / {fmt(e.get('logp_err_mean'), '.2e')} "
            f"| {fmt(e.get('seq_logp_err_max'), '.2e')} | {fmt(e.get('ratio_err_max'), '.2e')} "
            f"| {fmt(e.get('seq_ratio_err_max'), '.2e')} / {fmt(e.get('seq_sum_ratio_err_max'), '.2e')} "
            f"| {fmt(f.get('logp_err_max'), '.2e')} / {fmt(f.get('logp_err_mean'), '.2e')} |")
    lines += ["", "Ours against TRL at the same length (time and peak: ours / TRL; errors: TRL / ours, peaky):", ""]
    by = {(r["head"], r["length"]): r for r in rows if "error" not in r}
    for length in sorted({r["length"] for r in rows}):
        o, t = by.get(("ours", length)), by.get(("trl", length))
        if not (o and t):
            continue
        total = sum(o["ms"].values()) / sum(t["ms"].values())
        peak_o = [v for v in o["peak_gib"].values() if v is not None]
        peak_t = [v for v in t["peak_gib"].values() if v is not None]
        peak = (max(peak_o) / max(peak_t)) if peak_o and peak_t else None
        eo, et = o["errors"]["peaky"], t["errors"]["peaky"]
        closer = et["logp_err_mean"] / max(eo["logp_err_mean"], 1e-300)
        closer_max = et["logp_err_max"] / max(eo["logp_err_max"], 1e-300)
        lines.append(f"- L={length}: time {total:.3f}x, largest pass peak {fmt(peak, '.3f')}x; per-token log-prob "
                     f"error {closer:.1f}x smaller on average, {closer_max:.1f}x at the max")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    resolve(args)
    if args.child:
        head, length, path = args.child.split(":", 2)
        row = child(args, head, int(length))
        with open(path, "w") as f:
            json.dump(row, f, default=str)
        return 0
    torch = _common.setup_torch(args.device)
    _, model_kwargs = _common.MODELS[args.model]
    meta = _common.run_meta(
        args.commit, _common.device_name(args.device),
        _common.versions(("torch", "transformers", "trl", "triton", "accelerate")),
        _common.command_line(__file__, argv),
        model_desc=_common.model_desc(model_kwargs, args.quick, f", {args.dtype}, attn {args.attn}"),
        completions=args.completions, prompt=args.prompt, beta=args.beta, reps=args.reps,
    )
    del torch
    rows = []
    for length in args.lengths:
        for head in args.heads:
            log(f"{head}, completion length {length} ...")
            row = run_child(args, argv, head, length)
            rows.append({**_common.row_meta(meta), **row})
            if "error" in row:
                log(f"  error: {row['error']}")
            else:
                log(f"  total {sum(row['ms'].values()):.1f} ms, peaks {row['peak_gib']}, child {row['child_s']} s")
            paths = _common.write_outputs(rows, meta, args, render)
    log(f"wrote {paths['json']} and {paths['md']}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
