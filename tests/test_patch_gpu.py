"""`apply_fused_head` on CUDA (``impl="auto"``: the ``triton`` backend) in bf16: the loss and the gradients no
further from the fp32 unpatched model's than the unpatched model's own in bf16 (which rounds its logits to
bf16), and the head's forward never run with labels."""

from __future__ import annotations

import copy

import pytest
import torch

from test_patch import HeadCalls, batch, tiny_family
from trainers import apply_fused_head, fused_head_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _loss_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "qwen3_moe", "gpt2"])
def test_bf16_on_cuda_at_least_as_close_as_the_model(family):
    exact = tiny_family(family).cuda()
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda())
    ref_loss, ref_grad = _loss_grads(exact, inputs)
    theirs = copy.deepcopy(exact).to(torch.bfloat16)
    ours = apply_fused_head(copy.deepcopy(exact).to(torch.bfloat16))
    assert fused_head_backend(ours) == "triton"
    calls = HeadCalls(ours)
    loss_t, grad_t = _loss_grads(theirs, inputs)
    loss_o, grad_o = _loss_grads(ours, inputs)
    assert calls.count == 0
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert err(loss_o, ref_loss) <= max(1.5 * err(loss_t, ref_loss), 2e-3), (err(loss_o, ref_loss), err(loss_t, ref_loss))
    assert err(grad_o, ref_grad) <= max(1.5 * err(grad_t, ref_grad), 2e-2), (err(grad_o, ref_grad), err(grad_t, ref_grad))
