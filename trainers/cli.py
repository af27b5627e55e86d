"""The ``align-losses`` console script.

    align-losses logps --model ./policy --data prefs.jsonl --out scored.parquet --ref-model ./ref --beta 0.1
    python -m trainers.cli logps ...          # the same, without installing the script

``logps`` adds per-sequence log-probs (and reference log-probs, implicit rewards and margins) to a
JSON-lines or Parquet file through `trainers.extract.extract_logps`; ``align-losses logps --help``
documents it. Errors a user can fix (a missing file or model, missing columns, a null value, an unknown
format or backend) end the command with exit status 1 and one line on stderr, no traceback. Scored rows are
kept chunk by chunk in ``OUT.partial`` so that ``--resume`` continues an interrupted run
(`trainers.scored_file`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROG = "align-losses"
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

LOGPS_DESCRIPTION = """\
Add per-sequence log-probs of a model (and of a reference model, with implicit rewards) to a dataset,
computed the way TRL's trainers compute them, through the fused linear + cross-entropy head (no
[tokens, vocab] logits, so memory does not grow with the vocabulary).

Input columns (plain text, or conversational lists of {"role", "content"} messages rendered with the
tokenizer's chat template), and the trainer whose tokenisation and truncation are followed:
  prompt, chosen, rejected        preference (DPOTrainer; "prompt" may be left out, as TRL allows)
  prompt, completion, label       unpaired (KTOTrainer)
  prompt, completion              completion-only language modelling (SFTTrainer)
(or the tokenised columns prompt_ids + chosen_ids + rejected_ids / prompt_ids + completion_ids).

Output: every input row, in order, with new columns:
  preference  chosen_logps, rejected_logps, chosen_tokens, rejected_tokens
              + ref_chosen_logps, ref_rejected_logps            with --ref-model
              + chosen_reward, rejected_reward, margin          with --ref-model and --beta
  otherwise   logps, tokens (+ ref_logps with --ref-model, + reward with --beta)
A log-prob is the sum over the completion tokens (EOS appended to plain-text completions, as the
trainers do); "tokens" counts the tokens in that sum. Sequences longer than --max-length are
truncated as the trainer truncates them (they are counted in the summary); rows the trainer would
drop (a prompt alone filling --max-length) keep null values.

Files: .jsonl and .json are JSON Lines (a .json input may also hold one JSON array of rows), .parquet
is Parquet. A null (None or missing) value in a column that is read is an error naming the row and the
column, before any model is loaded.

Writing: rows are scored in chunks of --chunk-rows consecutive rows; each chunk's values are appended to
OUT.partial (next to --out) as soon as it is done and flushed to disk. --out itself is written only at the
end, through a temporary file with a unique name in its folder (created exclusively: no existing file or
link is followed or replaced) that atomically replaces it; an earlier --out stays intact until then, and
the temporary file is removed on any failure. Nothing else is written. OUT.partial is removed once --out
is written; after an interrupt (Ctrl-C) or a failure it is kept, and the same command with --resume
continues from the rows it holds, giving a file identical to an uninterrupted run (same rows, values and
order). --resume refuses a partial file written with other arguments, input files or library versions,
a link, or a file that is not its own; without --resume an existing OUT.partial is an error, never
overwritten. A run holds OUT.partial locked: a second run on the same --out stops with an error instead of
writing into it.

A closing summary gives rows, tokens, tokens/s (of this run), truncated rows, and with --ref-model the
reward accuracy and mean margin. Exit status 1 with a one-line message on a usage error, 130 on an
interrupt."""

EPILOG = """\
examples:
  align-losses logps --model ./ckpt --data prefs.jsonl --out scored.jsonl
  align-losses logps --model ./ckpt --ref-model ./base --beta 0.1 --data prefs.parquet --out scored.parquet
  align-losses logps --model ./ckpt --ref-model ./base --beta 0.1 --data prefs.parquet --out scored.parquet --resume
  python -m trainers.cli logps --model ./ckpt --data sft.jsonl --out sft_logps.parquet --device cpu"""

#: --max-length value meaning "no truncation" (None means the trainer's default).
NO_TRUNCATION = "none"


class CLIError(Exception):
    """A problem the user can fix: printed as one line, exit status 1."""


def _positive_int(text: str, expected: str = "a positive integer") -> int:
    """An argparse type: ``text`` as an int >= 1; the error says ``expected`` and what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _max_length(text: str):
    """An argparse type: a positive int, or `NO_TRUNCATION` for 'none' (also '0' and 'off')."""
    if text.lower() in ("none", "0", "off"):
        return NO_TRUNCATION
    return _positive_int(text, "a positive integer or 'none'")


def _beta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _backend_names() -> list:
    from align_losses import backends

    return backends.names()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools of align-losses, alignment losses on a fused linear + cross-entropy head.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "logps",
        help="add per-sequence log-probs, reference log-probs and implicit rewards to a dataset",
        description=LOGPS_DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH",
                   help="local directory of a Hugging Face causal LM (save_pretrained); its tokenizer is used unless "
                   "--tokenizer is given")
    p.add_argument("--data", required=True, metavar="FILE", help="input rows: .jsonl, .json or .parquet")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output file: .jsonl, .json (both JSON Lines) or .parquet; replaced atomically at the end if "
                   "it exists (see 'Writing' above)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the rows kept in OUT.partial (same arguments and files "
                   "needed); the result is identical to an uninterrupted run")
    p.add_argument("--chunk-rows", type=_positive_int, default=256, metavar="N",
                   help="rows scored and saved to OUT.partial at a time (what an interrupt can lose); part of the "
                   "settings --resume checks; default %(default)s")
    p.add_argument("--ref-model", metavar="PATH", help="local directory of a reference model: adds ref_*logps columns")
    p.add_argument("--beta", type=_beta, metavar="B",
                   help="with --ref-model: add implicit rewards beta * (logps - ref_logps) and the margin; a finite "
                   "number >= 0")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="rows per forward pass (a preference row is two sequences); default %(default)s")
    p.add_argument("--max-length", type=_max_length, default=None, metavar="L",
                   help="truncate sequences to L tokens as the trainer does; 'none' for no truncation; default: the "
                   "TRL config's default (1024)")
    p.add_argument("--truncation-mode", choices=("keep_start", "keep_end"), default="keep_start",
                   help="which end of a too-long sequence to keep (preference and prompt/completion data; unpaired "
                   "data always keeps the start); default %(default)s")
    p.add_argument("--impl", default="auto", metavar="NAME",
                   help=f"align-losses backend of the fused head, one of: {', '.join(_backend_names())} (triton, cce "
                   "and liger need CUDA; auto picks triton on CUDA when it can, torch otherwise); default %(default)s")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run; default: cuda when a CUDA device is available, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype when loading the model(s); 'auto' keeps the checkpoint's; default %(default)s")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory (default: the --model directory)")
    p.add_argument("--kind", choices=("preference", "unpaired", "completion"),
                   help="force the data kind instead of detecting it from the columns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return parser


def _format_of(path: str, what: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        got = suffix or "no extension"
        raise CLIError(f"unknown format of {what} {path!r}: expected a .jsonl, .json or .parquet file (got {got!r})")
    return FORMATS[suffix]


def _check_model_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{flag} {path}: no such directory")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CLIError(f"{flag} {path}: not a model directory (no config.json; save one with save_pretrained)")


def read_rows(path: str):
    """A `datasets.Dataset` of the rows of a .jsonl/.json/.parquet file."""
    from datasets import Dataset

    fmt = _format_of(path, "--data")
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--data {path}: no such file")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            from datasets.table import InMemoryTable

            return Dataset(InMemoryTable(pq.read_table(p)))
        text = p.read_text(encoding="utf-8")
        rows = None
        if p.suffix.lower() == ".json":  # one JSON document (rows, or columns), else JSON Lines
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                document = None
            if isinstance(document, list):
                rows = document
            elif isinstance(document, dict):
                if _is_columns(document):
                    return Dataset.from_dict(document)
                rows = [document]
        if rows is None:
            rows = []
            # split on "\n" only: str.splitlines also splits on U+2028, U+0085 and others, which JSON strings
            # may hold unescaped (this command's own output does, with ensure_ascii=False)
            for number, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CLIError(f"--data {path}: line {number} is not valid JSON ({e.msg})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise CLIError(f"--data {path}: every row must be a JSON object")
        return Dataset.from_list(rows)
    except CLIError:
        raise
    except Exception as e:  # pyarrow / datasets errors: one line
        raise CLIError(f"--data {path}: cannot read it ({type(e).__name__}: {_one_line(e)})") from None


def _is_columns(document: dict) -> bool:
    """Whether a .json file's one object holds columns (``{"prompt": [p0, p1, ...], ...}``) rather than one row.

    Columns are equal-length lists whose items are never messages (dicts) and, for ``*_ids``, are lists; so a
    row whose values are message lists or token ids (lists too, maybe of one length) stays one row.
    """
    values = list(document.values())
    if not values or not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
        return False
    for name, column in document.items():
        if any(isinstance(item, dict) for item in column):
            return False
        if name.endswith("_ids") and not all(isinstance(item, list) for item in column):
            return False
    return True


def write_rows(dataset, path: str) -> None:
    """Write ``dataset`` to ``path`` (format by extension), atomically through an exclusive temporary file
    (`trainers.scored_file.write_output`)."""
    from .scored_file import write_output

    fmt = _format_of(path, "--out")
    if fmt == "parquet":
        write_output(path, lambda f: dataset.to_parquet(f), binary=True)
        return

    def write_jsonl(f):
        for row in dataset:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_output(path, write_jsonl, binary=False)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_model(path: str, flag: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise CLIError(f"{flag} {path}: cannot load a causal LM ({type(e).__name__}: {_one_line(e)})") from None
    return model.to(device)


def _load_tokenizer(path: str, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CLIError(
            f"{flag} {path}: cannot load a tokenizer ({type(e).__name__}: {_one_line(e)}); pass --tokenizer PATH"
        ) from None


def _check_out(args) -> None:
    from .scored_file import output_folder

    out = Path(args.out)
    out_dir = output_folder(args.out)
    if not out_dir.is_dir():
        raise CLIError(f"--out {args.out}: directory {out_dir} does not exist")
    if out.is_dir():
        raise CLIError(f"--out {args.out}: is a directory; expected a file name")
    if out.exists() and Path(args.data).exists() and os.path.samefile(out, args.data):
        raise CLIError(f"--out {args.out}: is the --data file; write the scored rows to another file")
    if not os.access(out_dir, os.W_OK):
        raise CLIError(f"--out {args.out}: directory {out_dir} is not writable")


def _settings(args, device: str, kind: str, rows: int) -> dict:
    """What must be the same for --resume to continue a run: the arguments that change values or rows, the
    content of the input files (the data's hash; the models' and tokenizer's file sizes and times) and the
    versions of the libraries that compute the values (an upgrade between the two parts could change them)."""
    from importlib.metadata import PackageNotFoundError, version

    from .scored_file import folder_fingerprint, partial_path

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    own = (args.out, partial_path(args.out))
    digest = hashlib.sha256()
    with open(args.data, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "data_sha256": digest.hexdigest(), "rows": rows, "kind": kind,
        "model_files": folder_fingerprint(args.model, own), "ref_model_files": folder_fingerprint(args.ref_model, own),
        "tokenizer_files": folder_fingerprint(args.tokenizer, own),
        "beta": args.beta, "batch_size": args.batch_size, "max_length": args.max_length,
        "truncation_mode": args.truncation_mode, "impl": args.impl, "device": device, "dtype": args.dtype,
        "chunk_rows": args.chunk_rows,
        "versions": {name: installed(name) for name in ("align-losses", "torch", "transformers", "trl")},
    }


def run_logps(args) -> int:
    # Cheap checks first, before any model is loaded.
    _format_of(args.data, "--data")
    _format_of(args.out, "--out")
    if not Path(args.data).is_file():
        raise CLIError(f"--data {args.data}: no such file")
    _check_out(args)
    _check_model_dir(args.model, "--model")
    if args.ref_model:
        _check_model_dir(args.ref_model, "--ref-model")
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise CLIError(f"--tokenizer {args.tokenizer}: no such directory")
    if args.beta is not None and not args.ref_model:
        raise CLIError("--beta needs --ref-model (the reward is beta * (logps - ref_logps))")

    from align_losses import backends

    try:
        backends.check(args.impl)  # without a call: the name and this environment ("auto" always passes)
    except backends.BackendError as e:
        if e.kind == "unknown":
            raise CLIError(f"--impl {args.impl}: unknown backend; expected one of {', '.join(backends.names())}") from None
        raise CLIError(f"--impl {args.impl}: cannot run here ({_one_line(e.reason)})") from None

    from .extract import check_dataset

    dataset = read_rows(args.data)
    try:
        kind = check_dataset(dataset, args.kind, where=f"--data {args.data}")
    except ValueError as e:
        raise CLIError(f"--data {args.data}: {e}" if not str(e).startswith("--data") else str(e)) from None

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")

    from .scored_file import PartialFile, PartialFileError, partial_path

    settings = _settings(args, device, kind, len(dataset))
    path = partial_path(args.out)
    created = not (args.resume and os.path.lexists(path))
    try:
        if not created:
            partial = PartialFile.resume(path, settings, len(dataset), args.chunk_rows)
        else:
            if args.resume:
                print(f"{PROG} logps: no partial run at {path}: starting from the first row", file=sys.stderr)
            partial = PartialFile.create(path, settings)
    except PartialFileError as e:
        raise CLIError(str(e)) from None
    try:
        code = _score_and_write(args, dataset, kind, device, partial)
    except BaseException:
        if created and partial.rows_done == 0:
            partial.remove()  # nothing worth keeping
        else:
            partial.close()
            print(f"{PROG}: {partial.rows_done} of {len(dataset)} rows are scored and kept in {path}; rerun the same "
                  f"command with --resume to continue from there", file=sys.stderr)
        raise
    partial.remove()
    return code


def _score_and_write(args, dataset, kind: str, device: str, partial) -> int:
    """Load the models, score the rows that ``partial`` lacks chunk by chunk, then write --out from it."""
    from .extract import prepare_logps

    tokenizer = _load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    model = _load_model(args.model, "--model", args.dtype, device)
    ref_model = _load_model(args.ref_model, "--ref-model", args.dtype, device) if args.ref_model else None
    extra = {}
    if args.max_length is not None:
        extra["max_length"] = None if args.max_length == NO_TRUNCATION else args.max_length
    try:
        job = prepare_logps(
            model, dataset, tokenizer, ref_model=ref_model, beta=args.beta, batch_size=args.batch_size,
            lce_impl=args.impl, truncation_mode=args.truncation_mode, kind=kind,
            progress=False if args.no_progress else True, **extra,
        )
    except (ValueError, TypeError) as e:
        raise CLIError(_one_line(e)) from None
    n = len(dataset)
    with job.progress_bar() as bar:
        bar.update(int((~job.plan.dropped[: partial.rows_done]).sum()))
        for start in range(partial.rows_done, n, args.chunk_rows):
            rows = range(start, min(start + args.chunk_rows, n))
            partial.append(rows.start, rows.stop, job.score(rows, bar=bar))
    scored, summary = job.finish(partial.columns())
    write_rows(scored, args.out)
    print(f"{PROG} logps: wrote {len(scored)} rows to {args.out}")
    for line in summary.lines():
        print(f"  {line}")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which a test harness may have replaced since)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    """Warnings of this package (truncated rows) as ``align-losses: warning: ...`` lines, once per process."""
    log = logging.getLogger("trainers")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.WARNING:
        log.setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    """Only our progress bar: none for loading weights or writing Parquet."""
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # a missing optional piece must not stop the command
        pass


def main(argv=None) -> int:
    """Entry point of the ``align-losses`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _log_to_stderr()
    _quiet_libraries()
    previous = _exit_on_sigterm()
    try:
        return run_logps(args)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """Turn SIGTERM (a scheduler or ``kill``) into SystemExit(143), so that the temporary file is removed and the
    scored chunks are reported as on Ctrl-C; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
