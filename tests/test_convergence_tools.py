"""The convergence tooling on CPU: corpus (determinism, split, lossless token stream, step-indexed batches),
pretraining runs (loss heads agree, a run stopped and resumed equals one that was not), DPO pairs, the report's
comparisons, and head.py's captured input (distribution statistics, shape, validation)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import captured_head  # noqa: E402
import convergence  # noqa: E402
import convergence_report  # noqa: E402
import corpus as corpus_mod  # noqa: E402

WORDS = ("def", "return", "self", "value", "tensor", "import", "class", "None", "shape", "index", "for", "in", "if")


def _write_package(root: Path, name: str, files: int = 16, seed: int = 0) -> None:
    """A fake importable package of Python-like files in a few folders."""
    rng = random.Random(seed)
    pkg = root / name
    for i in range(files):
        folder = pkg / f"sub{i % 4}" if i % 4 else pkg
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").touch()
        lines = [f"def f{i}_{j}(x):\n    return {' '.join(rng.choice(WORDS) for _ in range(8))}\n" for j in range(30)]
        (folder / f"m{i}.py").write_text(f'"""Module {i}: ünïcode docstring."""\n' + "\n".join(lines))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    _write_package(root, "convfakepkg")
    sys.path.insert(0, str(root))
    try:
        kw = dict(packages=["convfakepkg"], vocab=300, heldout_permille=200, max_file_bytes=1 << 20,
                  tokenizer_bytes=1 << 20, split="file")
        a = corpus_mod.build(root / "a", **kw)
        b = corpus_mod.build(root / "b", **kw)
        yield root, a, b, kw
    finally:
        sys.path.remove(str(root))


def test_corpus_is_deterministic_and_split(built):
    root, a, b, _ = built
    for key in ("train_sha256", "heldout_sha256", "tokenizer_sha256", "train_tokens", "heldout_tokens"):
        assert a[key] == b[key], key
    assert a["train_files"] > 0 and a["heldout_files"] > 0
    assert a["train_files"] + a["heldout_files"] + a["skipped"]["empty"] + a["skipped"]["not_utf8"] == a["files"]
    assert a["vocab_size"] == 300 and a["eos_id"] == 0
    # by directory: siblings stay together; by file: the key itself decides
    assert corpus_mod.is_heldout("p/x/a.py", 500, "dir") == corpus_mod.is_heldout("p/x/b.py", 500, "dir")
    assert sum(corpus_mod.is_heldout(f"p/f{i}.py", 200, "file") for i in range(2000)) in range(300, 500)


def test_token_stream_decodes_to_the_files(built):
    root, manifest, _, kw = built
    from tokenizers import Tokenizer

    c = corpus_mod.Corpus(root / "a")
    tok = Tokenizer.from_file(str(root / "a" / "tokenizer.json"))
    files, _, _ = corpus_mod.list_files(kw["packages"], kw["max_file_bytes"])
    texts = [corpus_mod.read_text(p) for key, p in files if not corpus_mod.is_heldout(key, kw["heldout_permille"], "file")]
    texts = [t for t in texts if t.strip()]
    ids = c.train.tolist()
    docs, cur = [], []
    for i in ids:
        if i == manifest["eos_id"]:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert docs == texts  # byte-level BPE: lossless, every file then EOS, in order
    # the HF tokenizer for the trainers encodes the same way
    hf = corpus_mod.load_hf_tokenizer(root / "a")
    assert hf(texts[0], add_special_tokens=False)["input_ids"] == tok.encode(texts[0]).ids
    assert hf.eos_token == corpus_mod.EOS and hf.pad_token_id == manifest["eos_id"]


def test_batches_depend_on_the_step_alone(built):
    root = built[0]
    c1, c2 = corpus_mod.Corpus(root / "a"), corpus_mod.Corpus(root / "a")
    seq, rows = 16, 4
    n = c1.windows(seq)
    per_epoch = n // rows
    assert per_epoch >= 2
    assert (c1.batch(1, rows, seq, 7) == c2.batch(1, rows, seq, 7)).all()
    assert not (c1.batch(0, rows, seq, 7) == c1.batch(1, rows, seq, 7)).all()
    assert not (c1.batch(0, rows, seq, 7) == c1.batch(0, rows, seq, 8)).all()
    # within an epoch no window repeats; the next epoch is another permutation of the same windows
    order = c1.order(seq, 0, 7)
    assert sorted(order.tolist()) == list(range(n))
    for s in (0, per_epoch - 1):
        want = [c1.train[i * seq: (i + 1) * seq].tolist() for i in order[s * rows: (s + 1) * rows]]
        assert c1.batch(s, rows, seq, 7).tolist() == want
    nxt = c1.order(seq, 1, 7)
    assert nxt.tolist() != order.tolist()
    assert c1.batch(per_epoch, rows, seq, 7).tolist() == [c1.train[i * seq: (i + 1) * seq].tolist() for i in nxt[:rows]]
    held = c1.heldout_windows(3, seq)
    assert held.shape[1] == seq and held.shape[0] == min(3, c1.heldout.size // seq)


def test_lr_schedule_and_parameter_count():
    s = dict(convergence.DEFAULTS)
    assert convergence.lr_at(0, s) == pytest.approx(s["lr"] / s["warmup"])
    assert convergence.lr_at(s["warmup"] - 1, s) == pytest.approx(s["lr"])
    assert convergence.lr_at(s["warmup"], s) == pytest.approx(s["lr"])
    assert convergence.lr_at(s["steps"], s) == pytest.approx(s["min_lr"])
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = {**convergence.QUICK_MODEL, "vocab_size": 500}
    model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    assert convergence.count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    big = convergence.count_params({**convergence.MODEL, "vocab_size": 32768})["total"]
    assert 100e6 <= big <= 150e6  # the "about 100-150M parameters"


def test_loss_heads_agree_on_cpu():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{**convergence.QUICK_MODEL, "vocab_size": 300}))
    ids = torch.randint(0, 300, (2, 24))
    out = {}
    for impl in ("full", "ours"):
        model.zero_grad()
        loss = convergence.head_loss_fn(impl, "cpu")(model, ids)
        loss.backward()
        out[impl] = (loss.detach(), model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone())
    for a, b in zip(out["full"], out["ours"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="CUDA"):
        convergence.head_loss_fn("liger", "cpu")


def _run_args(root: Path, *extra):
    return ["--quick", "--work", str(root / "work"), "--corpus", str(root / "a"), "--results", str(root / "res"),
            "--steps", "3", "--seq-len", "16", "--batch", "4", "--micro-batch", "2", "--eval-every", "2",
            "--eval-windows", "2", *extra]


def test_stopped_and_resumed_run_equals_uninterrupted(built, tmp_path):
    root = built[0]
    work = tmp_path
    (work / "a").symlink_to(root / "a")
    assert convergence.main(_run_args(work, "--run", "ours", "--time-limit", "0")) == 0
    path = work / "res" / "convergence-run-ours-quick.json"
    whole = json.loads(path.read_text())
    assert whole["status"] == "done" and whole["steps_done"] == 3
    # a time limit already spent: every call stops after one step with a checkpoint, the next resumes
    calls = 0
    while True:
        calls += 1
        # the first call by --time-limit, the next by a --deadline already past (the call's own limit)
        limit = ["--restart", "--time-limit", "1e-9"] if calls == 1 else ["--time-limit", "0", "--deadline", "1"]
        assert convergence.main(_run_args(work, "--run", "ours", *limit)) == 0
        part = json.loads(path.read_text())
        if part["status"] == "done":
            break
        assert calls < 5
    assert calls == 3 and len(part["segments"]) == 3
    assert part["history"]["loss"] == whole["history"]["loss"]
    assert part["history"]["heldout_loss"] == whole["history"]["heldout_loss"]
    assert part["history"]["heldout_step"] == [0, 2, 3]
    # a finished run is not run again; other settings are refused
    assert convergence.main(_run_args(work, "--run", "ours")) == 0
    with pytest.raises(SystemExit, match="other settings"):
        convergence.main(_run_args(work, "--run", "ours", "--lr", "0.01"))
    with pytest.raises(SystemExit, match="eval_every"):  # another held-out metric would share the curve
        convergence.main(_run_args(work, "--run", "ours", "--eval-every", "3"))
    # the finished run names its weights, as the checkpoint does, and a capture longer than training is refused
    final = torch.load(work / "work" / "quick" / "ours" / "final.pt", weights_only=False)
    assert part["weights_sha256"] == final["weights_sha256"] == convergence.weights_sha(final["model"])
    with pytest.raises(SystemExit, match="longer than the 16 tokens"):
        convergence.main(_run_args(work, "--capture", "--base", "ours", "--capture-seq", "17"))
    assert convergence.main(_run_args(work, "--capture", "--base", "ours", "--capture-seq", "16")) == 0
    cap = torch.load(work / "work" / "captured-quick.pt", weights_only=False)
    assert cap["hidden"].shape[1] == 16 and cap["meta"]["base_weights_sha256"] == final["weights_sha256"]


def test_weights_sha_follows_every_byte():
    state = {"a.weight": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "step": torch.tensor(7)}
    first = convergence.weights_sha(state)
    assert first == convergence.weights_sha({k: v.clone() for k, v in reversed(state.items())})
    state["b"][2] = state["b"][2] + 1
    assert convergence.weights_sha(state) != first
    assert convergence.weights_sha({"a.weight": state["a.weight"], "c": state["b"]}) != convergence.weights_sha(state)


def test_preference_pairs(built):
    root = built[0]
    c = corpus_mod.Corpus(root / "a")
    s = {**convergence.DEFAULTS, **convergence.QUICK, "ft_prompt": 8, "ft_completion": 20, "ft_corrupt": 0.25}
    pairs, windows = convergence.preference_pairs(c, s, 5, seed=3)
    assert len(pairs) == 5 and windows >= 1
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "a" / "tokenizer.json"))
    doc = c.heldout_documents(28, 1)[0]
    assert pairs[0]["prompt"] == tok.decode(doc[:8].tolist())  # real held-out text ...
    assert pairs[0]["chosen"] == tok.decode(doc[8:28].tolist())  # ... and its real continuation
    for p in pairs:
        assert p["chosen"] != p["rejected"]


def test_report_comparisons():
    base, noise = [3.0, 2.5, 2.0, 1.8], [3.1, 2.4, 2.1, 1.85]
    c = convergence_report.compare_series([3.05, 2.5, 2.2, 1.81], base, noise)
    assert c["within"] == 3 and c["points"] == 4  # 0.2 > 0.1 at the third point
    assert c["max_abs_diff"] == pytest.approx(0.2)
    assert convergence_report.window_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5]
    assert convergence_report.compare_series([1.0], [1.0], None).get("within") is None
    # A noise run still going: the differences over every point, the spread over its prefix only.
    c = convergence_report.compare_series([3.05, 2.5, 2.2, 1.81], base, noise[:2])
    assert c["points"] == 4 and c["spread_points"] == 2 and c["within"] == 2
    assert c["max_abs_diff"] == pytest.approx(0.2) and c["rms_ratio"] == pytest.approx(
        (0.05 ** 2 / 2) ** 0.5 / ((0.1 ** 2 + 0.1 ** 2) / 2) ** 0.5)
    held = convergence_report.heldout_series({"heldout_step": [0, 10, 20, 30], "heldout_loss": [9, 3.0, 2.2, 2.0]},
                                             {"heldout_step": [0, 10, 20, 30], "heldout_loss": [9, 3.1, 2.0, 2.0]},
                                             {"heldout_step": [0, 10], "heldout_loss": [9, 3.3]})
    assert held["at"] == [10, 20, 30] and held["spread_points"] == 1 and held["within"] == 1
    assert held["max_abs_diff"] == pytest.approx(0.2)


def test_captured_distribution_stats():
    V, D = 64, 8
    h = torch.randn(2, 6, D)
    labels = torch.randint(0, V, (2, 6))
    labels[:, :2] = -100
    flat = captured_head.distribution_stats(h, torch.zeros(V, D), labels)
    assert flat["tokens"] == 8
    assert flat["entropy_mean"] == pytest.approx(math.log(V), rel=1e-5)
    assert flat["top1_mass_mean"] == pytest.approx(1 / V, rel=1e-4)
    assert flat["top10_mass_mean"] == pytest.approx(10 / V, rel=1e-4)
    assert flat["label_nll_mean"] == pytest.approx(math.log(V), rel=1e-5)
    # one token far above the rest: no entropy, all the mass on top-1
    w = torch.zeros(V, D)
    w[5] = 100.0
    hp = torch.ones(2, 6, D)
    peaky = captured_head.distribution_stats(hp, w, labels)
    assert peaky["entropy_mean"] < 1e-3 and peaky["top1_mass_mean"] > 0.999
    mid = {**flat, "entropy_mean": 1.0, "top1_mass_mean": 0.9}
    line = captured_head.closest_regime({"flat": flat, "peaky": peaky, "captured": mid})
    assert "mean entropy 1.000: nearest peaky" in line and "between the synthetic regimes" in line
    assert "top-1 mass 0.900: nearest peaky" in line


def test_head_captured_input(tmp_path, capsys):
    import head

    V, D, rows, seq = 50, 16, 2, 32
    path = tmp_path / "cap.pt"
    torch.save({"hidden": torch.randn(rows, seq, D).bfloat16(), "weight": torch.randn(V, D).bfloat16(),
                "labels": torch.randint(0, V, (rows, seq)), "meta": {"base": "full-seed0", "step": 3}}, path)
    assert head.main(["--device", "cpu", "--captured", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "captured: 2 rows x 32" in plan and "'captured'" in plan
    args = head.build_parser().parse_args(["--device", "cpu", "--captured", str(path), "--logits", "captured"])
    assert head.validate(args)["logits"] == ["captured"]
    bad = tmp_path / "bad.pt"
    torch.save({"hidden": torch.randn(3, seq, D), "weight": torch.randn(V, D),
                "labels": torch.randint(0, V, (3, seq))}, bad)
    with pytest.raises(ValueError, match="even"):
        captured_head.load(bad)


def _pretrain_file(name: str, heldout: dict, loss: list, corpus: str = "c0", **settings) -> dict:
    impl, seed = convergence.RUNS[name]
    s = {k: 1 for k in convergence_report.SAME_SETTINGS}
    s.update(steps=len(loss), batch=4, seq_len=8, model={"hidden_size": 8}, **settings)
    seg = {"from_step": 0, "to_step": len(loss), "date": "d", "commit": "c", "device": "cpu", "wall_s": 1.0}
    return {"kind": "pretrain", "run": name, "impl": impl, "head": impl, "seed": seed, "status": "done",
            "steps_done": len(loss), "settings": s, "params": {"total": 1e6},
            "corpus": {"train_sha256": corpus * 8, "train_tokens": 1, "heldout_tokens": 1, "vocab_size": 9,
                       "versions": {}},
            "segments": [seg], "date": "d", "commit": "c", "device": "cpu", "weights_sha256": None,
            "history": {"step": list(range(1, len(loss) + 1)), "loss": loss, "step_ms": [1.0] * len(loss),
                        "heldout_step": list(heldout), "heldout_loss": list(heldout.values())}}


def _finetune_file(name: str, base_sha: str, base: str = "full-seed0") -> dict:
    return {"kind": "finetune", "run": name, "trainer": name, "algo": name.split("-")[1],
            "settings": {"ft_steps": 2, "ft_batch": 1, "ft_prompt": 1, "ft_completion": 1, "ft_lr": 1.0, "ft_beta": 0.1,
                         "ft_corrupt": 0.25, "ft_smoothing": 0.1},
            "base": base, "base_step": 4, "base_weights_sha256": base_sha, "base_session": {},
            "corpus": {"train_sha256": "c0" * 8, "train_tokens": 1, "heldout_tokens": 1, "vocab_size": 9,
                       "versions": {}},
            "pairs": 2, "heldout_windows": 2, "date": "d", "commit": "c", "device": "cpu", "wall_s": 1.0,
            "step_ms": [1.0, 1.0], "curves": {"loss": [0.7, 0.6]}}


def test_report_leaves_out_what_cannot_be_compared(tmp_path):
    import argparse

    res = tmp_path / "res"
    res.mkdir()
    loss = [3.0 - 0.01 * i for i in range(80)]
    files = {
        "full-seed0": _pretrain_file("full-seed0", {0: 5.0, 40: 3.0, 80: 2.0}, loss),
        # evaluated at other steps: compared at the steps both have, never at step 0
        "ours": _pretrain_file("ours", {0: 5.0, 20: 3.5, 40: 3.01, 80: 2.02}, [x + 0.001 for x in loss]),
        "cce": _pretrain_file("cce", {0: 5.0, 80: 2.0}, loss, corpus="c1"),  # another corpus
        "liger": _pretrain_file("liger", {0: 5.0, 80: 2.0}, loss, lr=2),  # another setting
    }
    for name, data in files.items():
        (res / f"convergence-run-{name}.json").write_text(json.dumps(data))
    for name, sha in (("trl-dpo", "aa"), ("fused-dpo", "bb"), ("trl-sft", "aa"), ("fused-sft", "aa")):
        (res / f"convergence-finetune-{name}.json").write_text(json.dumps(_finetune_file(name, sha)))
    args = argparse.Namespace(results=str(res), out=str(tmp_path / "out"), quick=False, commit="x", name=None)
    assert convergence_report.report(args) == 0
    rep = json.loads((tmp_path / "out" / "convergence-latest.json").read_text())
    assert set(rep["runs"]) == {"full-seed0", "ours"}
    warnings = " ".join(rep["warnings"])
    assert "cce left out: made on another corpus" in warnings and "liger left out: made on other settings (lr)" in warnings
    held = rep["comparisons"]["pretrain"]["heldout"]["ours"]
    assert held["at"] == [40, 80] and held["diff"] == pytest.approx([0.01, 0.02])
    assert "within" not in held  # no full-seed1: no spread to be within
    assert set(rep["comparisons"]["finetune"]) == {"sft"}  # the DPO pair started from other weights
    assert "trl-dpo and fused-dpo did not start from the same recorded base weights" in warnings
    md = (tmp_path / "out" / "convergence-latest.md").read_text()
    assert "(no full-seed1 to compare with)" in md and "(the noise itself)" not in md


def test_report_warns_of_finetunes_from_another_sessions_base(tmp_path):
    """Finetunes start from a run's final weights (full-seed0 or ours): a base hash unlike that run's shown
    curve means they continued another session's run, and the report says so, whichever run the base was."""
    import argparse

    res = tmp_path / "res"
    res.mkdir()
    loss = [3.0 - 0.01 * i for i in range(40)]
    for name in ("full-seed0", "ours"):
        data = _pretrain_file(name, {0: 5.0, 40: 2.0}, loss)
        data["weights_sha256"] = f"{name}-final"
        (res / f"convergence-run-{name}.json").write_text(json.dumps(data))
    for name, base, sha in (("trl-dpo", "ours", "ours-final"), ("fused-dpo", "ours", "ours-final"),
                            ("trl-sft", "ours", "older"), ("fused-sft", "full-seed0", "full-seed0-final")):
        (res / f"convergence-finetune-{name}.json").write_text(json.dumps(_finetune_file(name, sha, base)))
    args = argparse.Namespace(results=str(res), out=str(tmp_path / "out"), quick=False, commit="x", name=None)
    assert convergence_report.report(args) == 0
    warnings = json.loads((tmp_path / "out" / "convergence-latest.json").read_text())["warnings"]
    assert [w for w in warnings if "than the curve shown" in w] == [
        "trl-sft started from another ours than the curve shown (another session's run)"]
