"""What the benchmark scripts ``benchmarks/{head,score,train_steps}.py`` share: the model configs and the model
they build, the run's metadata (date, commit, device, versions, command) and its markdown header, the common
options, the torch/transformers set-up, and the JSON + markdown outputs.

A script imports it after putting its own folder on ``sys.path`` (so it works as ``python benchmarks/X.py``
from anywhere, with or without the checkout on ``PYTHONPATH``); importing it puts the checkout on ``sys.path``
too, so the scripts run from a checkout without installing the package.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run from a checkout without installing

GiB = 1024**3
TOKENIZER_DIR = os.path.join(REPO, "examples", "tokenizer")
RESULTS_DIR = os.path.join(HERE, "results")

#: Qwen3-1.7B (config.json of Qwen/Qwen3-1.7B)
QWEN3_1_7B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=True,
)
#: Qwen3-8B (config.json of Qwen/Qwen3-8B): the head is not tied to the embeddings.
QWEN3_8B = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=False,
)
#: A tiny Qwen3-shaped model for ``--quick`` (CPU smoke tests).
QUICK_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=4096,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
#: The model shapes a benchmark's ``--model`` names: name -> (what ``model_desc`` calls it, config kwargs).
MODELS = {
    "qwen3-1.7b": ("Qwen3-1.7B-shaped", QWEN3_1_7B),
    "qwen3-8b": ("Qwen3-8B-shaped", QWEN3_8B),
    "tiny": ("tiny Qwen3-shaped", QUICK_MODEL),
}
#: The config keys a run's ``model_desc`` lists.
MODEL_DESC_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "intermediate_size", "vocab_size", "tie_word_embeddings")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Run metadata


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: str, cores: bool = True) -> str:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / GiB:.0f} GiB, sm_{props.major}{props.minor})"
    name = f"CPU {platform.processor() or platform.machine()}"
    return f"{name} ({os.cpu_count()} cores)" if cores else name


def versions(dists, cuda: bool = True) -> dict:
    """``{dist: version}`` of the installed ``dists`` (missing ones left out); ``cuda``: torch's CUDA version
    when it has one."""
    import importlib.metadata as md

    out = {}
    for name in dists:
        try:
            out[name] = md.version(name)
        except Exception:
            pass
    if cuda:
        try:
            import torch

            if torch.version.cuda:
                out["cuda"] = torch.version.cuda
        except Exception:
            pass
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line(script: str, argv=None) -> str:
    """``python benchmarks/X.py ARGS`` of this run (``argv``: main's, else ``sys.argv[1:]``)."""
    return "python " + " ".join([os.path.relpath(script, REPO)] + (sys.argv[1:] if argv is None else list(argv)))


def run_meta(commit, device: str, versions: dict, command: str, **more) -> dict:
    """The run's ``date``/``commit``/``device``/``versions``/``command`` (and ``more``)."""
    return {
        "date": utc_now(),
        "commit": commit or git_commit(),
        "device": device,
        "versions": versions,
        "command": command,
        **more,
    }


def row_meta(meta: dict) -> dict:
    """What every result row repeats of the run's metadata."""
    return {k: meta[k] for k in ("date", "commit", "device")}


def meta_lines(meta: dict) -> list:
    """The markdown header's bullets: date, commit, device, versions, command (and model, where it has one)."""
    lines = [
        f"- date: {meta.get('date')}",
        f"- commit: {meta.get('commit')}",
        f"- device: {meta.get('device')}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted((meta.get('versions') or {}).items()))}",
        f"- command: `{meta.get('command', '')}`",
    ]
    if "model_desc" in meta:
        lines.append(f"- model: {meta['model_desc']}")
    return lines


def model_desc(model_kwargs: dict, quick: bool, suffix: str) -> str:
    """The model line of a run: the shape's name in `MODELS` (``--quick`` marked), its main config values, ``suffix``."""
    title = next((t for t, kwargs in MODELS.values() if kwargs == model_kwargs), "Qwen3-shaped")
    return (title + (" (--quick) " if quick else " ")
            + ", ".join(f"{k}={v}" for k, v in model_kwargs.items() if k in MODEL_DESC_KEYS) + suffix)


# ---------------------------------------------------------------------------------------------------------------------
# Options and set-up


def doc_parser(doc: str, epilog: bool = True) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph (the rest, the epilog)."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n\n", 1)[1] if epilog else None)


def add_output_args(p: argparse.ArgumentParser, name_help: str, name_default=None) -> None:
    p.add_argument("--out", default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    p.add_argument("--name", default=name_default, help=name_help)


def add_commit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--commit", default=os.environ.get("ALIGN_LOSSES_COMMIT"),
                   help="git commit to record (default $ALIGN_LOSSES_COMMIT, else git rev-parse)")


def add_run_args(p: argparse.ArgumentParser, quick_help: str, name_help: str) -> None:
    """``--seed --device --quick --out --name --commit`` of the model benchmarks (score, train_steps)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default cuda (cpu with --quick)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    add_output_args(p, name_help)
    add_commit_arg(p)


def resolve_device_dtype(args) -> None:
    """``--device`` defaults to cuda (cpu with ``--quick``), ``--dtype`` to bfloat16 (float32 on CPU)."""
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")  # CPU bf16 autocast is slow


def setup_torch(device: str):
    """Import torch (exit when CUDA is asked for and missing), quiet datasets/transformers; returns torch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --quick or --device cpu)")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return torch


# ---------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, device


def build_model(model_kwargs: dict, device: str, dtype, seed: int, attn: str, train: bool = False):
    """A randomly initialised ``Qwen3ForCausalLM`` (seeded) built on ``device``: in train mode, or in eval mode
    with no parameter needing grad."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**model_kwargs, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model.to(device)
    if train:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def load_tokenizer():
    """The shipped tokenizer (``examples/tokenizer``), with no length warning (nothing is truncated here)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.model_max_length = 10**9
    return tok


def sync(device: str) -> None:
    """Wait for ``device`` (``cuda``: the current GPU, ``cuda:N``: that one; nothing to wait for on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_memory(device: str):
    """gc, then (CUDA) empty the cache; returns the GiB still allocated (None on CPU)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / GiB
    return None


def is_oom(exc) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------------------------------
# Output


def fmt(x, spec, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:{spec}}{unit}"


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_outputs(rows: list, meta: dict, args, render) -> dict:
    """``{args.out}/{args.name}.json`` (the rows) and ``.md`` (``render(rows, meta)``); returns their paths
    ``{"json": ..., "md": ...}``."""
    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f"{args.name}.{k}") for k in ("json", "md")}
    with open(paths["json"], "w") as f:
        json.dump(rows, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(render(rows, meta))
    return paths
