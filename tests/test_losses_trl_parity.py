"""Our losses against TRL 1.16's own trainer math, run on CPU on the same inputs.

The trainers are built with ``object.__new__`` (no model, no dataset) and given just the attributes
their loss code reads; a stand-in model returns fixed per-token log-probs the way TRL's fused LM head
does (zero where the label is ignored). Slow to import (transformers), hence its own file.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow  # importing TRL (transformers, accelerate) takes seconds
trl = pytest.importorskip("trl")
from trl import DPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from transformers.trainer_pt_utils import LabelSmoother  # noqa: E402

from align_losses.losses import (  # noqa: E402
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    ld_sequence_logps,
    orpo_loss,
    sequence_logps,
    sft_loss,
    wpo_weights,
)

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-7), torch.float32: dict(rtol=1e-5, atol=1e-7)}
BETA = 0.3
ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


class FixedOutputsModel:
    """Stands in for a model patched with TRL's fused LM head: returns preset per-token outputs."""

    training = True

    def __init__(self, outputs_by_input: dict[int, SimpleNamespace]):
        self.outputs_by_input = outputs_by_input

    def __call__(self, input_ids, **kwargs):
        return self.outputs_by_input[id(input_ids)]


def fused_outputs(log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None) -> SimpleNamespace:
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(
        log_probs=log_probs,
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
        log_sum_sq_probs=log_sum_sq_probs,
    )


def trainer_shell(cls, **attrs):
    trainer = object.__new__(cls)
    defaults = dict(
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        precompute_ref_logps=True,
    )
    for name, value in {**defaults, **attrs}.items():
        setattr(trainer, name, value)
    return trainer


def completion_batch(batch: int, seq: int, dtype: torch.dtype, seed: int):
    """Token log-probs ``[batch, seq - 1]`` of random completions after random prompts, zero off-completion."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (batch, 1), generator=g)
    length = torch.randint(1, seq - 4, (batch, 1), generator=g)
    position = torch.arange(seq).unsqueeze(0)
    completion_mask = ((position >= prompt) & (position < prompt + length)).long()
    shifted = completion_mask[:, 1:].bool()
    # Drawn in float64 whatever the dtype, so that both precisions see the same values.
    token_logps = (-torch.rand(batch, seq - 1, generator=g, dtype=torch.float64) * 3 * shifted).to(dtype)
    log_sum_sq = (-torch.rand(batch, seq - 1, generator=g, dtype=torch.float64) * 2 * shifted).to(dtype)
    return completion_mask, shifted, token_logps, log_sum_sq


def run_trl_dpo(
    dtype, loss_types, *, seed=0, ld_alpha=None, use_weighting=False, loss_weights=None, ref_chosen_shift=0.0, **config
):
    batch, seq = 5, 12
    completion_mask, shifted, token_logps, log_sum_sq = completion_batch(2 * batch, seq, dtype, seed)
    # A reference a few nats away from the policy, so that every loss type stays in its finite range.
    g = torch.Generator().manual_seed(seed + 1)
    noise = (4 * torch.rand(2 * batch, generator=g, dtype=torch.float64) - 2).to(dtype)
    ref_chosen, ref_rejected = (token_logps.sum(-1) + noise).chunk(2)
    ref_chosen = ref_chosen + ref_chosen_shift
    input_ids = torch.zeros(2 * batch, seq, dtype=torch.long)
    model = FixedOutputsModel({id(input_ids): fused_outputs(token_logps, log_sum_sq)})
    settings = dict(
        beta=BETA,
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        discopop_tau=0.05,
    )
    settings.update(config)
    trainer = trainer_shell(
        DPOTrainer,
        model=model,
        args=SimpleNamespace(discopop_tau=settings.pop("discopop_tau")),
        loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types),
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        **settings,
    )
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        completion_mask=completion_mask,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    chosen_tokens, rejected_tokens = token_logps.chunk(2)
    chosen_mask, rejected_mask = shifted.chunk(2)
    if ld_alpha is None:
        chosen, rejected = sequence_logps(chosen_tokens, chosen_mask), sequence_logps(rejected_tokens, rejected_mask)
    else:
        chosen, rejected = ld_sequence_logps(
            chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, ld_alpha=ld_alpha
        )
    weights = None
    if use_weighting:
        chosen_p2, rejected_p2 = log_sum_sq.chunk(2)
        weights = wpo_weights(chosen_tokens, chosen_p2, chosen_mask, rejected_tokens, rejected_p2, rejected_mask)
    ours = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        loss_type=list(loss_types),
        loss_weights=loss_weights,
        chosen_lengths=chosen_mask.sum(-1),
        rejected_lengths=rejected_mask.sum(-1),
        chosen_token_logps=chosen_tokens,
        chosen_token_mask=chosen_mask,
        wpo_weights=weights,
        beta=BETA,
        **config,
    )
    return trl_loss, metrics, ours


def assert_close(actual, expected, dtype):
    actual, expected = torch.as_tensor(actual, dtype=dtype), torch.as_tensor(expected, dtype=dtype)
    torch.testing.assert_close(actual, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_each_type_matches_trl(loss_type, dtype):
    config = dict(label_smoothing=0.1) if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else {}
    trl_loss, metrics, ours = run_trl_dpo(dtype, [loss_type], **config)
    assert_close(ours.loss, trl_loss, dtype)
    assert_close(ours.chosen_rewards.mean(), metrics["rewards/chosen"], dtype)
    assert_close(ours.rejected_rewards.mean(), metrics["rewards/rejected"], dtype)
    assert_close(ours.reward_margins.mean(), metrics["rewards/margins"], dtype)
    assert ours.reward_accuracies.mean().item() == metrics["rewards/accuracies"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpo_weighted_list_with_ld_alpha_matches_trl(dtype):
    loss_types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, 0.3]
    trl_loss, metrics, ours = run_trl_dpo(dtype, loss_types, loss_weights=weights, ld_alpha=0.4, seed=3)
    assert_close(ours.loss, trl_loss, dtype)
    assert_close(ours.chosen_rewards.mean(), metrics["rewards/chosen"], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSS_TYPES) - {"aot", "aot_unpaired", "sft"}))
def test_dpo_wpo_weighting_matches_trl(loss_type, dtype):
    config = dict(label_smoothing=0.1) if loss_type in ("exo_pair", "robust") else {}
    trl_loss, _, ours = run_trl_dpo(dtype, [loss_type], use_weighting=True, seed=5, **config)
    assert_close(ours.loss, trl_loss, dtype)


@pytest.mark.parametrize(
    ("f_divergence_type", "coef"),
    [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.3)],
)
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_dpo_f_divergences_match_trl(loss_type, f_divergence_type, coef):
    # float32 only: TRL's alpha-divergence looks its clamp up in a table without float64.
    dtype = torch.float32
    config = dict(f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)
    if loss_type in ("exo_pair", "robust"):
        config["label_smoothing"] = 0.1
    trl_loss, _, ours = run_trl_dpo(dtype, [loss_type], seed=7, **config)
    assert_close(ours.loss, trl_loss, dtype)


def test_dpo_sft_with_wpo_weighting_crashes_in_trl_but_not_here():
    # TRL multiplies the broadcast (expanded) SFT term in place; we weight it per pair instead.
    with pytest.raises(RuntimeError, match="single memory location"):
        run_trl_dpo(torch.float64, ["sft"], use_weighting=True)


def test_dpo_discopop_overflow_is_nan_in_trl_finite_here():
    # A reference 1000 nats above the chosen completions: beta * margin ~ -300, so TRL's exp(-z) overflows in
    # float32 and meets a zero mixing weight (inf * 0). In float64 TRL stays finite: ours in float32 matches it.
    trl_32, _, ours_32 = run_trl_dpo(torch.float32, ["discopop"], ref_chosen_shift=1000.0)
    trl_64, _, ours_64 = run_trl_dpo(torch.float64, ["discopop"], ref_chosen_shift=1000.0)
    assert torch.isnan(trl_32) and torch.isfinite(trl_64)
    assert_close(ours_64.loss, trl_64, torch.float64)
    assert_close(ours_32.loss, trl_64, torch.float32)


def run_trl_kto(dtype, loss_type, *, seed=0, kl_offset=2.5, **config):
    batch, seq = 6, 10
    completion_mask, shifted, token_logps, _ = completion_batch(batch, seq, dtype, seed)
    kl_mask, _, kl_token_logps, _ = completion_batch(batch, seq, dtype, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    labels = torch.tensor([True, False, True, True, False, False])
    ref_logps = token_logps.sum(-1) + 4 * torch.rand(batch, generator=g, dtype=dtype) - 2
    ref_kl_logps = kl_token_logps.sum(-1) + 4 * torch.rand(batch, generator=g, dtype=dtype) - kl_offset
    input_ids, kl_input_ids = torch.zeros(batch, seq, dtype=torch.long), torch.ones(batch, seq, dtype=torch.long)
    model = FixedOutputsModel(
        {id(input_ids): fused_outputs(token_logps), id(kl_input_ids): fused_outputs(kl_token_logps)}
    )
    settings = dict(dict(beta=BETA, desirable_weight=1.0, undesirable_weight=1.0), **config)
    calculate_kl = loss_type == "kto"
    trainer = trainer_shell(KTOTrainer, model=model, loss_type=loss_type, calculate_KL=calculate_kl, **settings)
    inputs = dict(
        label=labels,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        completion_mask=completion_mask,
        KL_input_ids=kl_input_ids,
        KL_attention_mask=torch.ones_like(kl_input_ids),
        KL_completion_mask=kl_mask,
        ref_logps=ref_logps,
        ref_KL_logps=ref_kl_logps,
    )
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    kl = (kl_token_logps.sum(-1) - ref_kl_logps).mean() if calculate_kl else None
    ours = kto_loss(token_logps.sum(-1), ref_logps, labels, kl, loss_type=loss_type, **settings)
    return trl_loss, metrics, ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_matches_trl(loss_type, weights, dtype):
    trl_loss, metrics, ours = run_trl_kto(
        dtype, loss_type, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    assert_close(ours.loss, trl_loss, dtype)
    assert_close(ours.kl, metrics["kl"], dtype)
    assert_close(ours.chosen_rewards.mean(), metrics["rewards/chosen"], dtype)
    assert_close(ours.rejected_rewards.mean(), metrics["rewards/rejected"], dtype)


def test_kto_kl_is_clamped_at_zero_like_trl():
    # The reference puts 1 to 5 nats more on every KL completion: a negative raw estimate, clamped to 0.
    trl_loss, metrics, ours = run_trl_kto(torch.float64, "kto", kl_offset=-1.0)
    assert ours.kl.item() == metrics["kl"] == 0.0
    assert_close(ours.loss, trl_loss, torch.float64)


def cpo_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2, 6), generator=g)
    sums = -torch.rand(2, 6, generator=g, dtype=dtype) * 2 * lengths
    return sums[0], sums[1], lengths[0], lengths[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("loss_type", "alpha", "label_smoothing"),
    list(itertools.product(["sigmoid", "hinge", "ipo", "simpo"], [0.0, 0.25], [0.0]))
    + [("sigmoid", 0.0, 0.2), ("simpo", 0.25, 0.2)],
)
def test_cpo_per_pair_losses_match_trl(loss_type, alpha, label_smoothing, dtype):
    chosen, rejected, chosen_len, rejected_len = cpo_inputs(dtype)
    trainer = trainer_shell(
        CPOTrainer, beta=BETA, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=0.7, alpha=alpha
    )
    averaged = loss_type in ("ipo", "simpo")  # TRL's `average_log_prob`
    trl_in = (chosen / chosen_len, rejected / rejected_len) if averaged else (chosen, rejected)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = trainer.cpo_loss(*trl_in)
    nll = torch.tensor(1.7, dtype=dtype)
    ours = cpo_loss(
        chosen,
        rejected,
        beta=BETA,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=0.7,
        alpha=alpha,
        cpo_alpha=0.6,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        nll_loss=nll,
    )
    # TRL's get_batch_loss_metrics: losses.mean() + cpo_alpha * nll
    assert_close(ours.loss, trl_losses.mean() + 0.6 * nll, dtype)
    assert_close(ours.chosen_rewards, trl_chosen_rewards, dtype)
    assert_close(ours.rejected_rewards, trl_rejected_rewards, dtype)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_odds_ratio_matches_trl(beta):
    # float32: TRL casts the average log-probs to float32 before the odds ratio.
    dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    chosen, rejected = -torch.rand(2, 7, generator=g, dtype=dtype) * 3 - 1e-3
    trainer = trainer_shell(ORPOTrainer, beta=beta)
    losses, trl_chosen_rewards, trl_rejected_rewards, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(
        chosen, rejected
    )
    nll = torch.tensor(2.1)
    ours = orpo_loss(chosen, rejected, beta=beta, nll_loss=nll)
    assert_close(ours.loss, nll - losses.mean(), dtype)  # TRL: policy_nll_loss - losses.mean()
    assert_close(ours.chosen_rewards, trl_chosen_rewards, dtype)
    assert_close(ours.rejected_rewards, trl_rejected_rewards, dtype)
    assert_close(ours.log_odds_ratio.mean(), log_odds_ratio, dtype)
    assert_close(ours.log_odds_chosen.mean(), log_odds_chosen, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_sft_label_smoothing_matches_label_smoother(num_items_in_batch, dtype):
    # TRL's SFTTrainer applies `label_smoothing_factor` through transformers' LabelSmoother on full logits.
    g = torch.Generator().manual_seed(13)
    logits = (torch.randn(3, 6, 11, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[:, 0] = -100  # LabelSmoother shifts: position 0 is never a label
    shifted_labels = labels[:, 1:]
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, shifted_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ours = sft_loss(
        token_logps,
        shifted_labels != -100,
        label_smoothing=0.2,
        mean_logit=logits[:, :-1].mean(-1),
        logsumexp=logits[:, :-1].logsumexp(-1),
        num_items_in_batch=num_items_in_batch,
    )
    smoother = LabelSmoother(epsilon=0.2)
    expected = smoother(dict(logits=logits), labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
    assert_close(ours.loss, expected, dtype)
