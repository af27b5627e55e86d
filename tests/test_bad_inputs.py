"""Bad input and faults (issue #25): each case gives a clear error, raised before any work, whose message names
what was expected and what was given; or the right answer, checked against an independent reference.

The CLI's file handling and ``--resume`` are in tests/test_cli.py; the trainers' dataset checks are at the end."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import align_losses
from align_losses import losses as L


def _pairs(b=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=dtype) * 20 + 1) for _ in range(4)]


# ---------------------------------------------------------------------------------------------------------------------
# Losses: exact shapes, [B] against [B]


@pytest.mark.parametrize(
    "mutate, given",
    [
        (lambda c, r, rc, rr: (c, r, rc[:, None], rr[:, None]), r"`ref_chosen_logps` must have shape \(4,\) like `chosen_logps`; got \(4, 1\)"),
        (lambda c, r, rc, rr: (c, r[:1], rc, rr), r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(1,\)"),
        (lambda c, r, rc, rr: (c, r[:3], rc, rr), r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(3,\)"),
        (lambda c, r, rc, rr: (c[:, None], r[:, None], rc, rr), r"`chosen_logps` must have shape \[B\].*got shape \(4, 1\)"),
        (lambda c, r, rc, rr: (c, r, rc, rr[:2]), r"`ref_rejected_logps` must have shape \(4,\).*got \(2,\)"),
    ],
)
def test_dpo_refuses_mismatched_shapes(mutate, given):
    with pytest.raises(ValueError, match=given):
        L.dpo_loss(*mutate(*_pairs()))


def test_dpo_with_exact_shapes_matches_a_float64_reference():
    c, r, rc, rr = _pairs()
    out = L.dpo_loss(c, r, rc, rr, beta=0.1)
    want = -F.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-15)
    assert out.chosen_rewards.shape == (4,)


@pytest.mark.parametrize("loss", ["cpo", "simpo", "orpo"])
def test_paired_losses_refuse_mismatched_shapes(loss):
    c, r, _, _ = _pairs()
    n = torch.ones(4)
    call = {
        "cpo": lambda c, r: L.cpo_loss(c, r, cpo_alpha=0.0),
        "simpo": lambda c, r: L.simpo_loss(c, r, n, n),
        "orpo": lambda c, r: L.orpo_loss(c / 30, r / 30, nll_loss=torch.tensor(1.0)),
    }[loss]
    with pytest.raises(ValueError, match=r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(1,\)"):
        call(c, r[:1])
    with pytest.raises(ValueError, match=r"`rejected_logps` must have shape \(4,\) like `chosen_logps`; got \(4, 1\)"):
        call(c, r[:, None])


def test_kto_refuses_mismatched_shapes():
    c, _, rc, _ = _pairs()
    labels = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"`ref_logps` must have shape \(4,\) like `logps`; got \(4, 1\)"):
        L.kto_loss(c, rc[:, None], labels, torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\) like `logps`; got \(3,\)"):
        L.kto_loss(c, rc, labels[:3], torch.tensor(0.0))


def test_sft_loss_mask_must_have_the_log_probs_shape():
    logps = -torch.rand(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `token_logps`, \(3, 6\); got \(1, 6\)"):
        L.sft_loss(logps, torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `token_logps`, \(3, 6\); got \(3, 5\)"):
        L.sequence_logps(logps, torch.ones(3, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0, 0]] * 3)
    assert L.sft_loss(logps, mask).loss.item() == pytest.approx(float(-logps[:, :2].sum() / 6), abs=1e-15)


@pytest.mark.parametrize("loss", ["dpo", "kto", "cpo", "orpo"])
def test_empty_batch_is_an_error_not_nan(loss):
    e = torch.zeros(0)
    call = {
        "dpo": lambda: L.dpo_loss(e, e, e, e),
        "kto": lambda: L.kto_loss(e, e, torch.zeros(0, dtype=torch.bool), torch.tensor(0.0)),
        "cpo": lambda: L.cpo_loss(e, e, cpo_alpha=0.0),
        "orpo": lambda: L.orpo_loss(e, e, nll_loss=torch.tensor(1.0)),
    }[loss]
    with pytest.raises(ValueError, match=r"is empty \(B = 0\).*expected B >= 1"):
        call()


# ---------------------------------------------------------------------------------------------------------------------
# Losses: coefficients and labels


@pytest.mark.parametrize("beta, error, message", [
    (-0.1, ValueError, r"`beta` must be a finite number >= 0; got -0.1"),
    (float("nan"), ValueError, r"`beta` must be a finite number >= 0; got nan"),
    (float("inf"), ValueError, r"`beta` must be a finite number >= 0; got inf"),
    (True, TypeError, r"`beta` must be a real number; got True \(bool\)"),
    ("0.1", TypeError, r"`beta` must be a real number; got '0.1' \(str\)"),
])
@pytest.mark.parametrize("loss", ["dpo", "kto", "cpo", "orpo"])
def test_bad_beta_is_refused(loss, beta, error, message):
    c, r, rc, rr = _pairs()
    call = {
        "dpo": lambda: L.dpo_loss(c, r, rc, rr, beta=beta),
        "kto": lambda: L.kto_loss(c, rc, torch.tensor([1, 0, 1, 0]), torch.tensor(0.0), beta=beta),
        "cpo": lambda: L.cpo_loss(c, r, cpo_alpha=0.0, beta=beta),
        "orpo": lambda: L.orpo_loss(c / 30, r / 30, nll_loss=torch.tensor(1.0), beta=beta),
    }[loss]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard"])
def test_beta_zero_with_a_loss_that_divides_by_it(loss_type):
    c, r, rc, rr = _pairs()
    n = torch.full((4,), 3.0)
    with pytest.raises(ValueError, match=rf"`beta` must be a finite number > 0 \(loss_type \['{loss_type}'\] divides by it\); got 0"):
        L.dpo_loss(c, r, rc, rr, beta=0, loss_type=loss_type, chosen_lengths=n, rejected_lengths=n)
    with pytest.raises(ValueError, match=r"got 0.0"):
        L.check_dpo_args(loss_type, beta=0.0)
    # beta = 0 is allowed where it does not divide: the sigmoid loss is then log 2 for every pair
    assert L.dpo_loss(c, r, rc, rr, beta=0.0).loss.item() == pytest.approx(math.log(2), abs=1e-15)


def test_cpo_ipo_beta_zero():
    c, r, _, _ = _pairs()
    n = torch.full((4,), 3.0)
    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0 \(loss_type 'ipo' divides by it\); got 0"):
        L.cpo_loss(c, r, beta=0, loss_type="ipo", cpo_alpha=0.0, chosen_lengths=n, rejected_lengths=n)


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_kto_labels_other_than_0_and_1(bad):
    c, _, rc, _ = _pairs()
    labels = torch.tensor([1, 0, bad, 0])
    with pytest.raises(ValueError, match=rf"`labels` must be True/False or 0/1.*found \[{bad}"):
        L.kto_loss(c, rc, labels, torch.tensor(0.0))


def test_kto_nan_log_prob_gives_a_nan_loss_as_float64():
    """TRL's nanmean hides a NaN log-prob: a finite loss whose gradient is NaN. A float64 evaluation of the
    formula gives NaN, and so does kto_loss."""
    c, _, rc, _ = _pairs()
    c = c.clone()
    c[2] = float("nan")
    labels = torch.tensor([True, False, True, False])
    out = L.kto_loss(c, rc, labels, torch.tensor(0.5, dtype=torch.float64), beta=0.1)
    z = 0.1 * 0.5
    r = 0.1 * (c - rc)
    reference = torch.where(labels, 1 - torch.sigmoid(r - z), 1 - torch.sigmoid(z - r)).mean()
    assert math.isnan(reference.item()) and math.isnan(out.loss.item())
    c[2] = -3.0  # and without the NaN the two agree
    out = L.kto_loss(c, rc, labels, torch.tensor(0.5, dtype=torch.float64), beta=0.1)
    r = 0.1 * (c - rc)
    reference = torch.where(labels, 1 - torch.sigmoid(r - z), 1 - torch.sigmoid(z - r)).mean()
    torch.testing.assert_close(out.loss, reference, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------------
# Core: every argument checked before any work


def _head():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 8, generator=g), torch.randn(30, 8, generator=g), torch.randint(0, 30, (2, 5), generator=g)


def _no_work(monkeypatch):
    """Fail the test if the core starts gathering rows or running a backend."""
    from align_losses import core

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(core, "_labelled_positions", work)
    monkeypatch.setattr(core, "_local_head", work)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(backend_options={"memory_budget": -1}), ValueError,
     r"backend_options\['memory_budget'\] must be None or a positive int of bytes.*got -1"),
    (dict(backend_options={"memory_budget": 0}), ValueError, r"memory_budget'\].*positive int of bytes.*got 0"),
    # checked for every backend that takes it (the triton one too), before the backend is chosen
    (dict(impl="triton", backend_options={"memory_budget": -1}), ValueError, r"memory_budget'\].*got -1"),
    (dict(backend_options={"memory_budget": "512MB"}), ValueError, r"memory_budget'\].*positive int of bytes.*got '512MB'"),
    (dict(backend_options={"token_chunk": 2.5}), ValueError, r"token_chunk'\].*positive int of tokens; got 2.5"),
    (dict(backend_options={"token_chunk": True}), ValueError, r"token_chunk'\].*positive int of tokens; got True"),
    (dict(backend_options="memory_budget"), TypeError, r"backend_options must be a mapping.*got 'memory_budget'"),
    (dict(outputs=None), TypeError, r"outputs must be a tuple of names from \['entropy'.*got None"),
    (dict(process_group="world"), TypeError, r"process_group must be None or a torch.distributed.ProcessGroup.*got str"),
    (dict(process_group=0), TypeError, r"process_group must be None or a torch.distributed.ProcessGroup.*got int"),
    (dict(impl=""), ValueError, r"impl must be 'auto' or a backend name from \['auto', 'torch'.*got ''"),
    (dict(impl=None), ValueError, r"impl must be 'auto' or a backend name.*got None"),
    (dict(softcap=True), TypeError, r"softcap must be None or a positive number \(a bool is not a number\); got True"),
    (dict(temperature=True), TypeError, r"temperature must be a number \(a bool is not a number\); got True"),
    (dict(logit_scale="2"), TypeError, r"logit_scale must be a number.*got '2'"),
    (dict(temperature=1e-40), ValueError,
     r"\|logit_scale\| / temperature = 1e\+40 scales the logits beyond float32's range \(expected <= 2\*\*100.*temperature=1e-40"),
    (dict(temperature=1e-38), ValueError, r"expected <= 2\*\*100.*got temperature=1e-38"),
    (dict(logit_scale=1e38), ValueError, r"expected <= 2\*\*100.*logit_scale=1e\+38"),
    (dict(softcap=1e35, temperature=1e-5), ValueError, r"softcap / temperature = 1e\+40.*softcap=1e\+35"),
    (dict(shift="no"), TypeError, r"shift must be True or False; got 'no'"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int \(the label value of unscored tokens\); got 1.5"),
    (dict(ignore_index=None), TypeError, r"ignore_index must be an int.*got None"),
    (dict(bias=torch.zeros(30, dtype=torch.int64)), ValueError, r"bias must be a floating tensor; got torch.int64"),
])
def test_core_refuses_bad_arguments_before_any_work(monkeypatch, kwargs, error, message):
    h, w, y = _head()
    _no_work(monkeypatch)
    with pytest.raises(error, match=message):
        align_losses.linear_token_stats(h, w, y, **kwargs)


def test_hidden_size_zero(monkeypatch):
    _, _, y = _head()
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"hidden size D must be >= 1; got hidden \(2, 5, 0\) and weight \(30, 0\)"):
        align_losses.linear_logprobs(torch.randn(2, 5, 0), torch.randn(30, 0), y)


def test_a_small_temperature_within_the_bound_matches_float64_logits():
    """The bound is not too tight: temperature 1e-6 still gives the float64 reference's log-probs."""
    h, w, y = _head()
    got = align_losses.linear_logprobs(h, w, y, temperature=1e-6)
    z = (h.double() @ w.double().T) / 1e-6
    want = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2.0)  # logits of ~1e7: fp32 spacing is ~1


def test_double_backward_says_the_head_has_none():
    h, w, y = _head()
    h.requires_grad_(True)
    logps = align_losses.linear_token_stats(h, w, y, outputs=("entropy",))
    with pytest.raises(RuntimeError, match=r"fused linear head has no double backward: expected a backward without "
                                           r"create_graph=True.*got one with create_graph=True"):
        torch.autograd.grad(logps.entropy.sum(), h, create_graph=True)
    # a plain backward is unaffected and matches float64 logits
    h2 = h.detach().double().requires_grad_(True)
    ref = torch.log_softmax(h2 @ w.double().T, -1).gather(-1, y[..., None]).sum()
    ref.backward()
    logps = align_losses.linear_logprobs(h, w, y)
    logps.sum().backward()
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-5)


def test_lce_module_refuses_bad_settings_when_built():
    head = torch.nn.Linear(8, 30, bias=False)
    with pytest.raises(TypeError, match=r"softcap must be None or a positive number \(a bool is not a number\); got True"):
        align_losses.LinearCrossEntropyLoss(head, softcap=True)
    with pytest.raises(ValueError, match=r"impl must be 'auto' or a backend name.*got ''"):
        align_losses.LinearCrossEntropyLoss(head, impl="")
    with pytest.raises(ValueError, match=r"expected <= 2\*\*100.*temperature=1e-40"):
        align_losses.LinearCrossEntropyLoss(head, temperature=1e-40)
    with pytest.raises(TypeError, match=r"`label_smoothing` must be a real number; got True"):
        align_losses.LinearCrossEntropyLoss(head, label_smoothing=True)
    with pytest.raises(ValueError, match=r"z_loss must be >= 0 and finite; got nan"):
        align_losses.LinearCrossEntropyLoss(head, z_loss=float("nan"))
    with pytest.raises(TypeError, match=r"ignore_index must be an int \(the label value of unscored tokens\); got -100.0"):
        align_losses.LinearCrossEntropyLoss(head, ignore_index=-100.0)
    with pytest.raises(ValueError, match=r"memory_budget'\].*got -1"):
        align_losses.LinearCrossEntropyLoss(head, impl="torch", backend_options={"memory_budget": -1})(
            torch.randn(2, 8), torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------------------------------
# Trainers: dataset checks before TRL's tokenisation, and after it (nothing left to train on)


def _trainer(name, dataset, tokenizer, tmp_path, **overrides):
    from conftest import base_args, tiny_causal_lm

    import trainers

    trainer_cls, config_cls = {
        "dpo": (trainers.FusedDPOTrainer, trainers.FusedDPOConfig),
        "kto": (trainers.FusedKTOTrainer, trainers.FusedKTOConfig),
        "sft": (trainers.FusedSFTTrainer, trainers.FusedSFTConfig),
        "orpo": (trainers.FusedORPOTrainer, trainers.FusedORPOConfig),
    }[name]
    kwargs = dict(base_args(tmp_path, max_steps=1), max_length=64)
    kwargs.update(overrides)
    extra = {"ref_model": tiny_causal_lm(seed=1)} if name in ("dpo", "kto") else {}
    return trainer_cls(model=tiny_causal_lm(), args=config_cls(**kwargs), train_dataset=dataset,
                       processing_class=tokenizer, **extra)


def _rows(name):
    from conftest import BAD, GOOD, PROMPTS

    if name in ("dpo", "orpo"):
        return {"prompt": PROMPTS[:4], "chosen": GOOD[:4], "rejected": BAD[:4]}
    if name == "kto":
        return {"prompt": PROMPTS[:4], "completion": GOOD[:2] + BAD[:2], "label": [True, True, False, False]}
    return {"prompt": PROMPTS[:4], "completion": GOOD[:4]}


@pytest.mark.parametrize("name, column", [("dpo", "chosen"), ("dpo", "rejected"), ("kto", "completion"),
                                          ("sft", "completion"), ("orpo", "prompt")])
def test_trainers_name_the_row_and_column_of_a_null_value(name, column, tokenizer, tmp_path, monkeypatch):
    from datasets import Dataset

    rows = _rows(name)
    rows[column] = list(rows[column])
    rows[column][2] = None
    with pytest.raises(ValueError, match=rf"the train dataset has a null \(None or missing\) value in column "
                                         rf"'{column}' at row 2: expected a value in every row"):
        _trainer(name, Dataset.from_dict(rows), tokenizer, tmp_path)


def test_a_missing_key_in_a_row_is_a_null_value(tokenizer, tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "rejected": " c"}]
    with pytest.raises(ValueError, match=r"null \(None or missing\) value in column 'chosen' at row 1"):
        _trainer("dpo", Dataset.from_list(rows), tokenizer, tmp_path)


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_kto_trainer_refuses_labels_other_than_0_and_1(bad, tokenizer, tmp_path):
    from datasets import Dataset

    rows = _rows("kto")
    rows["label"] = [1, 0, bad, 0]
    with pytest.raises(ValueError, match=rf"column 'label' must hold True/False \(or 0/1\) labels.*got {bad} at row 2"):
        _trainer("kto", Dataset.from_dict(rows), tokenizer, tmp_path)


@pytest.mark.parametrize("name", ["dpo", "kto", "sft"])
def test_empty_dataset_is_refused_before_training(name, tokenizer, tmp_path):
    from datasets import Dataset

    empty = Dataset.from_dict({k: [] for k in _rows(name)})
    with pytest.raises(ValueError, match=r"the train dataset is empty: expected at least one row"):
        _trainer(name, empty, tokenizer, tmp_path)


@pytest.mark.parametrize("name", ["dpo", "kto", "sft"])
def test_max_length_shorter_than_every_prompt(name, tokenizer, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"no row of the train dataset is left after tokenisation and truncation to "
                                         r"max_length=2: expected at least one row whose prompt is shorter"):
        _trainer(name, Dataset.from_dict(_rows(name)), tokenizer, tmp_path, max_length=2)


@pytest.mark.parametrize("config, kwargs, error_match", [
    ("FusedDPOConfig", dict(lce_memory_budget="512MB"), r"`lce_memory_budget` must be None or a positive int of bytes.*got '512MB'"),
    ("FusedDPOConfig", dict(lce_memory_budget=-1), r"`lce_memory_budget` must be None or a positive int.*got -1"),
    ("FusedDPOConfig", dict(lce_token_chunk=2.5), r"`lce_token_chunk` must be None or a positive int of tokens; got 2.5"),
    ("FusedDPOConfig", dict(lce_impl=""), r"`lce_impl` must be 'auto' or a backend name.*got ''"),
    ("FusedDPOConfig", dict(beta=-0.1), r"`beta` must be a finite number >= 0; got -0.1"),
    ("FusedDPOConfig", dict(beta=float("nan")), r"`beta` must be a finite number >= 0; got nan"),
    ("FusedDPOConfig", dict(beta=0.0, loss_type="ipo"), r"`beta` must be a finite number > 0 \(loss_type \['ipo'\] divides by it\); got 0.0"),
    ("FusedDPOConfig", dict(beta=0.0, loss_type=["sigmoid", "sppo_hard"]), r"> 0 \(loss_type \['sppo_hard'\] divides by it\)"),
    ("FusedKTOConfig", dict(beta=float("inf")), r"`beta` must be a finite number >= 0; got inf"),
    ("FusedKTOConfig", dict(desirable_weight=-1.0), r"`desirable_weight` must be a finite number >= 0; got -1.0"),
    ("FusedSFTConfig", dict(lce_z_loss=float("nan")), r"`lce_z_loss` must be a finite number >= 0; got nan"),
    ("FusedSFTConfig", dict(lce_filter_mass=True), r"`lce_filter_mass` must be a probability in \(0, 1\) or None; got True"),
])
def test_configs_refuse_bad_values(config, kwargs, error_match, tmp_path):
    import trainers

    with pytest.raises(ValueError, match=error_match):
        getattr(trainers, config)(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Examples


def test_pipeline_example_without_torchrun_says_how_to_launch_it(monkeypatch, capsys):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("pipeline_parallel_example", ROOT / "examples" / "pipeline_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--loss", "sft"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "expected a launch by torchrun" in err and "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set" in err
    assert "torchrun --nproc_per_node 2" in err and "--loss sft" in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(SystemExit):
        module.main([])
    assert "expected at least 2 ranks (one pipeline stage each); got WORLD_SIZE=1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The fused losses refuse bad coefficients when built, and bad KTO labels before the head runs


def test_fused_losses_refuse_bad_beta_when_built():
    from align_losses import fused

    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0 \(loss_type \['ipo'\] divides by it\); got 0"):
        fused.FusedDPOLoss(beta=0, loss_type="ipo")
    with pytest.raises(ValueError, match=r"`beta` must be a finite number >= 0; got -1"):
        fused.FusedKTOLoss(beta=-1)
    with pytest.raises(ValueError, match=r"`undesirable_weight` must be a finite number >= 0; got nan"):
        fused.FusedKTOLoss(undesirable_weight=float("nan"))
    with pytest.raises(TypeError, match=r"`beta` must be a real number; got True"):
        fused.FusedORPOLoss(beta=True)
    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0 \(loss_type 'ipo' divides by it\); got 0.0"):
        fused.FusedCPOLoss(beta=0.0, loss_type="ipo")


def test_fused_kto_refuses_labels_other_than_0_and_1(monkeypatch):
    from align_losses import fused

    loss = fused.FusedKTOLoss(impl="torch")
    monkeypatch.setattr(type(loss), "head_pass", lambda *a, **k: pytest.fail("the head ran before the labels were checked"))
    hidden, weight = torch.randn(3, 6, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (3, 6))
    with pytest.raises(ValueError, match=r"`labels` must be True/False or 0/1.*found \[2\]"):
        loss(hidden, weight, labels, torch.tensor([1, 2, 0]), ref_logps=torch.zeros(3), kl=torch.tensor(0.0))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(cpo_alpha=-1.0), ValueError, r"`cpo_alpha` must be a finite number >= 0; got -1.0"),
    (dict(simpo_gamma=float("nan")), ValueError, r"`simpo_gamma` must be a finite number; got nan"),
    (dict(alpha=True), TypeError, r"`alpha` must be a real number; got True"),
])
def test_cpo_coefficients(kwargs, error, message):
    from align_losses import fused

    c, r, _, _ = _pairs()
    with pytest.raises(error, match=message):
        L.cpo_loss(c, r, nll_loss=torch.tensor(1.0), **kwargs)
    with pytest.raises(error, match=message):
        fused.FusedCPOLoss(**kwargs)


@pytest.mark.parametrize("cu_seqlens, given", [
    (torch.tensor([[0, 5, 10]]), "got shape (1, 3)"),
    (torch.tensor([0]), "got shape (1,)"),
    ([0, 5, 10], "got list"),
])
def test_fused_loss_names_the_cu_seqlens_given(cu_seqlens, given):
    """A malformed ``cu_seqlens`` is refused naming what was expected and what was given."""
    from align_losses.fused import FusedSFTLoss

    hidden, weight = torch.randn(1, 10, 8), torch.randn(16, 8)
    labels = torch.randint(0, 16, (1, 10))
    with pytest.raises(ValueError, match=re.escape(f"cu_seqlens must be a 1-D integer tensor [N + 1] of sequence "
                                                   f"boundaries (N >= 1); {given}")):
        FusedSFTLoss()(hidden, weight, labels, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("dpo", dict(beta=float("nan")), ValueError, "`beta` must be a finite number >= 0; got nan."),
    ("dpo", dict(beta="0.1"), TypeError, "`beta` must be a real number; got '0.1' (str)."),
    ("kto", dict(undesirable_weight=-2.0), ValueError, "`undesirable_weight` must be a finite number >= 0; got -2.0."),
    ("orpo", dict(beta=float("inf")), ValueError, "`beta` must be a finite number >= 0; got inf."),
])
def test_trainers_refuse_a_plain_trl_configs_bad_numbers_before_init(name, kwargs, error, message, tokenizer,
                                                                       tmp_path, monkeypatch):
    """A plain TRL config (not a Fused*Config, whose own checks run when it is built) is checked by the trainer
    before TRL's ``__init__``, not at the first training step."""
    from conftest import base_args, tiny_causal_lm
    from datasets import Dataset
    from trl.experimental import orpo

    import trainers
    import trl

    ours, theirs, config = {
        "dpo": (trainers.FusedDPOTrainer, trl.DPOTrainer, trl.DPOConfig),
        "kto": (trainers.FusedKTOTrainer, trl.KTOTrainer, trl.KTOConfig),
        "orpo": (trainers.FusedORPOTrainer, orpo.ORPOTrainer, orpo.ORPOConfig),
    }[name]

    def trl_init(*args, **kw):
        pytest.fail("TRL's __init__ ran before the config was checked")

    monkeypatch.setattr(theirs, "__init__", trl_init)
    args = config(**dict(base_args(tmp_path, max_steps=1), max_length=64))
    for key, value in kwargs.items():
        setattr(args, key, value)  # a config edited after it was built
    extra = {"ref_model": tiny_causal_lm(seed=1)} if name in ("dpo", "kto") else {}
    with pytest.raises(error, match=re.escape(message)):
        ours(model=tiny_causal_lm(), args=args, train_dataset=Dataset.from_dict(_rows(name)),
             processing_class=tokenizer, **extra)
