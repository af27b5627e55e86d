"""Bad input is refused before any work, with a message that names what was expected."""

from __future__ import annotations

import pytest
import torch

import align_losses


def _ok():
    return torch.randn(2, 5, 8), torch.randn(30, 8), torch.randint(0, 30, (2, 5))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, w, y: (h, torch.randn(30, 7), y), r"hidden size mismatch.*expected \[V, 8\]"),
        (lambda h, w, y: (h, w, y[:, :4]), r"labels must have shape hidden.shape\[:-1\] = \(2, 5\)"),
        (lambda h, w, y: (h, w, y.float()), "labels must be an integer tensor"),
        (lambda h, w, y: (h, w, torch.where(y == y[0, 0], 30, y)), r"labels must be in \[0, 30\).*\[30"),
        (lambda h, w, y: (h, w, torch.where(y == y[0, 0], -1, y)), r"labels must be in \[0, 30\) or equal ignore_index=-100"),
        (lambda h, w, y: (h, w.double(), y), "share a floating dtype"),
        (lambda h, w, y: (h, w[0], y), r"expected hidden \[..., D\] and weight \[V, D\]"),
    ],
)
def test_bad_inputs(mutate, message):
    h, w, y = mutate(*_ok())
    with pytest.raises(ValueError, match=message):
        align_losses.linear_logprobs(h, w, y)


def test_bad_options():
    h, w, y = _ok()
    with pytest.raises(ValueError, match="unknown impl 'fast'.*'torch'"):
        align_losses.linear_logprobs(h, w, y, impl="fast")
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(30,\)"):
        align_losses.linear_logprobs(h, w, y, bias=torch.zeros(29))
    with pytest.raises(ValueError, match="bias must be on the weight's device cpu; got meta"):
        align_losses.linear_logprobs(h, w, y, bias=torch.zeros(30, device="meta"))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        align_losses.linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        align_losses.linear_logprobs(h, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap must be None or > 0 and finite"):
        align_losses.linear_logprobs(h, w, y, softcap=float("inf"))
    with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
        align_losses.linear_logprobs(h, w, y, temperature=float("nan"))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        align_losses.linear_logprobs(h, w, y, logit_scale=float("nan"))
    with pytest.raises(ValueError, match=r"outputs must be a sequence of names, e.g. \('entropy',\)"):
        align_losses.linear_token_stats(h, w, y, outputs="entropy")
    with pytest.raises(ValueError, match=r"unknown outputs \['entropie'\]"):
        align_losses.linear_token_stats(h, w, y, outputs=("entropie",))
    with pytest.raises(ValueError, match="impl 'torch' does not support option 'chunk'"):
        align_losses.linear_logprobs(h, w, y, impl="torch", backend_options={"chunk": 3})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_label_dtypes_score_every_id(dtype):
    """-100 wraps to 156 in uint8: the labels are compared as int64, so id 156 is scored, not ignored."""
    h, w = torch.randn(2, 5, 8), torch.randn(200, 8)
    y = torch.tensor([[156, 3, 7, 156, 1], [0, 156, 2, 9, 199]])
    want = align_losses.linear_logprobs(h, w, y)
    got = align_losses.linear_logprobs(h, w, y.to(dtype))
    assert torch.equal(got, want) and (got != 0).all()
    assert torch.equal(align_losses.linear_logprobs(h, w, y.to(dtype), shift=True),
                       align_losses.linear_logprobs(h, w, y, shift=True))


def test_labels_beyond_the_vocabulary_are_checked_after_the_shift():
    h, w, y = _ok()
    y[:, 0] = 99  # dropped by the shift: position t scores labels[t + 1]
    align_losses.linear_logprobs(h, w, y, shift=True)
    with pytest.raises(ValueError, match="labels must be in"):
        align_losses.linear_logprobs(h, w, y)


@pytest.mark.parametrize("ignore_index", [0, 29, -1, 30])
def test_label_range_with_ignore_index_inside_or_outside_the_vocabulary(ignore_index):
    """The count and range check hold whether ignore_index is a vocabulary id or not."""
    h, w, y = _ok()
    y[0, :2] = ignore_index
    got = align_losses.linear_logprobs(h, w, y, ignore_index=ignore_index)
    labelled = y != ignore_index
    assert bool((got[~labelled] == 0).all()) and bool((got[labelled] < 0).all())
    y[1, 3] = -2
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 30\) or equal ignore_index={ignore_index}; found \[-2\]"):
        align_losses.linear_logprobs(h, w, y, ignore_index=ignore_index)
    y[1, 3] = 31
    with pytest.raises(ValueError, match=r"found \[31\]"):
        align_losses.linear_logprobs(h, w, y, ignore_index=ignore_index)


def test_backend_is_checked_before_any_work(monkeypatch):
    """An unknown or unable backend fails before labels are checked, tokens gathered or heads gathered."""
    from align_losses import core

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the backend was checked")

    monkeypatch.setattr(core, "_local_head", no_work)
    monkeypatch.setattr(core, "_labelled_positions", no_work)
    h, w, y = _ok()
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        align_losses.linear_logprobs(h, w, y, impl="fast")
    with pytest.raises(ValueError, match="impl 'cce' does not support device 'cpu'"):
        align_losses.linear_logprobs(h, w, y, impl="cce")
    with pytest.raises(ValueError, match="does not support option 'chunk'"):
        align_losses.linear_logprobs(h, w, y, backend_options={"chunk": 3})
