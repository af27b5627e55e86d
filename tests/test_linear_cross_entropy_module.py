"""`LinearCrossEntropyLoss` against ``F.cross_entropy`` on float64 full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from align_losses.modules import LinearCrossEntropyLoss
from reference import rel

D, V = 12, 29


def setup(seed=0, shape=(3, 7), bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(D, V, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, D, generator=g) * 2 / D**0.5)
        if bias:
            lin.bias.copy_(torch.randn(V, generator=g))
    hidden = torch.randn(*shape, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    return lin, hidden, labels


def reference(lin, hidden, labels, *, reduction="mean", shift=False, label_smoothing=0.0, z_loss=0.0):
    """Float64 full logits -> F.cross_entropy (+ z-loss), shaped like labels for "none"."""
    z = hidden.double() @ lin.weight.double().T
    if lin.bias is not None:
        z = z + lin.bias.double()
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], -1)
    keep = labels != -100
    per_token = F.cross_entropy(
        z.reshape(-1, V), labels.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).view(labels.shape)
    per_token = per_token + z_loss * torch.logsumexp(z, -1).square() * keep
    if reduction == "none":
        return per_token
    return per_token.sum() / (keep.sum() if reduction == "mean" else 1)


def check(got, want, leaves):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel(got, want) < 1e-5
    up = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).view(got.shape)
    ours = torch.autograd.grad((got.double() * up).sum(), leaves)
    theirs = torch.autograd.grad((want * up).sum(), leaves)
    for a, b in zip(ours, theirs):
        assert rel(a, b) < 1e-4


CASES = {
    "plain": {},
    "shift": dict(shift=True),
    "smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=1e-2),
    "all": dict(shift=True, label_smoothing=0.1, z_loss=0.05),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_cross_entropy(case, reduction):
    lin, hidden, labels = setup(seed=len(case))
    loss = LinearCrossEntropyLoss(lin, reduction=reduction, **CASES[case])
    leaves = [hidden, lin.weight, lin.bias]
    check(loss(hidden, labels), reference(lin, hidden, labels, reduction=reduction, **CASES[case]), leaves)


def test_reads_swapped_weight_each_call():
    lin, hidden, labels = setup(seed=1)
    loss = LinearCrossEntropyLoss(lin)
    before = loss(hidden, labels)
    lin.weight = nn.Parameter(torch.randn(V, D))  # FSDP / PEFT style swap of the parameter
    after = loss(hidden, labels)
    assert not torch.allclose(before, after)
    assert rel(after, reference(lin, hidden, labels)) < 1e-5
    (grad,) = torch.autograd.grad(after, [lin.weight])  # gradient lands on the new parameter
    assert grad.abs().sum() > 0


def test_head_without_bias_and_not_registered():
    class Head(nn.Module):  # anything with .weight (and no .bias)
        def __init__(self, weight):
            super().__init__()
            self.weight = nn.Parameter(weight)

    lin, hidden, labels = setup(seed=2, bias=False)
    head = Head(lin.weight.detach().clone())
    loss = LinearCrossEntropyLoss(head, reduction="sum")
    assert loss.output_embeddings is head
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    check(loss(hidden, labels), reference(lin, hidden, labels, reduction="sum"), [hidden])


def test_pytorch_alias_chunk_size_and_num_items():
    lin, hidden, labels = setup(seed=3, shape=(2, 9))
    want = reference(lin, hidden, labels, shift=True)
    for kwargs in (dict(impl="pytorch"), dict(impl="torch", chunk_size=4), dict(impl="pytorch", chunk_size=1)):
        assert rel(LinearCrossEntropyLoss(lin, shift=True, **kwargs)(hidden, labels), want) < 1e-5
    loss = LinearCrossEntropyLoss(lin, chunk_size=5)
    assert loss.backend_options == {"token_chunk": 5}
    total = reference(lin, hidden, labels, reduction="sum")
    assert rel(loss(hidden, labels, num_items_in_batch=40), total / 40) < 1e-5


def test_shift_and_outputs_are_passed_to_the_core(monkeypatch):
    """The core shifts the labels (``shift=True``) and computes only the outputs the settings need."""
    import align_losses.modules as modules

    calls = []
    core = modules.linear_token_stats

    def recording(hidden, weight, labels, **kwargs):
        calls.append((labels, kwargs))
        return core(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(modules, "linear_token_stats", recording)
    lin, hidden, labels = setup(seed=6)
    LinearCrossEntropyLoss(lin, shift=True, z_loss=0.1)(hidden, labels)
    LinearCrossEntropyLoss(lin, label_smoothing=0.1, z_loss=0.1)(hidden, labels)
    (first, first_kwargs), (second, second_kwargs) = calls
    assert first is labels and first_kwargs["shift"] is True and first_kwargs["outputs"] == ("logsumexp",)
    assert second_kwargs["shift"] is False and second_kwargs["outputs"] == ("mean_logit", "logsumexp")


def test_none_is_zero_where_not_scored():
    lin, hidden, labels = setup(seed=7)
    out = LinearCrossEntropyLoss(lin, shift=True, reduction="none", label_smoothing=0.2, z_loss=0.1)(hidden, labels)
    assert (out[..., -1] == 0).all() and (out[..., :-1][labels[..., 1:] == -100] == 0).all()


def test_all_ignored_gives_zero():
    lin, hidden, labels = setup(seed=4)
    labels = torch.full_like(labels, -100)
    out = LinearCrossEntropyLoss(lin)(hidden, labels)
    assert out.item() == 0.0
    out.backward()
    assert hidden.grad.abs().sum() == 0


def test_errors():
    lin, hidden, labels = setup(seed=5)
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(lin, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        LinearCrossEntropyLoss(lin, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        LinearCrossEntropyLoss(lin, chunk_size=4, backend_options={"token_chunk": 8})
    with pytest.raises(ValueError, match="label_smoothing"):
        LinearCrossEntropyLoss(lin, label_smoothing=1.5)
    with pytest.raises(ValueError, match="token_chunk"):  # another backend rejects the torch backend's option
        LinearCrossEntropyLoss(lin, impl="cce", chunk_size=4)(hidden, labels)
    with pytest.raises(ValueError, match="unknown impl"):
        LinearCrossEntropyLoss(lin, impl="nope")(hidden, labels)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        LinearCrossEntropyLoss(lin, reduction="sum")(hidden, labels, num_items_in_batch=3)
    with pytest.raises(ValueError, match="no `.weight`"):
        LinearCrossEntropyLoss(nn.Identity())(hidden, labels)
