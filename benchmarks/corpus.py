"""A real-text corpus that exists on every machine with our dependencies: the Python sources (code, comments and
docstrings) of a fixed list of installed packages, a byte-level BPE tokenizer trained on it, the token stream
and its loader. One command builds it all, deterministically for a given set of installed versions:

    python benchmarks/corpus.py build                       # -> runs/convergence/corpus (GPU machine: ~2-4 min)
    python benchmarks/corpus.py build --quick               # two small packages, vocab 1024 (CPU, seconds)
    python benchmarks/corpus.py info [--dir DIR]            # print the manifest

What is in it (``manifest.json`` records all of it):
- files: every ``*.py`` under each package of ``--packages`` (default `PACKAGES`: torch, transformers, numpy,
  pandas, sympy, networkx, jinja2, accelerate, pyarrow: installed on this checkout's machines, torch's own
  dependencies among them), sorted by package then relative path; files over ``--max-file-bytes`` (generated
  tables) and files that are not UTF-8 are left out and counted. A listed package that is missing stops the build
  (``--packages`` chooses another list); the versions found are recorded, since another version is another text.
- split: by directory (``--split dir``, the default; ``--quick``: by file), so that sibling files (a model's modeling/configuration/modular files) stay on one side: a
  file is held out when the first 8 hex digits of sha1("package/its directory", or of the file's key) modulo 1000 are below
  ``--heldout-permille`` (default 20, 2 %). Near-duplicate code across directories (transformers' "Copied from"
  models) still crosses the split: the held-out loss is that of text like the training text, not of new text.
- tokenizer: byte-level BPE (`tokenizers`: GPT-2 pre-tokenizer regex, no normalizer, no prefix space), vocabulary
  ``--vocab`` (default 32768) with ``<|endoftext|>`` as id 0, trained on the training files only (at most
  ``--tokenizer-bytes`` of them, every file in order until the budget is spent). Saved as ``tokenizer.json`` and as a
  transformers tokenizer folder (``hf_tokenizer/``: eos = pad = ``<|endoftext|>``) for the TRL trainers.
- token streams: ``train.bin`` and ``heldout.bin`` (uint16 if the vocabulary fits, else uint32), each file's tokens
  followed by ``<|endoftext|>``, in file order; ``sha256`` of each stream's bytes (and of the tokenizer file) in the
  manifest, so two machines (or two sessions) can be checked to train on the same tokens.

The loader, `Corpus`, cuts the training stream into non-overlapping windows of ``seq_len`` tokens and deals them out
in a fixed order (a permutation per epoch from ``data_seed``): the batch of step ``s`` depends on ``s`` alone, so a
run resumed from a checkpoint sees the same tokens as one that was not stopped. Held-out windows are spread evenly
over the held-out stream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: The work folder (checkpoints, corpus): ``runs/`` is git-ignored.
WORK_DIR = Path(os.environ.get("CONVERGENCE_WORK", REPO / "runs" / "convergence"))
DEFAULT_DIR = WORK_DIR / "corpus"

#: Installed on this checkout's CPU machine and the GPU machine (torch needs sympy, networkx and jinja2).
PACKAGES = ("torch", "transformers", "numpy", "pandas", "sympy", "networkx", "jinja2", "accelerate", "pyarrow")
QUICK_PACKAGES = ("jinja2", "accelerate")
EOS = "<|endoftext|>"
FORMAT = 1  # bump when what `build` writes changes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Files and split


def package_root(name: str) -> tuple[Path, str]:
    """(folder of an installed package, its version); SystemExit when it is not installed."""
    import importlib
    import importlib.metadata as md

    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"package {name!r} is not importable here ({type(exc).__name__}: {exc}); "
                         "choose others with --packages") from exc
    if getattr(mod, "__file__", None) is None:
        raise SystemExit(f"package {name!r} has no __file__")
    try:
        version = md.version(name)
    except Exception:  # noqa: BLE001
        version = str(getattr(mod, "__version__", "unknown"))
    return Path(mod.__file__).resolve().parent, version


def list_files(packages, max_file_bytes: int) -> tuple[list[tuple[str, Path]], dict, dict]:
    """``[(key "package/relative/path.py", absolute path)]`` sorted, the versions, and what was skipped."""
    files, versions, skipped = [], {}, {"too_large": 0, "not_utf8": 0, "empty": 0}
    for name in packages:
        root, versions[name] = package_root(name)
        for path in sorted(root.rglob("*.py")):
            if not path.is_file():
                continue
            if path.stat().st_size > max_file_bytes:
                skipped["too_large"] += 1
                continue
            files.append((f"{name}/{path.relative_to(root).as_posix()}", path))
    return files, versions, skipped


def read_text(path: Path):
    """The file's text with ``\\n`` line ends, or None when it is not UTF-8."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def is_heldout(key: str, permille: int, split: str = "dir") -> bool:
    """Held out by directory (``split="dir"``: sha1 of the key's folder) or by file (``"file"``: of the key itself):
    the hash's first 8 hex digits modulo 1000 below ``permille``."""
    unit = key.rsplit("/", 1)[0] if split == "dir" else key
    return int(hashlib.sha1(unit.encode()).hexdigest()[:8], 16) % 1000 < permille


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts, vocab: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the iterable ``texts``; ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf_tokenizer(tok, folder: Path) -> None:
    """The tokenizer as a transformers folder (eos = pad = ``<|endoftext|>``, no BOS), for the TRL trainers."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    hf.model_max_length = 1 << 30
    hf.save_pretrained(str(folder))


def load_hf_tokenizer(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(folder) / "hf_tokenizer"))
    tok.model_max_length = 1 << 30
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# Build


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab: int):
    import numpy as np

    return np.uint16 if vocab <= 1 << 16 else np.uint32


def write_stream(tok, texts: list[str], path: Path, dtype, batch: int = 1024) -> int:
    """Tokens of every text then EOS, appended in order to ``path``; returns the token count."""
    import numpy as np

    eos = tok.token_to_id(EOS)
    n = 0
    with open(path, "wb") as f:
        for s in range(0, len(texts), batch):
            for enc in tok.encode_batch(texts[s: s + batch], add_special_tokens=False):
                ids = np.asarray(enc.ids + [eos], dtype=dtype)
                f.write(ids.tobytes())
                n += ids.size
    return n


def build(out: Path, packages, vocab: int, heldout_permille: int, max_file_bytes: int, tokenizer_bytes: int,
          split: str = "dir", force: bool = False) -> dict:
    """Build the corpus into ``out`` (skipped when a manifest with the same settings is there); returns the manifest."""
    settings = {"format": FORMAT, "packages": list(packages), "vocab": vocab, "heldout_permille": heldout_permille,
                "max_file_bytes": max_file_bytes, "tokenizer_bytes": tokenizer_bytes, "split": split}
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force:
        old = json.loads(manifest_path.read_text())
        files, versions, _ = list_files(packages, max_file_bytes)
        if old.get("settings") == settings and old.get("versions") == versions and old.get("files") == len(files):
            log(f"corpus in {out} is up to date (train {old['train_tokens']:,} tokens, sha256 {old['train_sha256'][:12]})")
            return old
        log("corpus settings or installed versions changed: rebuilding")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    files, versions, skipped = list_files(packages, max_file_bytes)
    train, heldout = [], []
    train_bytes = heldout_bytes = 0
    for key, path in files:
        text = read_text(path)
        if text is None:
            skipped["not_utf8"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        if is_heldout(key, heldout_permille, split):
            heldout.append(text)
            heldout_bytes += len(text.encode())
        else:
            train.append(text)
            train_bytes += len(text.encode())
    if not train or not heldout:
        raise SystemExit(f"{len(train)} training and {len(heldout)} held-out files: raise --heldout-permille or use "
                         "--split file")
    log(f"{len(train)} training files ({train_bytes / 1e6:.1f} MB), {len(heldout)} held-out ({heldout_bytes / 1e6:.1f} MB); "
        f"skipped {skipped}; versions {versions}")

    def budget():
        spent = 0
        for text in train:
            if spent >= tokenizer_bytes:
                return
            spent += len(text.encode())
            yield text

    t1 = time.time()
    tok = train_tokenizer(budget(), vocab)
    tok.save(str(out / "tokenizer.json"))
    save_hf_tokenizer(tok, out / "hf_tokenizer")
    log(f"tokenizer: vocabulary {tok.get_vocab_size()} in {time.time() - t1:.0f}s")
    dtype = token_dtype(tok.get_vocab_size())
    t2 = time.time()
    n_train = write_stream(tok, train, out / "train.bin", dtype)
    n_heldout = write_stream(tok, heldout, out / "heldout.bin", dtype)
    log(f"tokenized: train {n_train:,} tokens ({train_bytes / max(n_train, 1):.2f} bytes/token), held-out {n_heldout:,} "
        f"in {time.time() - t2:.0f}s")
    import tokenizers

    manifest = {
        "settings": settings,
        "versions": versions,
        "tokenizers": tokenizers.__version__,
        "files": len(files),
        "train_files": len(train),
        "heldout_files": len(heldout),
        "skipped": skipped,
        "train_bytes": train_bytes,
        "heldout_bytes": heldout_bytes,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": tok.token_to_id(EOS),
        "dtype": dtype.__name__,
        "train_tokens": n_train,
        "heldout_tokens": n_heldout,
        "train_sha256": sha256_file(out / "train.bin"),
        "heldout_sha256": sha256_file(out / "heldout.bin"),
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
        "build_s": round(time.time() - t0, 1),
        "python": sys.version.split()[0],
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"wrote {out} in {manifest['build_s']:.0f}s: train sha256 {manifest['train_sha256'][:16]}")
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Loader


class Corpus:
    """The built corpus in ``folder``: fixed-order training batches and evenly spread held-out windows."""

    def __init__(self, folder=DEFAULT_DIR):
        import numpy as np

        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"no corpus in {self.folder}: run `python benchmarks/corpus.py build` first")
        self.manifest = json.loads(path.read_text())
        dtype = getattr(np, self.manifest["dtype"])
        self.train = np.memmap(self.folder / "train.bin", dtype=dtype, mode="r")
        self.heldout = np.memmap(self.folder / "heldout.bin", dtype=dtype, mode="r")
        if self.train.size != self.manifest["train_tokens"] or self.heldout.size != self.manifest["heldout_tokens"]:
            raise ValueError(f"{self.folder}: token files do not match the manifest (rebuild with --force)")

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def fingerprint(self) -> dict:
        """What identifies the token streams (compare across machines and sessions)."""
        keys = ("train_sha256", "heldout_sha256", "tokenizer_sha256", "train_tokens", "heldout_tokens", "vocab_size",
                "versions")
        return {k: self.manifest[k] for k in keys}

    def windows(self, seq_len: int) -> int:
        return self.train.size // seq_len

    def order(self, seq_len: int, epoch: int, data_seed: int):
        """The permutation of training windows of one epoch."""
        import numpy as np

        return np.random.default_rng([data_seed, epoch]).permutation(self.windows(seq_len))

    def batch(self, step: int, rows: int, seq_len: int, data_seed: int):
        """``[rows, seq_len]`` int64 token ids of training step ``step`` (a function of the step alone)."""
        import numpy as np

        n = self.windows(seq_len)
        if n < rows:
            raise ValueError(f"the training stream has {n} windows of {seq_len}; a step needs {rows}")
        per_epoch = n // rows  # whole batches per epoch; the remainder of the permutation is not used that epoch
        epoch, k = divmod(step, per_epoch)
        idx = self.order(seq_len, epoch, data_seed)[k * rows: (k + 1) * rows]
        out = np.stack([self.train[i * seq_len: (i + 1) * seq_len] for i in idx]).astype(np.int64)
        return out

    def epochs(self, steps: int, rows: int, seq_len: int) -> float:
        return steps * rows / max(self.windows(seq_len), 1)

    def heldout_windows(self, count: int, seq_len: int):
        """``[count, seq_len]`` held-out windows, evenly spaced over the held-out stream (fewer if it is short)."""
        import numpy as np

        n = self.heldout.size // seq_len
        if n == 0:
            raise ValueError(f"the held-out stream ({self.heldout.size} tokens) is shorter than one window of {seq_len}")
        count = min(count, n)
        starts = np.linspace(0, n - 1, count).round().astype(np.int64) * seq_len
        return np.stack([self.heldout[s: s + seq_len] for s in starts]).astype(np.int64)

    def heldout_documents(self, min_tokens: int, count: int):
        """Up to ``count`` held-out documents (files) of at least ``min_tokens`` tokens, as id arrays, in order."""
        import numpy as np

        eos = self.manifest["eos_id"]
        ends = np.flatnonzero(np.asarray(self.heldout) == eos)
        docs, start = [], 0
        for end in ends:
            if end - start >= min_tokens:
                docs.append(np.asarray(self.heldout[start:end], dtype=np.int64))
                if len(docs) == count:
                    break
            start = end + 1
        return docs


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None, help=f"corpus folder (default {DEFAULT_DIR}; --quick: ...-quick)")
    p.add_argument("--packages", help=f"comma-separated (default {','.join(PACKAGES)}; --quick: {','.join(QUICK_PACKAGES)})")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default 32768; --quick 1024)")
    p.add_argument("--heldout-permille", type=int, default=20)
    p.add_argument("--split", choices=("dir", "file"), default=None,
                   help="held-out unit: a file's directory (default) or the file (--quick's default)")
    p.add_argument("--max-file-bytes", type=int, default=1 << 19, help="skip larger files (default 512 KiB)")
    p.add_argument("--tokenizer-bytes", type=int, default=None,
                   help="train the tokenizer on at most this many bytes of training files (default 64 MB; --quick 1 MB)")
    p.add_argument("--quick", action="store_true", help="small packages and vocabulary: a smoke test")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date corpus is there")


def resolve_build_args(args) -> dict:
    quick = args.quick
    packages = [p.strip() for p in args.packages.split(",") if p.strip()] if args.packages else list(
        QUICK_PACKAGES if quick else PACKAGES)
    return dict(
        out=args.dir or (WORK_DIR / "corpus-quick" if quick else DEFAULT_DIR),
        packages=packages,
        vocab=args.vocab or (1024 if quick else 32768),
        heldout_permille=args.heldout_permille if not quick else max(args.heldout_permille, 100),
        max_file_bytes=args.max_file_bytes,
        split=args.split or ("file" if quick else "dir"),
        tokenizer_bytes=args.tokenizer_bytes or ((1 << 20) if quick else 64 * 10**6),
        force=args.force,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_build_args(sub.add_parser("build", help="build the corpus, tokenizer and token streams"))
    info = sub.add_parser("info", help="print the manifest")
    info.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = p.parse_args(argv)
    # encode_batch and the BPE trainer run on every core unless this says otherwise (the build is its own process)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if args.cmd == "info":
        print(json.dumps(Corpus(args.dir).manifest, indent=1))
        return 0
    build(**resolve_build_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
