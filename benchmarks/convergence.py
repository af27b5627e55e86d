"""Convergence on real text: pretraining with each loss head against the model's own full-logits loss, DPO and SFT
continued from the checkpoint with TRL's trainers against ours, and the trained head captured for head.py.

Every step is its own command, resumable, so the work can be spread over calls of under ten minutes (the GPU
machine's limit); ``--plan`` prints the commands with their estimated wall time.

    python benchmarks/corpus.py build                                   # the corpus (benchmarks/corpus.py)
    python benchmarks/convergence.py --plan                             # the commands and their estimated times
    python benchmarks/convergence.py --run full-seed0 --results $OUT    # one pretraining run (resumes; see --time-limit)
    python benchmarks/convergence.py --run full-seed1|ours|cce|liger|full-fp32|ours-seed1 --results $OUT
    python benchmarks/convergence.py --finetune trl-dpo|fused-dpo|trl-sft|fused-sft --results $OUT
    python benchmarks/convergence.py --capture                          # runs/convergence/captured.pt for head.py
    python benchmarks/head.py --captured runs/convergence/captured.pt --name head-captured --out $OUT
    python benchmarks/convergence.py --report                           # convergence-latest.{json,md,png}
    python benchmarks/convergence.py --quick --run ours                 # the same on CPU, tiny (tests the tooling)

Pretraining (``--run NAME``): a Qwen3-shaped model (`MODEL`: hidden 768, 8 layers, 12 heads / 4 KV heads, head dim
64, MLP 2304, vocabulary of the corpus (32768), head not tied: 105M parameters), fp32 weights and AdamW states
(betas 0.9/0.95, weight decay 0.1 on matrices, gradient clipping 1.0, 100 warm-up steps then cosine from 6e-4 to 6e-5),
the body under bf16 autocast. Every step has 64 windows of 1024 tokens (65,536 tokens; ``--micro-batch`` of them per
forward (default 32), gradients accumulated), 2,000 steps (131M tokens). The runs differ only in their loss head, computed from the
same bf16-cast final hidden states and bf16-cast head weight (what autocast gives the model's ``lm_head``):

- ``full-seed0``, ``full-seed1``: the model's own loss: ``lm_head`` (bf16 logits ``[tokens, V]``) and
  ``model.loss_function`` (transformers' ForCausalLMLoss: fp32 upcast, mean cross-entropy). The two seeds differ in the
  initial weights only (``torch.manual_seed`` before the model is built); the data order is the same for every run
  (``--data-seed``), so a step's loss differences between runs are not differences of batch content. Their gap is
  the noise: how far two equally valid runs drift apart.
- ``ours``: ``align_losses.linear_logprobs(impl="auto")``, mean of the negated log-probs (seed 0).
- ``cce``: cut-cross-entropy's ``linear_cross_entropy`` with its defaults (``impl="cce"``, ``filter_eps="high"``)
  (seed 0; on CPU ``impl="torch_compile"``).
- ``liger``: Liger's ``LigerFusedLinearCrossEntropyLoss`` with its defaults (seed 0; CUDA only), given the fp32 head
  weight under autocast as Liger's patched models give it (its GEMMs then take the same bf16 operands; a bf16 weight
  would make it accumulate the weight gradient in bf16).
- ``full-fp32``: full logits like ``full-seed0`` (seed 0) but kept in fp32 (the bf16 operands' products are exact in
  fp32), then fp32 cross-entropy: what an exact head computes, so it tells a difference of ours from the model's own
  loss that comes from the bf16 rounding of the reference's logits from one that comes from ours.
- ``ours-seed1``: ``ours`` from seed 1's initial weights, compared with ``full-seed1``: a second pair.

Each training step's loss is the run's own head's; the held-out loss (every ``--eval-every`` steps and at the end,
on 64 evenly spread held-out windows of 1024 tokens) is computed the same way for every run (the model's own
full-logits loss, no grad), so it compares models, not heads; beside it, the same loss with fp32 logits
(``heldout_loss_fp32``; run files before it have only the first). Step times are wall times with the GPU synchronised.
A run checkpoints every ``--ckpt-every`` (500) steps and when ``--time-limit`` (default 540 s from its start) or
``--deadline`` (a unix time, default ``$CONVERGENCE_DEADLINE``: the call's own limit) would be passed, into
``runs/convergence/NAME/`` (git-ignored; the machine's own disk: it does not travel), and writes
``convergence-run-NAME.json`` (its curves so far, metadata per segment) into ``--results``; the same command
resumes it. The checkpoint records the corpus fingerprint and the run's settings and refuses to resume on others.

DPO / SFT (``--finetune NAME``): from the final checkpoint of ``--base`` (default ``full-seed0``), preference pairs from held-out
files: a prompt of 128 tokens, the real next 128 tokens chosen, the same 128 tokens with 25 % of them replaced by
tokens drawn from the held-out stream rejected, decoded to text. ``trl-dpo`` (`trl.DPOTrainer`) and ``fused-dpo``
(`trainers.FusedDPOTrainer`): 300 steps of 8 pairs, beta 0.1, learning rate 1e-5 constant, bf16; ``trl-sft``
(`trl.SFTTrainer`) and ``fused-sft`` (`trainers.FusedSFTTrainer`): the prompt and the chosen continuation,
completion-only loss, ``label_smoothing_factor`` 0.1, the same steps. Each logs every step (loss, reward accuracy
and margins or entropy and token accuracy) into ``convergence-finetune-NAME.json``.

Capture (``--capture``): the final hidden states (after the last norm, bf16) of 8 held-out windows of 1024 tokens,
the length the model was trained at (N = 8192, head.py's qwen3-1.7b token count), the next tokens as labels and the
bf16 head weight, into ``runs/convergence/captured.pt``; ``benchmarks/head.py --captured`` times the heads on them
and compares their distributions (entropy, top-k mass) with the synthetic flat and peaky ones.

Report (``--report``): reads the run files in ``--results``, writes ``convergence-latest.json`` (every curve and
the comparisons), ``.md`` and ``.png`` (with matplotlib) into ``--out``. Every figure in them comes from the run
files, with each run's date, commit and device.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, corpus.py
import _common  # noqa: E402 - puts the checkout on sys.path too
import convergence_report  # noqa: E402
import corpus as corpus_mod  # noqa: E402

WORK_DIR = corpus_mod.WORK_DIR
RESULTS_DIR = Path(_common.RESULTS_DIR)
RUNS_RESULTS = RESULTS_DIR / "convergence-runs"

#: The pretrained model (Qwen3-shaped, ~105M parameters with a 32768 vocabulary, head not tied: the issue's "about
#: 100-150M" at its low end, so that a run takes ~4-6 device minutes and several fit in one lease).
MODEL = dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, rope_theta=10000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
QUICK_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=False)

#: name -> (loss head, init seed)
RUNS = {
    "full-seed0": ("full", 0),
    "full-seed1": ("full", 1),
    "ours": ("ours", 0),
    "cce": ("cce", 0),
    "liger": ("liger", 0),
    "full-fp32": ("full-fp32", 0),
    "ours-seed1": ("ours", 1),
}
FINETUNES = {
    "trl-dpo": "trl.DPOTrainer (its own chunked LM head: fused_lm_head=True)",
    "fused-dpo": "trainers.FusedDPOTrainer (ours)",
    "trl-sft": "trl.SFTTrainer, label_smoothing_factor 0.1 (TRL's deprecated path: the loss from an extra full-logits "
               "forward each step, so its step time is not its head's)",
    "fused-sft": "trainers.FusedSFTTrainer (ours), label_smoothing_factor 0.1",
}
#: Pretraining defaults; QUICK overrides them under --quick.
DEFAULTS = dict(steps=2000, seq_len=1024, batch=64, micro_batch=32, lr=6e-4, min_lr=6e-5, warmup=100,
                weight_decay=0.1, clip=1.0, eval_every=100, eval_windows=64, ckpt_every=500, data_seed=1234,
                ft_steps=300, ft_batch=8, ft_prompt=128, ft_completion=128, ft_lr=1e-5, ft_beta=0.1,
                ft_smoothing=0.1, ft_corrupt=0.25, capture_rows=8, capture_seq=1024)
QUICK = dict(steps=12, seq_len=64, batch=8, micro_batch=4, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=4,
             eval_windows=4, ckpt_every=5, ft_steps=4, ft_batch=2, ft_prompt=16, ft_completion=16, capture_rows=2,
             capture_seq=64)
#: What a checkpoint must agree on to be resumed.
RESUME_KEYS = ("impl", "seed", *convergence_report.SAME_SETTINGS)
#: For the estimates: H100 SXM dense bf16 peak and the share of it assumed for an eager HF model of this size
#: (--plan also prints the time at LOW_MFU).
H100_BF16_TFLOPS = 989.0
ASSUMED_MFU = 0.30
LOW_MFU = 0.20
VERSIONS = ("torch", "transformers", "trl", "accelerate", "liger-kernel", "cut-cross-entropy", "tokenizers", "triton")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Settings


def settings(args) -> dict:
    """The run's settings: DEFAULTS, QUICK's under --quick, then the explicit options."""
    s = dict(DEFAULTS)
    if args.quick:
        s.update(QUICK)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if s["batch"] % s["micro_batch"]:
        raise SystemExit(f"--batch {s['batch']} is not a multiple of --micro-batch {s['micro_batch']}")
    s["device"] = args.device or ("cpu" if args.quick else "cuda")
    s["dtype"] = args.dtype or ("float32" if s["device"] == "cpu" else "bfloat16")
    s["model"] = dict(QUICK_MODEL if args.quick else MODEL)
    s["quick"] = bool(args.quick)
    s["work"] = str(args.work)
    return s


def model_config(s: dict, vocab: int) -> dict:
    return {**s["model"], "vocab_size": vocab}


def count_params(cfg: dict) -> dict:
    """Parameter counts of a Qwen3 config (``embedding``, ``head``, ``body``, ``total``)."""
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    attn = d * q + 2 * d * kv + q * d + 2 * cfg["head_dim"]  # q, k, v, o, q_norm, k_norm
    layer = attn + 3 * d * f + 2 * d
    emb = cfg["vocab_size"] * d
    head = 0 if cfg.get("tie_word_embeddings") else emb
    body = layers * layer + d
    return {"embedding": emb, "head": head, "body": body, "total": emb + head + body}


def step_flops(s: dict, vocab: int) -> float:
    """Training FLOPs of one step: 6 x (body + head) parameters x tokens, plus causal attention (fwd + bwd)."""
    cfg = model_config(s, vocab)
    p = count_params(cfg)
    tokens = s["batch"] * s["seq_len"]
    matmul = 6 * (p["body"] + cfg["vocab_size"] * cfg["hidden_size"]) * tokens
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    attn = 3 * 2 * 2 * cfg["num_hidden_layers"] * q * s["seq_len"] * tokens / 2  # QK^T and PV, causal half, x3
    return matmul + attn


def estimate_run_s(s: dict, vocab: int, tflops: float = H100_BF16_TFLOPS * ASSUMED_MFU) -> float:
    """Estimated wall seconds of one pretraining run at ``tflops`` achieved (plus the held-out evaluations)."""
    per_step = step_flops(s, vocab) / (tflops * 1e12)
    evals = s["steps"] // s["eval_every"] + 1
    eval_s = evals * per_step / 3 * s["eval_windows"] / s["batch"]  # a forward is a third of a step
    return s["steps"] * per_step + eval_s


# ---------------------------------------------------------------------------------------------------------------------
# Loss heads


def head_loss_fn(impl: str, device: str):
    """``fn(model, ids [B, S]) -> mean next-token cross-entropy`` (a [] float32 tensor) of one loss head."""
    head = head_fn(impl, device)

    def loss(model, ids):
        return head(model, model.model(input_ids=ids).last_hidden_state, ids)
    return loss


def head_fn(impl: str, device: str):
    """``fn(model, hidden [B, S, D], ids [B, S]) -> mean next-token cross-entropy`` of one loss head, from the body's
    final hidden states (`heldout_losses` runs two heads on one body forward)."""
    import torch

    if impl == "full":
        def full(model, h, ids):
            logits = model.lm_head(h)  # under autocast: bf16 [B, S, V], as the model computes it
            return model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)
        return full

    def operands(model, h, ids):
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
        # the same bf16 operands autocast gives lm_head: the hidden states and the weight cast once
        return h[:, :-1].to(dtype).contiguous(), model.lm_head.weight.to(dtype), ids[:, 1:].contiguous()

    def no_autocast(fn):
        """The fused head on its explicit operands, with autocast off (it would recast the head's own fp32 math)."""
        def wrapped(model, h, ids):
            h, w, y = operands(model, h, ids)
            with torch.autocast(device_type=h.device.type, enabled=False):
                return fn(h, w, y)
        return wrapped

    if impl == "full-fp32":
        def full_fp32(h, w, y):
            # The same bf16 operands, the logits kept in fp32: their products are exact in fp32 (and in the TF32 the
            # runs allow, whose 10 mantissa bits hold bf16's 7), so the logits and the loss are ``full``'s without
            # its bf16 rounding of the [tokens, V] logits: what an exact head computes. (The backward GEMMs take the
            # fp32 dL/dz in TF32, 10 mantissa bits, finer than the bf16 operand an exact fused head uses.)
            logits = torch.nn.functional.linear(h.float(), w.float())
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        return no_autocast(full_fp32)
    if impl == "ours":
        import align_losses

        def ours(h, w, y):
            return -align_losses.linear_logprobs(h, w, y, impl="auto").mean()
        return no_autocast(ours)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        kwargs = {} if device.startswith("cuda") else {"impl": "torch_compile"}

        def cce(h, w, y):
            return linear_cross_entropy(h, w, y, **kwargs).float()
        return no_autocast(cce)
    if impl == "liger":
        if not device.startswith("cuda"):
            raise RuntimeError("Liger's fused linear cross-entropy runs on CUDA only")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()

        def liger(model, h, ids):
            # Liger's AMP path, as its patched models run: the fp32 head weight under autocast, which casts the
            # GEMM operands to the same bf16 ones as the others get. Its weight-gradient accumulator takes the
            # weight's dtype, so this keeps it fp32 (a bf16 weight would accumulate the gradient in bf16).
            h = h[:, :-1]
            out = loss(model.lm_head.weight, h.reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1))
            return (out[0] if isinstance(out, tuple) else out).float()
        return liger
    raise ValueError(f"unknown loss head {impl!r}")


class _Choices(logging.Handler):
    """Collects align_losses' messages about what ``impl="auto"`` chose (it logs a choice once per process and kind
    of input, so one handler serves every run of the process)."""

    seen: list = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def backend_choices() -> list:
    """The messages about what ``impl="auto"`` chose in this process so far and from now on (a live list)."""
    logger = logging.getLogger("align_losses")
    if not any(isinstance(h, _Choices) for h in logger.handlers):
        logger.setLevel(logging.INFO)
        logger.addHandler(_Choices())
    return _Choices.seen


def head_info(impl: str, device: str) -> str:
    return {
        "full": "model.lm_head + model.loss_function (logits in the autocast dtype, fp32 cross-entropy)",
        "full-fp32": "full logits in fp32 from the same bf16 operands (exact products, fp32 accumulation; TF32 "
                     "backward GEMMs), fp32 cross-entropy",
        "ours": "align_losses.linear_logprobs(impl='auto')",
        "cce": "cut_cross_entropy.linear_cross_entropy, defaults" + ("" if device.startswith("cuda") else
                                                                     " but impl='torch_compile' (CPU)"),
        "liger": "liger_kernel LigerFusedLinearCrossEntropyLoss, defaults, fp32 head weight under autocast (its AMP "
                 "path: fp32 weight-gradient accumulation)",
    }[impl]


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining


def lr_at(step: int, s: dict) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine down to ``min_lr`` at ``steps``."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    t = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["min_lr"] + 0.5 * (s["lr"] - s["min_lr"]) * (1 + math.cos(math.pi * min(t, 1.0)))


def build_model(s: dict, vocab: int, seed: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**model_config(s, vocab), use_cache=False)
    torch.manual_seed(seed)
    attn = "sdpa"
    model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    return model.to(s["device"]).train()


def make_optimizer(model, s: dict):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    kwargs = dict(lr=s["lr"], betas=(0.9, 0.95), eps=1e-8)
    if s["device"].startswith("cuda"):
        kwargs["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                              {"params": other, "weight_decay": 0.0}], **kwargs)


def autocast(s: dict):
    import contextlib

    import torch

    if s["dtype"] == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if s["device"].startswith("cuda") else "cpu",
                          dtype=getattr(torch, s["dtype"]))


def heldout_losses(model, windows, s: dict) -> tuple[float, float]:
    """Mean next-token losses over the held-out windows, the same evaluators for every run, from one body forward:
    the model's own full-logits loss (bf16 logits under autocast) and the same with the logits kept in fp32."""
    import torch

    heads = [head_fn(impl, s["device"]) for impl in ("full", "full-fp32")]
    was = model.training
    model.eval()
    totals, n = [0.0, 0.0], 0
    with torch.no_grad(), autocast(s):
        for i in range(0, windows.shape[0], s["micro_batch"]):
            ids = torch.as_tensor(windows[i: i + s["micro_batch"]], device=s["device"])
            h = model.model(input_ids=ids).last_hidden_state
            for k, head in enumerate(heads):
                totals[k] += float(head(model, h, ids)) * ids.shape[0]
            n += ids.shape[0]
    model.train(was)
    return totals[0] / n, totals[1] / n


def run_paths(name: str, s: dict) -> dict:
    base = Path(s["work"]) / ("quick" if s["quick"] else "full")
    return {"dir": base / name, "ckpt": base / name / "ckpt.pt", "final": base / name / "final.pt"}


def weights_sha(state: dict) -> str:
    """sha256 of a state dict's names and tensor bytes: which trained weights a finetune or a capture started from
    (GPU training is not bit-reproducible, so two sessions' runs of one name are two models)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        t = t.contiguous().reshape(-1)  # 1-D: a 0-d tensor has no byte view
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> float:
    import torch

    t0 = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return time.time() - t0


def setup(device: str):
    """Quiet transformers (and datasets where it is installed: the pretraining runs do not need it); returns torch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import torch
    import transformers

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --quick or --device cpu)")
    transformers.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    # FutureWarnings only (deprecations): a UserWarning, such as SDPA falling back to its math kernel, stays visible
    warnings.filterwarnings("ignore", category=FutureWarning)
    return torch


def meta_for(args, s: dict) -> dict:
    return _common.run_meta(args.commit, _common.device_name(s["device"]), _common.versions(VERSIONS),
                            _common.command_line(__file__, args.argv))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def corpus_dir(args) -> Path:
    return args.corpus or (Path(args.work) / ("corpus-quick" if args.quick else "corpus"))


def train_run(name: str, args) -> int:
    """One pretraining run, from its checkpoint if there is one; stops at ``--time-limit`` with a checkpoint."""
    import numpy as np
    import torch

    t_start = time.time()
    s = settings(args)
    impl, seed = RUNS[name]
    corpus = corpus_mod.Corpus(corpus_dir(args))
    vocab = corpus.vocab_size
    s.update(impl=impl, seed=seed)
    paths = run_paths(name, s)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    results = Path(args.results) / f"convergence-run-{name}{'-quick' if s['quick'] else ''}.json"
    setup(s["device"])
    if s["device"].startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loss_fn = head_loss_fn(impl, s["device"])
    choices = backend_choices()

    model = build_model(s, vocab, seed)
    opt = make_optimizer(model, s)
    params = count_params(model_config(s, vocab))
    assert params["total"] == sum(p.numel() for p in model.parameters()), "count_params disagrees with the model"
    history = {"step": [], "loss": [], "grad_norm": [], "lr": [], "step_ms": [], "heldout_step": [],
               "heldout_loss": [], "heldout_loss_fp32": []}
    segments = []
    start = 0
    if args.restart:
        for key in ("final", "ckpt"):
            paths[key].unlink(missing_ok=True)
    if paths["final"].exists():
        done = torch.load(paths["final"], map_location="cpu", weights_only=False)
        diff = {k: (done["settings"].get(k), s.get(k)) for k in RESUME_KEYS if done["settings"].get(k) != s.get(k)}
        if diff or done["corpus"] != corpus.fingerprint:
            raise SystemExit(f"{paths['final']} was made with other settings {diff} or another corpus; --restart "
                             "starts over")
        log(f"{name}: already done ({paths['final']}); --restart runs it again")
        return 0
    if paths["ckpt"].exists():
        ck = torch.load(paths["ckpt"], map_location=s["device"], weights_only=False)
        diff = {k: (ck["settings"].get(k), s.get(k)) for k in RESUME_KEYS if ck["settings"].get(k) != s.get(k)}
        if diff or ck["corpus"] != corpus.fingerprint:
            raise SystemExit(f"{paths['ckpt']} was made with other settings {diff} or another corpus "
                             f"({ck['corpus'].get('train_sha256', '?')[:12]}); --restart starts over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        history, segments, start = ck["history"], ck["segments"], ck["step"]
        if len(history.setdefault("heldout_loss_fp32", [])) != len(history["heldout_loss"]):
            raise SystemExit(f"{paths['ckpt']} has no fp32 held-out curve (an older version's checkpoint); --restart "
                             "starts over")
        log(f"{name}: resumed at step {start} from {paths['ckpt']}")
    meta = meta_for(args, s)
    segment = {"from_step": start, "to_step": start, "date": meta["date"], "commit": meta["commit"],
               "device": meta["device"], "wall_s": 0.0}
    segments.append(segment)
    windows = corpus.heldout_windows(s["eval_windows"], s["seq_len"])
    est = estimate_run_s(s, vocab)
    log(f"{name}: {head_info(impl, s['device'])}; init seed {seed}, data seed {s['data_seed']}; "
        f"{params['total'] / 1e6:.1f}M parameters ({params['body'] / 1e6:.1f}M body); {s['steps']} steps of "
        f"{s['batch']} x {s['seq_len']} tokens = {corpus.epochs(s['steps'], s['batch'], s['seq_len']):.2f} epochs of "
        f"{corpus.train.size:,} training tokens; estimate {est / 60:.1f} min on an H100 at {ASSUMED_MFU:.0%} of its "
        f"bf16 peak (the measured ETA follows)")

    def record(status: str) -> None:
        out = {
            "kind": "pretrain", "run": name, "impl": impl, "head": head_info(impl, s["device"]), "seed": seed,
            "status": status, "steps_done": len(history["step"]), "settings": s, "params": params,
            "corpus": corpus.fingerprint, "corpus_dir": str(corpus.folder), **meta, "segments": segments,
            "estimate_h100_s": est, "backend_choices": choices, "weights_sha256": segment.get("weights_sha256"),
            "history": history,
        }
        write_json(results, out)

    accum = s["batch"] // s["micro_batch"]

    def out_of_time(need: float) -> bool:
        """Whether another step (``need`` seconds with the checkpoint) would pass --time-limit or --deadline."""
        now = time.time()
        return bool((args.time_limit and now - t_start + need > args.time_limit)
                    or (args.deadline and now + need > args.deadline))

    def evaluate(at: int) -> None:
        """Both held-out losses at step ``at``: the bf16-logits one (the model's own) and the fp32-logits one."""
        history["heldout_step"].append(at)
        own, fp32 = heldout_losses(model, windows, s)
        history["heldout_loss"].append(own)
        history["heldout_loss_fp32"].append(fp32)

    if start == 0 and not history["heldout_step"]:
        evaluate(0)
        log(f"{name}: step 0 held-out loss {history['heldout_loss'][-1]:.4f}")
    save_s = 0.0
    step = start
    status = "running"
    while step < s["steps"]:
        lr = lr_at(step, s)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = corpus.batch(step, s["batch"], s["seq_len"], s["data_seed"])
        _common.sync(s["device"])
        t0 = time.perf_counter()
        total = torch.zeros((), device=s["device"])
        for m in range(accum):
            ids = torch.as_tensor(batch[m * s["micro_batch"]: (m + 1) * s["micro_batch"]], device=s["device"])
            with autocast(s):
                loss = loss_fn(model, ids)
            (loss / accum).backward()
            total += loss.detach().float()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        _common.sync(s["device"])
        ms = (time.perf_counter() - t0) * 1e3
        step += 1
        loss_value = float(total) / accum
        if not math.isfinite(loss_value):
            status = f"diverged at step {step}"
        history["step"].append(step)
        history["loss"].append(loss_value)
        history["grad_norm"].append(float(gnorm))
        history["lr"].append(lr)
        history["step_ms"].append(ms)
        segment["to_step"] = step
        segment["wall_s"] = time.time() - t_start
        if step % s["eval_every"] == 0 or step == s["steps"]:
            evaluate(step)
            done = step - start
            per = statistics.median(history["step_ms"][-min(done, 50):]) / 1e3
            log(f"{name}: step {step}/{s['steps']} loss {loss_value:.4f} held-out {history['heldout_loss'][-1]:.4f} "
                f"(fp32 logits {history['heldout_loss_fp32'][-1]:.4f}) grad norm {float(gnorm):.3f} lr {lr:.2e}; {ms:.0f} ms/step, ETA {(s['steps'] - step) * per / 60:.1f} min")
            record(status)
        if status != "running":
            break
        need = 2 * (ms / 1e3) + max(save_s, 5.0) + 10.0
        if step < s["steps"] and (step % s["ckpt_every"] == 0 or out_of_time(need)):
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
                     "segments": segments, "settings": s, "corpus": corpus.fingerprint}
            save_s = save_checkpoint(paths["ckpt"], state)
            record(status)
            if out_of_time(need) and step < s["steps"]:
                log(f"{name}: stopped at step {step}/{s['steps']} for --time-limit {args.time_limit}s / --deadline "
                    f"{args.deadline} (checkpoint {save_s:.0f}s); the same command resumes")
                return 0
    if status == "running":
        status = "done"
        weights = weights_sha(model.state_dict())
        save_checkpoint(paths["final"], {"model": model.state_dict(), "config": model_config(s, vocab), "settings": s,
                                         "corpus": corpus.fingerprint, "step": step, "weights_sha256": weights,
                                         "date": meta["date"], "commit": meta["commit"], "device": meta["device"]})
        segment["weights_sha256"] = weights
        if paths["ckpt"].exists():
            paths["ckpt"].unlink()  # the optimizer state is not needed any more (1.6 GB)
    segment["wall_s"] = time.time() - t_start
    record(status)
    steady = history["step_ms"][min(len(history["step_ms"]) - 1, 5):]
    log(f"{name}: {status} at step {step}; median step {statistics.median(steady):.0f} ms; wrote {results}")
    _ = np  # numpy is the corpus' dependency; imported here for the memmaps
    return 0 if status == "done" else 1


# ---------------------------------------------------------------------------------------------------------------------
# Base model (for the fine-tuning runs and the capture)


def load_base(args, s: dict):
    """The final checkpoint of ``--base`` as a Qwen3ForCausalLM (fp32) and its corpus."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = run_paths(args.base, s)["final"]
    if not path.exists():
        raise SystemExit(f"no final checkpoint {path}: run `--run {args.base}` to the end first")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    corpus = corpus_mod.Corpus(corpus_dir(args))
    if ck["corpus"] != corpus.fingerprint:
        raise SystemExit(f"{path} was trained on another corpus than {corpus.folder}")
    model = Qwen3ForCausalLM._from_config(Qwen3Config(**ck["config"], use_cache=False), dtype=torch.float32,
                                          attn_implementation="sdpa")
    model.load_state_dict(ck["model"])
    if not ck.get("weights_sha256"):  # a final checkpoint from before the hash was stored
        ck["weights_sha256"] = weights_sha(ck["model"])
    return model, corpus, ck


def base_meta(args, ck: dict) -> dict:
    """Which trained weights a finetune or capture started from: the base run's name, step, weights and session."""
    return {"base": args.base, "base_step": ck["step"], "base_weights_sha256": ck["weights_sha256"],
            "base_session": {k: ck.get(k) for k in ("date", "commit", "device")}}


# ---------------------------------------------------------------------------------------------------------------------
# DPO / SFT continuation


def preference_pairs(corpus, s: dict, count: int, seed: int) -> list[dict]:
    """``count`` (prompt, chosen, rejected) texts from held-out files: consecutive windows of prompt + completion
    tokens of each file; chosen the real completion, rejected the same with ``ft_corrupt`` of its tokens replaced
    by tokens from random places of the held-out stream. Decoded with the corpus tokenizer."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus.folder / "tokenizer.json"))
    P, C = s["ft_prompt"], s["ft_completion"]
    rng = np.random.default_rng(seed)
    pool = np.asarray(corpus.heldout)
    eos = corpus.manifest["eos_id"]
    pool = pool[pool != eos]
    windows = []
    for doc in corpus.heldout_documents(P + C, 1 << 30):
        for start in range(0, doc.size - (P + C) + 1, P + C):
            windows.append(doc[start: start + P + C])
    if not windows:
        raise SystemExit(f"no held-out file has {P + C} tokens")
    pairs = []
    for i in range(count):
        w = windows[i % len(windows)]
        chosen = w[P:].copy()
        rejected = chosen.copy()
        k = max(1, int(round(s["ft_corrupt"] * C)))
        where = rng.choice(C, size=k, replace=False)
        rejected[where] = pool[rng.integers(0, pool.size, size=k)]
        pairs.append({"prompt": tok.decode(w[:P].tolist()), "chosen": tok.decode(chosen.tolist()),
                      "rejected": tok.decode(rejected.tolist())})
    return pairs, len(windows)


def step_timer():
    """A TrainerCallback recording each step's wall time (GPU synchronised at both ends)."""
    from transformers import TrainerCallback

    import torch

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append((time.perf_counter() - self._t) * 1e3)

    return Timer()


def finetune(name: str, args) -> int:
    """One DPO or SFT continuation of the base checkpoint with TRL's trainer or ours; logs every step."""
    import tempfile

    import datasets
    import trl

    s = settings(args)
    setup(s["device"])
    model, corpus, ck = load_base(args, s)
    model.to(s["device"])
    tok = corpus_mod.load_hf_tokenizer(corpus.folder)
    pairs, n_windows = preference_pairs(corpus, s, s["ft_steps"] * s["ft_batch"], s["data_seed"])
    dpo = name.endswith("dpo")
    if dpo:
        data = datasets.Dataset.from_list(pairs)
    else:
        data = datasets.Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    out_dir = tempfile.mkdtemp(prefix=f"convergence-{name}-")
    common = dict(output_dir=out_dir, max_steps=s["ft_steps"], per_device_train_batch_size=s["ft_batch"],
                  gradient_accumulation_steps=1, learning_rate=s["ft_lr"], lr_scheduler_type="constant",
                  warmup_steps=0, optim="adamw_torch", bf16=s["dtype"] == "bfloat16", use_cpu=s["device"] == "cpu",
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=s["data_seed"],
                  dataloader_num_workers=0, max_length=s["ft_prompt"] + s["ft_completion"] + 32)
    if name == "trl-dpo":
        cls, config = trl.DPOTrainer, trl.DPOConfig(**common, beta=s["ft_beta"], precompute_ref_log_probs=False)
    elif name == "fused-dpo":
        from trainers import FusedDPOConfig, FusedDPOTrainer

        cls, config = FusedDPOTrainer, FusedDPOConfig(**common, beta=s["ft_beta"], precompute_ref_log_probs=False,
                                                      lce_impl="auto")
    elif name == "trl-sft":
        cls, config = trl.SFTTrainer, trl.SFTConfig(**common, label_smoothing_factor=s["ft_smoothing"])
    elif name == "fused-sft":
        from trainers import FusedSFTConfig, FusedSFTTrainer

        cls, config = FusedSFTTrainer, FusedSFTConfig(**common, label_smoothing_factor=s["ft_smoothing"],
                                                      lce_impl="auto")
    else:
        raise ValueError(name)
    meta = meta_for(args, s)
    timer = step_timer()
    t0 = time.time()
    kwargs = dict(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[timer])
    if dpo:
        import copy

        kwargs["ref_model"] = copy.deepcopy(model).eval()  # the frozen base: TRL would load it from a hub name
    trainer = cls(**kwargs)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    keys = sorted({k for e in logs for k, v in e.items() if isinstance(v, (int, float))})
    curves = {k: [e.get(k) for e in logs] for k in keys}
    out = {"kind": "finetune", "run": name, "trainer": FINETUNES[name], "algo": "dpo" if dpo else "sft",
           "settings": s, **base_meta(args, ck), "corpus": corpus.fingerprint,
           "pairs": len(pairs), "heldout_windows": n_windows, **meta, "wall_s": time.time() - t0,
           "step_ms": timer.times, "curves": curves}
    path = Path(args.results) / f"convergence-finetune-{name}{'-quick' if s['quick'] else ''}.json"
    write_json(path, out)
    last = {k: curves[k][-1] for k in ("loss", "rewards/accuracies", "rewards/margins", "mean_token_accuracy")
            if k in curves}
    log(f"{name}: {len(logs)} steps in {time.time() - t0:.0f}s; last {last}; wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Capture


def capture(args) -> int:
    """Final hidden states (bf16, after the last norm), next-token labels and the bf16 head weight of the base."""
    import torch

    s = settings(args)
    setup(s["device"])
    model, corpus, ck = load_base(args, s)
    model.to(s["device"]).eval()
    rows, seq = s["capture_rows"], s["capture_seq"]
    if seq > ck["settings"]["seq_len"]:
        raise SystemExit(f"--capture-seq {seq} is longer than the {ck['settings']['seq_len']} tokens {args.base} was "
                         "trained on: positions past it are not the trained model's distributions")
    windows = torch.as_tensor(corpus.heldout_windows(rows, seq + 1), device=s["device"])
    if windows.shape[0] < rows:
        raise SystemExit(f"the held-out stream has only {windows.shape[0]} windows of {seq + 1} tokens")
    with torch.no_grad(), autocast(s):
        h = model.model(input_ids=windows[:, :-1]).last_hidden_state
    out = {
        "hidden": h.to(torch.bfloat16).cpu(),
        "weight": model.lm_head.weight.detach().to(torch.bfloat16).cpu(),
        "labels": windows[:, 1:].cpu(),
        "meta": {**base_meta(args, ck), "step": ck["step"], "corpus": corpus.fingerprint, "rows": rows, "seq": seq,
                 **meta_for(args, s)},
    }
    path = Path(args.capture_out or (Path(args.work) / ("captured-quick.pt" if s["quick"] else "captured.pt")))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    log(f"captured hidden {tuple(out['hidden'].shape)}, weight {tuple(out['weight'].shape)} of {args.base} step "
        f"{ck['step']} into {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Plan


def plan(args) -> int:
    s = settings(args)
    vocab = s["model"].get("vocab_size")
    try:
        corpus = corpus_mod.Corpus(corpus_dir(args))
        vocab, tokens = corpus.vocab_size, corpus.train.size
    except FileNotFoundError:
        corpus, tokens = None, None
    vocab = vocab or (1024 if s["quick"] else 32768)
    p = count_params(model_config(s, vocab))
    est = estimate_run_s(s, vocab)
    tps = H100_BF16_TFLOPS * ASSUMED_MFU
    print(f"model: {p['total'] / 1e6:.1f}M parameters ({p['body'] / 1e6:.1f}M body, {p['head'] / 1e6:.1f}M head, "
          f"{p['embedding'] / 1e6:.1f}M embedding), vocabulary {vocab}")
    print(f"step: {s['batch']} x {s['seq_len']} = {s['batch'] * s['seq_len']:,} tokens, {step_flops(s, vocab) / 1e12:.1f} "
          f"TFLOP; {s['steps']} steps" + (f" = {s['steps'] * s['batch'] * s['seq_len'] / tokens:.2f} epochs of "
                                          f"{tokens:,} training tokens" if tokens else " (no corpus built yet)"))
    low = estimate_run_s(s, vocab, H100_BF16_TFLOPS * LOW_MFU)
    print(f"estimate per pretraining run on an H100: {est / 60:.1f} min at {tps:.0f} TFLOP/s "
          f"({ASSUMED_MFU:.0%} of {H100_BF16_TFLOPS:.0f}), {low / 60:.1f} min at {LOW_MFU:.0%}; --time-limit "
          f"{args.time_limit:.0f}s per call -> {math.ceil(est / max(args.time_limit - 30, 1))} to "
          f"{math.ceil(low / max(args.time_limit - 30, 1))} call(s) per run")
    q = " --quick" if s["quick"] else ""
    print("commands (each under 10 minutes; repeat a --run command until it says done):")
    print(f"  python benchmarks/corpus.py build{q}")
    for name in RUNS:
        print(f"  python benchmarks/convergence.py{q} --run {name} --results $OUT")
    for name in FINETUNES:
        print(f"  python benchmarks/convergence.py{q} --finetune {name} --results $OUT")
    print(f"  python benchmarks/convergence.py{q} --capture")
    print(f"  python benchmarks/head.py --captured {Path(args.work) / ('captured-quick.pt' if s['quick'] else 'captured.pt')} "
          "--name head-captured --out $OUT")
    print(f"  python benchmarks/convergence.py{q} --report --results DIR_WITH_THE_RUN_FILES")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = _common.doc_parser(__doc__, epilog=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", choices=list(RUNS), help="one pretraining run (resumes from its checkpoint)")
    what.add_argument("--finetune", choices=list(FINETUNES), help="one DPO / SFT continuation of --base")
    what.add_argument("--capture", action="store_true", help="capture --base's hidden states and head for head.py")
    what.add_argument("--report", action="store_true", help="merge the run files of --results into convergence-latest")
    what.add_argument("--plan", action="store_true", help="print the commands and the estimated wall times")
    p.add_argument("--quick", action="store_true", help="tiny model and corpus (benchmarks/corpus.py build --quick), CPU")
    p.add_argument("--work", type=Path, default=WORK_DIR,
                   help="work folder: corpus, checkpoints, capture (default runs/convergence, git-ignored; "
                        "$CONVERGENCE_WORK)")
    p.add_argument("--corpus", type=Path, help="corpus folder (default WORK/corpus, --quick: WORK/corpus-quick)")
    p.add_argument("--results", default=None,
                   help="folder of the run files (default benchmarks/results/convergence-runs, --quick: "
                        "WORK/results-quick; on the GPU machine $OUT)")
    p.add_argument("--base", default="full-seed0", choices=list(RUNS), help="the checkpoint --finetune/--capture start from")
    p.add_argument("--capture-out", help="file of --capture (default runs/convergence/captured.pt)")
    p.add_argument("--time-limit", type=float, default=540.0,
                   help="seconds after which a --run checkpoints and stops (0: none; default 540)")
    p.add_argument("--deadline", type=float, default=float(os.environ.get("CONVERGENCE_DEADLINE") or 0),
                   help="unix time by which a --run checkpoints and stops (default $CONVERGENCE_DEADLINE; 0: none): "
                        "set it at the start of a call, e.g. $(($(date +%%s)+560)), so the work before the run counts")
    p.add_argument("--restart", action="store_true", help="--run: delete the run's checkpoint and final weights, start over")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default cuda (--quick: cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="autocast dtype (default bfloat16; CPU float32)")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    _common.add_output_args(p, "report file stem (default convergence-latest; --quick: convergence-quick)")
    _common.add_commit_arg(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    # --quick's files stay in the work folder: CPU smoke-test figures are not results
    quick_dir = Path(args.work) / "results-quick"
    args.results = args.results or str(quick_dir if args.quick else RUNS_RESULTS)
    if args.quick and args.out == str(RESULTS_DIR):
        args.out = str(quick_dir)
    if args.plan:
        return plan(args)
    if args.report:
        return convergence_report.report(args)
    try:
        if args.run:
            return train_run(args.run, args)
        if args.finetune:
            return finetune(args.finetune, args)
        return capture(args)
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
