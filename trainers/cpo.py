"""`FusedCPOTrainer` and `FusedSimPOTrainer`: TRL's experimental `CPOTrainer` on one fused pass, without logits.

As `trainers.orpo` (read its docstring for the fused pass and the ``logits/*`` identity), with CPO's
semantics:

* the labels of the fused call are the completion tokens of every row (CPO's NLL term, like its
  preference term, covers the chosen completions only); with ``cpo_alpha == 0`` the NLL is skipped
  and logged as 0, as TRL;
* the loss is `align_losses.losses.cpo_loss` (``sigmoid``, ``hinge``, ``ipo``, ``simpo``; ``alphapo``
  is TRL's config alias for ``simpo`` with ``cpo_alpha=0``; ``alpha != 0`` applies AlphaPO's reward
  shaping to every type), or `align_losses.losses.simpo_loss` for `FusedSimPOTrainer`. ``ipo`` and
  ``simpo`` use per-token average log-probs, the others sums, as TRL; empty completions count 1 token
  (TRL divides 0 by 0);
* ``logits/chosen``/``logits/rejected`` are, as in TRL's CPO, the mean over every element of the
  ``[B, T, V]`` logits, the last position included (ORPO drops it); soft-capped logits with a soft-cap;
* ``concatenated_forward`` returns TRL's tuple with ``[B, T]`` vocabulary-mean logits in the "logits" slots.

Metrics, under TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/rejected``, ``logps/chosen``, ``logits/rejected``, ``logits/chosen``,
``nll_loss`` (``eval_``-prefixed in evaluation).

SimPO (Meng et al., 2024) is `FusedSimPOTrainer`: CPO with ``loss_type="simpo"`` and ``cpo_alpha=0``
(no NLL term), the defaults of `FusedSimPOConfig`; every other default is TRL's `CPOConfig`'s.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl.experimental.cpo import CPOConfig, CPOTrainer

from align_losses.losses import cpo_loss, sequence_logps, simpo_loss

from ._common import PairedPass, PairedTrainerMixin, fused_paired_pass
from .configs import LCEOptionsMixin

#: CPO loss types that TRL feeds per-token average log-probs (the others get sums).
_AVERAGED = frozenset({"ipo", "simpo"})


@dataclass
class FusedCPOConfig(LCEOptionsMixin, CPOConfig):
    """`trl.experimental.cpo.CPOConfig` plus the fused head's options (`trainers.configs.LCEOptionsMixin`:
    ``lce_impl``, ``lce_memory_budget``, ``lce_token_chunk``, ``lce_filter_mass``)."""


@dataclass
class FusedSimPOConfig(FusedCPOConfig):
    """`FusedCPOConfig` with SimPO's defaults: ``loss_type="simpo"`` and ``cpo_alpha=0.0`` (no NLL term).

    Every other default is `CPOConfig`'s (``beta=0.1``, ``simpo_gamma=0.5``, ...); the SimPO paper
    tunes ``beta`` in [2, 10] and ``simpo_gamma / beta`` in [0.3, 1] (TRL's ``simpo_gamma`` is the margin
    inside ``log sigmoid(beta * delta - simpo_gamma)``).
    """

    loss_type: str = field(
        default="simpo",
        metadata={"help": "Loss type; SimPO is `'simpo'` (`'alphapo'` is accepted: `'simpo'` with `cpo_alpha=0`).",
                  "choices": ["simpo", "alphapo"]},
    )
    cpo_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of the NLL (behaviour cloning) term; 0 is SimPO, > 0 is CPO-SimPO."},
    )


class FusedCPOTrainer(PairedTrainerMixin, CPOTrainer):
    """`trl.experimental.cpo.CPOTrainer` on the fused head (see the module docstring).

    Takes the same arguments as `CPOTrainer`; ``args`` may be a `FusedCPOConfig` or a plain `CPOConfig`.
    """

    _tag_names = ["trl", "cpo", "align-losses"]
    _default_config = FusedCPOConfig

    # ------------------------------------------------------------------------------------------------ forward
    def _fused_pass(self, model, batch) -> PairedPass:
        return fused_paired_pass(self, model, batch, padding_value=self.pad_token_id, nll_over="completion")

    def _paired_loss(self, fused: PairedPass):
        """``(chosen logps [B], rejected logps [B], CPOOutput)``; the log-probs are TRL's (averaged for ipo/simpo)."""
        sums = sequence_logps(fused.token_logps, fused.completion_mask)
        counts = fused.completion_mask.sum(dim=1)
        chosen_sum, rejected_sum = fused.halves(sums)
        chosen_len, rejected_len = fused.halves(counts)
        chosen_tokens, _ = fused.halves(fused.token_logps)
        result = self._preference_loss(chosen_sum, rejected_sum, chosen_len, rejected_len, chosen_tokens, fused.nll_mask)
        if self.loss_type in _AVERAGED:
            chosen_logps = chosen_sum / chosen_len.clamp(min=1).to(chosen_sum.dtype)
            rejected_logps = rejected_sum / rejected_len.clamp(min=1).to(rejected_sum.dtype)
        else:
            chosen_logps, rejected_logps = chosen_sum, rejected_sum
        return chosen_logps, rejected_logps, result

    def _preference_loss(self, chosen_sum, rejected_sum, chosen_len, rejected_len, chosen_tokens, nll_mask):
        """`align_losses.losses.cpo_loss` with this trainer's settings (summed log-probs and completion lengths)."""
        return cpo_loss(
            chosen_sum,
            rejected_sum,
            beta=self.beta,
            loss_type=self.loss_type,
            # TRL ignores it for hinge/ipo and warned once at init; pass 0 so that the loss does not warn every step.
            label_smoothing=0.0 if self.loss_type in ("hinge", "ipo") else self.label_smoothing,
            cpo_alpha=self.cpo_alpha,
            simpo_gamma=getattr(self, "simpo_gamma", 0.5),
            alpha=self.alpha,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            chosen_token_logps=chosen_tokens if self.cpo_alpha != 0 else None,
            chosen_token_mask=nll_mask if self.cpo_alpha != 0 else None,
        )

    def _mean_logit_halves(self, fused: PairedPass):
        """TRL's CPO averages the logits of every position, the last included: ``[B, T]`` each."""
        return fused.halves(fused.mean_logits_all)


class FusedSimPOTrainer(FusedCPOTrainer):
    """SimPO: `FusedCPOTrainer` with ``loss_type="simpo"`` and, by default, no NLL term (``cpo_alpha=0``).

    ``args`` is a `FusedSimPOConfig` (default) or any `CPOConfig` with ``loss_type="simpo"`` (or
    ``"alphapo"``); a plain `CPOConfig` keeps its ``cpo_alpha=1.0`` default, i.e. CPO-SimPO, with a warning.
    The loss is `align_losses.losses.simpo_loss` (`cpo_loss` when ``cpo_alpha != 0``).
    """

    _tag_names = ["trl", "cpo", "simpo", "align-losses"]
    _default_config = FusedSimPOConfig

    def _check_args(self, args) -> None:
        if args.loss_type != "simpo":
            raise ValueError(
                f"{type(self).__name__} trains SimPO and needs loss_type='simpo'; got loss_type={args.loss_type!r}. "
                "Use FusedSimPOConfig (whose defaults are SimPO's), or FusedCPOTrainer for other CPO loss types."
            )
        if args.cpo_alpha != 0:
            warnings.warn(
                f"{type(self).__name__}: cpo_alpha={args.cpo_alpha} adds CPO's NLL term to SimPO (CPO-SimPO); the "
                "paper's SimPO has cpo_alpha=0 (FusedSimPOConfig's default).",
                stacklevel=3,
            )

    def _preference_loss(self, chosen_sum, rejected_sum, chosen_len, rejected_len, chosen_tokens, nll_mask):
        if self.cpo_alpha != 0:
            return super()._preference_loss(chosen_sum, rejected_sum, chosen_len, rejected_len, chosen_tokens, nll_mask)
        return simpo_loss(
            chosen_sum,
            rejected_sum,
            chosen_len,
            rejected_len,
            beta=self.beta,
            simpo_gamma=self.simpo_gamma,
            label_smoothing=self.label_smoothing,
            alpha=self.alpha,
        )
