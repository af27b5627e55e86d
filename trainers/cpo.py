"""`FusedCPOTrainer` and `FusedSimPOTrainer`: TRL's experimental `CPOTrainer` on one fused pass, without logits.

As `trainers.orpo` (read its docstring for the fused pass and the ``logits/*`` identity), with CPO's
semantics:

* the labels of the fused call are the completion tokens of every row (CPO's NLL term, like its
  preference term, covers the chosen completions only); with ``cpo_alpha == 0`` the NLL is skipped
  and logged as 0, as TRL;
* the loss is `align_losses.fused.cpo_from_tokens` (completion sums and lengths and
  `align_losses.losses.cpo_loss`, as in `align_losses.FusedCPOLoss`: ``sigmoid``, ``hinge``, ``ipo``,
  ``simpo``; ``alphapo`` is TRL's config alias for ``simpo`` with ``cpo_alpha=0``; ``alpha != 0`` applies
  AlphaPO's reward shaping to every type). ``ipo`` and ``simpo`` use per-token average log-probs
  (`align_losses.losses.AVERAGED_LOSS_TYPES`), the others sums, as TRL; empty completions count 1 token
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

from align_losses.fused import PairLoss, cpo_from_tokens, split_pairs

from ._common import PairedPass, PairedTrainerMixin, fused_paired_pass
from .configs import LCEOptionsMixin


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

    def _paired_loss(self, fused: PairedPass) -> PairLoss:
        """``(chosen logps [B], rejected logps [B], CPOOutput)``: `align_losses.fused.cpo_from_tokens` with this
        trainer's settings; the log-probs are TRL's (averaged for the `AVERAGED_LOSS_TYPES`)."""
        return cpo_from_tokens(
            *split_pairs(fused.tokens),
            loss_type=self.loss_type,
            beta=self.beta,
            # TRL ignores it for hinge/ipo and warned once at init; pass 0 so that the loss does not warn every step.
            label_smoothing=0.0 if self.loss_type in ("hinge", "ipo") else self.label_smoothing,
            cpo_alpha=self.cpo_alpha,
            simpo_gamma=getattr(self, "simpo_gamma", 0.5),
            alpha=self.alpha,
        )

    def _mean_logit_halves(self, fused: PairedPass):
        """TRL's CPO averages the logits of every position, the last included: ``[B, T]`` each."""
        return fused.halves(fused.mean_logit_all)


class FusedSimPOTrainer(FusedCPOTrainer):
    """SimPO: `FusedCPOTrainer` with ``loss_type="simpo"`` and, by default, no NLL term (``cpo_alpha=0``).

    ``args`` is a `FusedSimPOConfig` (default) or any `CPOConfig` with ``loss_type="simpo"`` (or
    ``"alphapo"``); a plain `CPOConfig` keeps its ``cpo_alpha=1.0`` default, i.e. CPO-SimPO, with a warning.
    The loss is `align_losses.losses.cpo_loss` with ``loss_type="simpo"`` (with ``cpo_alpha=0``, exactly
    `align_losses.losses.simpo_loss`).
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
