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
