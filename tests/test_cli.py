"""The ``align-losses logps`` console script, end to end: tiny models saved to a temporary folder, run as
subprocesses (``python -m trainers.cli``), JSON Lines and Parquet, and each user error.

The subprocesses start at once (one module fixture) because each one pays the import of torch and TRL (the
``trainers`` package imports TRL's trainers): the two end-to-end runs and one error case. Every error case also
runs in-process through `trainers.cli.main`, the console script's entry point, which is the same code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TOKENIZER_DIR, tiny_causal_lm

PREFERENCE_ROWS = 10
UNPAIRED_ROWS = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Saved policy (with its tokenizer) and reference models, and input files in every format."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    policy, ref = tiny_causal_lm(vocab_size=len(tok), seed=0), tiny_causal_lm(vocab_size=len(tok), seed=1)
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    ref.save_pretrained(root / "ref")

    def rows(name, n):
        lines = (ROOT / "examples" / "data" / name).read_text().splitlines()[:n]
        return [json.loads(line) for line in lines]

    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows("preference.jsonl", PREFERENCE_ROWS)))
    Dataset.from_list(rows("kto.jsonl", UNPAIRED_ROWS)).to_parquet(str(root / "kto.parquet"))
    (root / "bad_columns.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    (root / "pref.csv").write_text("prompt,chosen,rejected\n")
    return root


#: name: (arguments after ``logps``, given the work folder; the message expected on stderr)
ERRORS = {
    "missing_model": (lambda w: ["--model", w / "no_such_model", "--data", w / "pref.jsonl", "--out", w / "x.jsonl"],
                      "no_such_model: no such directory"),
    "not_a_model": (lambda w: ["--model", w, "--data", w / "pref.jsonl", "--out", w / "x.jsonl"],
                    "not a model directory"),
    "missing_ref_model": (lambda w: ["--model", w / "policy", "--ref-model", w / "nope", "--data", w / "pref.jsonl",
                                     "--out", w / "x.jsonl"], "--ref-model"),
    "missing_data": (lambda w: ["--model", w / "policy", "--data", w / "no_such.jsonl", "--out", w / "x.jsonl"],
                     "no_such.jsonl: no such file"),
    "missing_columns": (lambda w: ["--model", w / "policy", "--data", w / "bad_columns.jsonl", "--out", w / "x.jsonl"],
                        "missing columns"),
    "unknown_format": (lambda w: ["--model", w / "policy", "--data", w / "pref.csv", "--out", w / "x.jsonl"],
                       "unknown format of --data"),
    "unknown_out_format": (lambda w: ["--model", w / "policy", "--data", w / "pref.jsonl", "--out", w / "x.txt"],
                           "unknown format of --out"),
    "unknown_impl": (lambda w: ["--model", w / "policy", "--data", w / "pref.jsonl", "--out", w / "x.jsonl",
                                "--impl", "no_such_backend"], "--impl no_such_backend: unknown backend"),
}


def _cli(*args):
    return [sys.executable, "-m", "trainers.cli", "logps", *map(str, args)]


@pytest.fixture(scope="module")
def runs(workdir):
    """Every command below, run concurrently; ``{name: (returncode, stdout, stderr)}``."""
    w = workdir
    commands = {
        "jsonl_to_parquet": _cli("--model", w / "policy", "--ref-model", w / "ref", "--beta", 0.1, "--data",
                                 w / "pref.jsonl", "--out", w / "pref_out.parquet", "--max-length", 16,
                                 "--batch-size", 3, "--impl", "torch"),
        "parquet_to_jsonl": _cli("--model", w / "policy", "--data", w / "kto.parquet", "--out", w / "kto_out.jsonl",
                                 "--ref-model", w / "ref", "--device", "cpu"),
        "missing_columns": _cli(*ERRORS["missing_columns"][0](w)),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TQDM_DISABLE", None)  # the progress bar is part of what is tested
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out, err)
    return results


def _in_process(workdir, data, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.extract import extract_logps

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(workdir / "policy")
    model = AutoModelForCausalLM.from_pretrained(workdir / "policy")
    ref = AutoModelForCausalLM.from_pretrained(workdir / "ref")
    return extract_logps(model, data, tok, ref_model=ref, return_summary=True, progress=False, **kwargs)


def test_jsonl_in_parquet_out(workdir, runs):
    import pyarrow.parquet as pq
    from datasets import Dataset

    code, out, err = runs["jsonl_to_parquet"]
    assert code == 0, err
    table = pq.read_table(workdir / "pref_out.parquet").to_pylist()
    source = [json.loads(line) for line in (workdir / "pref.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in table] == [r["prompt"] for r in source]  # every row, in order
    expected, summary = _in_process(workdir, Dataset.from_list(source), beta=0.1, max_length=16)
    for got, want in zip(table, expected):
        for key in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_reward",
                    "rejected_reward", "margin"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key
        assert (got["chosen_tokens"], got["rejected_tokens"]) == (want["chosen_tokens"], want["rejected_tokens"])
    assert summary.truncated_rows > 0
    assert f"rows: {PREFERENCE_ROWS} (preference" in out
    assert f"truncated {summary.truncated_rows}" in out
    assert "tokens/s" in out
    assert f"reward accuracy: {summary.reward_accuracy:.4f}" in out
    assert "mean margin:" in out and "(beta=0.1)" in out
    assert "truncated" in err  # the logged warning
    assert "log-probs" in err  # the progress bar


def test_parquet_in_jsonl_out(workdir, runs):
    from datasets import Dataset

    code, out, err = runs["parquet_to_jsonl"]
    assert code == 0, err
    rows = [json.loads(line) for line in (workdir / "kto_out.jsonl").read_text().splitlines()]
    source = Dataset.from_parquet(str(workdir / "kto.parquet"))
    assert len(rows) == UNPAIRED_ROWS and [r["completion"] for r in rows] == source["completion"]
    assert set(rows[0]) == {"prompt", "completion", "label", "logps", "tokens", "ref_logps"}
    expected, _ = _in_process(workdir, source)
    for got, want in zip(rows, expected):
        assert got["logps"] == pytest.approx(want["logps"], abs=1e-5)
        assert got["ref_logps"] == pytest.approx(want["ref_logps"], abs=1e-5)
        assert got["tokens"] == want["tokens"]
    assert "(unpaired" in out and "mean reward:" in out


def _check_one_line_error(code, out, err, message):
    assert code == 1, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("align-losses: error: "), err
    assert message in lines[0], lines[0]


def test_error_in_a_subprocess_is_one_line(runs):
    _check_one_line_error(*runs["missing_columns"], ERRORS["missing_columns"][1])


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_are_one_line(workdir, capsys, name):
    from trainers.cli import main

    make_args, message = ERRORS[name]
    code = main(["logps", *map(str, make_args(workdir))])
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, message)
    assert not (workdir / "x.jsonl").exists()


def test_help_documents_every_option(capsys):
    from trainers.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["logps", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--out", "--ref-model", "--beta", "--batch-size", "--max-length", "--impl",
                 "--device", ".jsonl", ".parquet", "chosen_logps", "ref_chosen_logps", "margin", "reward accuracy"):
        assert flag in text, flag
    assert main([]) == 2  # no subcommand: usage, status 2


def test_beta_without_reference_is_refused(workdir, capsys):
    from trainers.cli import main

    code = main(["logps", "--model", str(workdir / "policy"), "--data", str(workdir / "pref.jsonl"),
                 "--out", str(workdir / "y.jsonl"), "--beta", "0.1"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "align-losses: error: --beta needs --ref-model (the reward is beta * (logps - ref_logps))"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Files: only --out, OUT.partial and an exclusive temporary file are written; --resume continues an interrupted run


def _logps_args(w, out, *extra):
    return ["logps", "--model", str(w / "policy"), "--ref-model", str(w / "ref"), "--beta", "0.1", "--data",
            str(w / "pref.jsonl"), "--out", str(out), "--max-length", "16", "--batch-size", "2", "--chunk-rows", "3",
            "--impl", "torch", "--device", "cpu", "--no-progress", *map(str, extra)]


def _interrupt_after(monkeypatch, chunks: int, error=KeyboardInterrupt):
    """Make the (chunks + 1)-th `LogpsJob.score` call raise ``error``, as Ctrl-C or a crash would."""
    from trainers import extract

    calls = {"n": 0}
    real = extract.LogpsJob.score

    def score(self, rows, bar=None):
        if calls["n"] == chunks:
            raise error("injected")
        calls["n"] += 1
        return real(self, rows, bar=bar)

    monkeypatch.setattr(extract.LogpsJob, "score", score)
    return calls


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory):
    """The reference outputs of uninterrupted runs: ``{suffix: path}``."""
    from trainers.cli import main

    out = {}
    for suffix in (".jsonl", ".parquet"):
        folder = tmp_path_factory.mktemp("whole")
        out[suffix] = folder / f"scored{suffix}"
        assert main(_logps_args(workdir, out[suffix])) == 0
        assert _files(folder) == [out[suffix].name]  # nothing else left behind
    return out


def _same_output(a, b):
    if a.suffix == ".parquet":
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        assert ta.schema == tb.schema and ta.to_pylist() == tb.to_pylist()
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("chunks_before", [0, 2])
def test_interrupted_run_resumed_equals_an_uninterrupted_one(workdir, uninterrupted, tmp_path, monkeypatch, capsys,
                                                              suffix, chunks_before):
    from trainers.cli import main

    out = tmp_path / f"scored{suffix}"
    out.write_text("previous output\n")
    _interrupt_after(monkeypatch, chunks_before)
    assert main(_logps_args(workdir, out)) == 130
    err = capsys.readouterr().err
    partial = tmp_path / f"scored{suffix}.partial"
    assert out.read_text() == "previous output\n"  # the earlier output is intact
    if chunks_before == 0:  # nothing scored: nothing kept
        assert _files(tmp_path) == [out.name]
        return
    assert f"{3 * chunks_before} of {PREFERENCE_ROWS} rows are scored and kept in {partial}" in err and "--resume" in err
    assert _files(tmp_path) == sorted([out.name, partial.name])  # no temporary file left
    assert len(partial.read_text().splitlines()) == 1 + chunks_before
    monkeypatch.undo()
    assert main(["logps", *_logps_args(workdir, out)[1:], "--resume"]) == 0
    assert _files(tmp_path) == [out.name]
    _same_output(out, uninterrupted[suffix])


def test_a_crash_keeps_the_partial_file_and_resume_continues(workdir, uninterrupted, tmp_path, monkeypatch, capsys):
    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    _interrupt_after(monkeypatch, 1, error=RuntimeError)
    assert main(_logps_args(workdir, out)) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: injected" in err and "3 of 10 rows are scored and kept" in err
    # a torn chunk (the process killed while writing it) is cut off and scored again
    partial = tmp_path / "scored.jsonl.partial"
    with open(partial, "a") as f:
        f.write('{"rows": [3, 6], "columns": {"chosen_lo')
    monkeypatch.undo()
    assert main(_logps_args(workdir, out, "--resume")) == 0
    _same_output(out, uninterrupted[".jsonl"])
    assert _files(tmp_path) == [out.name]


def test_resume_refuses_other_settings(workdir, tmp_path, monkeypatch, capsys):
    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    _interrupt_after(monkeypatch, 1)
    assert main(_logps_args(workdir, out)) == 130
    partial = tmp_path / "scored.jsonl.partial"
    before = partial.read_bytes()
    monkeypatch.undo()
    capsys.readouterr()
    args = _logps_args(workdir, out, "--resume")
    args[args.index("--batch-size") + 1] = "3"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "other settings or inputs (batch_size 2 there, 3 now)" in err and "remove" in err
    # without --resume the partial file is never overwritten
    assert main(_logps_args(workdir, out)) == 1
    assert "exists" in capsys.readouterr().err
    assert partial.read_bytes() == before and not out.exists()


def test_partial_file_that_is_a_link_or_someone_elses_is_left_alone(workdir, tmp_path, capsys):
    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    partial = tmp_path / "scored.jsonl.partial"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    partial.symlink_to(victim)
    for extra in ((), ("--resume",)):
        assert main(_logps_args(workdir, out, *extra)) == 1
        err = capsys.readouterr().err
        assert ("exists" if not extra else "is a symbolic link; it is not followed") in err, err
        assert victim.read_text() == "keep me\n" and partial.is_symlink() and not out.exists()
    partial.unlink()
    partial.write_text("my own notes\n")
    assert main(_logps_args(workdir, out, "--resume")) == 1
    assert "is not a partial file of align-losses logps" in capsys.readouterr().err
    assert partial.read_text() == "my own notes\n" and not out.exists()


def test_out_that_is_a_link_is_replaced_not_followed(workdir, uninterrupted, tmp_path):
    from trainers.cli import main

    victim = tmp_path / "victim.jsonl"
    victim.write_text("keep me\n")
    out = tmp_path / "scored.jsonl"
    out.symlink_to(victim)
    assert main(_logps_args(workdir, out)) == 0
    assert victim.read_text() == "keep me\n" and not out.is_symlink()
    _same_output(out, uninterrupted[".jsonl"])


def test_a_failure_while_writing_removes_the_temporary_file(workdir, uninterrupted, tmp_path, monkeypatch, capsys):
    from trainers import cli

    out = tmp_path / "scored.jsonl"
    real_dumps = json.dumps

    def failing_dumps(obj, **kwargs):
        if isinstance(obj, dict) and "prompt" in obj and obj.get("prompt") == json.loads(
                (workdir / "pref.jsonl").read_text().splitlines()[5])["prompt"]:
            raise OSError("disk full")
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(cli.json, "dumps", failing_dumps)
    assert cli.main(_logps_args(workdir, out)) == 1
    err = capsys.readouterr().err
    assert "disk full" in err and "10 of 10 rows are scored and kept" in err
    assert _files(tmp_path) == ["scored.jsonl.partial"]  # no temporary file, no output
    monkeypatch.undo()
    assert cli.main(_logps_args(workdir, out, "--resume")) == 0  # only the writing is left to do
    _same_output(out, uninterrupted[".jsonl"])


def test_null_completion_is_named_before_any_model_is_loaded(workdir, tmp_path, capsys, monkeypatch):
    from trainers import cli

    rows = [json.loads(line) for line in (workdir / "pref.jsonl").read_text().splitlines()]
    rows[4]["rejected"] = None
    del rows[6]["chosen"]
    data = tmp_path / "nulls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("a model was loaded"))
    args = _logps_args(workdir, tmp_path / "o.jsonl")
    args[args.index("--data") + 1] = str(data)
    code = cli.main(args)
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, "null (None or missing) value in column 'rejected' at row 4")
    assert _files(tmp_path) == ["nulls.jsonl"]


def test_bad_beta_and_chunk_rows_are_usage_errors(workdir, capsys):
    from trainers.cli import main

    for flag, value, message in (("--beta", "nan", "expected a finite number >= 0, got 'nan'"),
                                 ("--beta", "-1", "expected a finite number >= 0, got '-1'"),
                                 ("--chunk-rows", "0", "expected a positive integer, got '0'"),
                                 ("--chunk-rows", "-5", "expected a positive integer, got '-5'"),
                                 ("--chunk-rows", "2.5", "expected a positive integer, got '2.5'"),
                                 ("--batch-size", "x", "expected a positive integer, got 'x'"),
                                 ("--max-length", "-3", "expected a positive integer or 'none', got '-3'"),
                                 ("--max-length", "big", "expected a positive integer or 'none', got 'big'")):
        args = _logps_args(workdir, workdir / "x.jsonl")
        args[args.index(flag) + 1] = value
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_says_how_files_are_written_and_lists_every_backend(capsys):
    from align_losses import backends
    from trainers.cli import main

    with pytest.raises(SystemExit):
        main(["logps", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in backends.names():
        assert name in text, name
    for phrase in ("--resume", "--chunk-rows", "OUT.partial", "temporary file with a unique name",
                   "removed on any failure", "identical to an uninterrupted run",
                   "a second run on the same --out stops with an error", "input files or library versions",
                   "default: cuda when a CUDA device is available, else cpu"):
        assert phrase in text, phrase


def test_device_defaults_to_cuda_when_available(workdir, tmp_path, monkeypatch, capsys):
    """With a CUDA device reported, the models go to "cuda" (which this CPU build of torch then refuses)."""
    from trainers import cli

    seen = []

    def load_model(path, flag, dtype, device):
        seen.append(device)
        raise cli.CLIError("stopped before loading")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_load_model", load_model)
    args = [a for a in _logps_args(workdir, tmp_path / "o.jsonl") if a not in ("--device", "cpu")]
    assert cli.main(args) == 1
    assert "stopped before loading" in capsys.readouterr().err
    assert seen == ["cuda"]
    assert _files(tmp_path) == []  # the partial file of a run that scored nothing is removed


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_real_interrupt_keeps_the_scored_chunks_and_resume_completes_the_file(workdir, tmp_path, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM to a running command: exit status 130 or 143, no temporary file,
    the chunks kept; ``--resume`` then writes the file an uninterrupted run writes."""
    import signal
    import time

    from trainers.cli import main

    lines = (workdir / "pref.jsonl").read_text().splitlines()
    data = tmp_path / "many.jsonl"
    data.write_text("".join(lines[i % len(lines)] + "\n" for i in range(120)))

    def args(out, *extra):
        a = _logps_args(workdir, out, *extra)
        a[a.index("--data") + 1] = str(data)
        a[a.index("--chunk-rows") + 1] = "2"
        return a

    folder = tmp_path / "run"
    folder.mkdir()
    out = folder / "scored.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "trainers.cli", *args(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = folder / "scored.jsonl.partial"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= 3:  # the header and two chunks
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], err
    assert "rows are scored and kept in" in err and "--resume" in err
    assert _files(folder) == [partial.name]  # no temporary file, no output
    assert main(args(out, "--resume")) == 0
    whole = tmp_path / "whole.jsonl"
    assert main(args(whole)) == 0
    _same_output(out, whole)


def test_max_length_none_means_no_truncation(workdir, tmp_path, capsys):
    from trainers.cli import main

    args = _logps_args(workdir, tmp_path / "o.jsonl")
    args[args.index("--max-length") + 1] = "none"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "truncated 0" in out and "max_length=None" in out


@pytest.mark.parametrize("target, message", [("data", "is the --data file; write the scored rows to another file"),
                                             ("folder", "is a directory; expected a file name")])
def test_out_that_is_the_input_or_a_folder(workdir, tmp_path, capsys, target, message):
    from trainers.cli import main

    data = tmp_path / "in.jsonl"
    data.write_text((workdir / "pref.jsonl").read_text())
    out = data if target == "data" else tmp_path / "sub.jsonl"
    if target == "folder":
        out.mkdir()
    args = _logps_args(workdir, out)
    args[args.index("--data") + 1] = str(data)
    code = main(args)
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, message)
    assert data.read_text() == (workdir / "pref.jsonl").read_text()


def test_a_second_run_resuming_a_partial_file_in_use_is_refused(workdir, uninterrupted, tmp_path, monkeypatch,
                                                                 capsys):
    """Two runs racing on one --out: the one that finds OUT.partial held by the other stops before appending."""
    fcntl = pytest.importorskip("fcntl")
    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    _interrupt_after(monkeypatch, 1)
    assert main(_logps_args(workdir, out)) == 130
    monkeypatch.undo()
    partial = tmp_path / "scored.jsonl.partial"
    before = partial.read_bytes()
    held = os.open(partial, os.O_RDWR)  # the other run, still scoring
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        code = main(_logps_args(workdir, out, "--resume"))
        captured = capsys.readouterr()
        _check_one_line_error(code, captured.out, captured.err, f"{partial} is in use by another run writing the "
                              "same --out")
        assert partial.read_bytes() == before and not out.exists()
    finally:
        os.close(held)
    assert main(_logps_args(workdir, out, "--resume")) == 0  # once it is free, the run continues
    _same_output(out, uninterrupted[".jsonl"])


def test_out_that_is_a_link_to_another_folder_is_written_in_its_own_folder(workdir, uninterrupted, tmp_path,
                                                                             monkeypatch):
    """The temporary file goes next to --out, not next to the file a link at --out points to."""
    import tempfile

    from trainers.cli import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.jsonl"
    victim.write_text("keep me\n")
    here = tmp_path / "here"
    here.mkdir()
    out = here / "scored.jsonl"
    out.symlink_to(victim)
    folders = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        folders.append(os.path.realpath(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(_logps_args(workdir, out)) == 0
    assert folders == [os.path.realpath(here)], f"temporary file made in {folders}, expected {here}"
    assert victim.read_text() == "keep me\n" and _files(elsewhere) == ["victim.jsonl"]
    _same_output(out, uninterrupted[".jsonl"])


def test_json_lines_may_hold_unicode_line_separators(tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped in a JSON string (and this command writes them so): they do
    not end a line of a JSON Lines file."""
    from trainers.cli import read_rows

    rows = [{"prompt": "a\u2028b", "chosen": "c\u0085", "rejected": "d\u2029e"}, {"prompt": "x", "chosen": "y",
                                                                                     "rejected": "z"}]
    path = tmp_path / "sep.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_rows(str(path)).to_list() == rows


@pytest.mark.parametrize("row", [
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
     "rejected": [{"role": "assistant", "content": "b"}]},
    {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5, 6]},
])
def test_a_json_file_of_one_row_whose_values_are_lists_is_one_row(tmp_path, row):
    """One conversational or tokenised row in a .json file: its lists (all of one length) are not columns."""
    from trainers.cli import read_rows

    path = tmp_path / "one.json"
    path.write_text(json.dumps(row))
    assert read_rows(str(path)).to_list() == [row]


def test_a_json_file_of_columns_is_read_as_rows(tmp_path):
    from trainers.cli import read_rows

    columns = {"prompt": ["p0", "p1"], "completion": ["c0", "c1"], "label": [True, False]}
    path = tmp_path / "columns.json"
    path.write_text(json.dumps(columns))
    assert read_rows(str(path)).to_list() == [{"prompt": "p0", "completion": "c0", "label": True},
                                              {"prompt": "p1", "completion": "c1", "label": False}]


@pytest.mark.parametrize("line", ['{"rows": [0, 3], "columns": [1, 2, 3]}',
                                  '{"rows": [0, 3], "columns": {"chosen_logps": 5}}',
                                  '{"rows": 3, "columns": {}}', '[1, 2]'])
def test_resume_names_a_damaged_line_of_the_partial_file(workdir, tmp_path, monkeypatch, capsys, line):
    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    _interrupt_after(monkeypatch, 1)
    assert main(_logps_args(workdir, out)) == 130
    monkeypatch.undo()
    partial = tmp_path / "scored.jsonl.partial"
    header = partial.read_text().splitlines()[0]
    partial.write_text(header + "\n" + line + "\n")
    capsys.readouterr()
    code = main(_logps_args(workdir, out, "--resume"))
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, f"--resume: {partial} line 2 is damaged; remove {partial}")
    assert partial.read_text() == header + "\n" + line + "\n" and not out.exists()


def test_a_partial_path_that_is_a_directory_is_named(workdir, tmp_path, capsys):
    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    (tmp_path / "scored.jsonl.partial").mkdir()
    for extra, message in (((), "scored.jsonl.partial exists"),
                           (("--resume",), "scored.jsonl.partial is not a regular file (a directory)")):
        code = main(_logps_args(workdir, out, *extra))
        captured = capsys.readouterr()
        _check_one_line_error(code, captured.out, captured.err, message)
    assert (tmp_path / "scored.jsonl.partial").is_dir() and not out.exists()


def test_a_file_system_without_locks_still_runs(workdir, uninterrupted, tmp_path, monkeypatch):
    """Where ``flock`` is not supported (ENOLCK on some network mounts) the run goes on unlocked."""
    import errno

    fcntl = pytest.importorskip("fcntl")
    from trainers.cli import main

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "scored.jsonl"
    assert main(_logps_args(workdir, out)) == 0
    _same_output(out, uninterrupted[".jsonl"])


def test_resume_refuses_a_partial_run_made_with_other_library_versions(workdir, tmp_path, monkeypatch, capsys):
    """An upgrade of torch (or transformers, TRL, align-losses) between the interrupted run and --resume could
    change the values: the rows of the two parts would not be those of one run."""
    from importlib import metadata

    from trainers.cli import main

    out = tmp_path / "scored.jsonl"
    _interrupt_after(monkeypatch, 1)
    assert main(_logps_args(workdir, out)) == 130
    monkeypatch.undo()
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "99.0" if name == "torch" else real(name))
    capsys.readouterr()
    code = main(_logps_args(workdir, out, "--resume"))
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, "other settings or inputs (versions ")
    assert "'torch': '99.0'" in captured.err and not out.exists()
