"""`FusedORPOTrainer`: TRL's experimental `ORPOTrainer` on one fused pass of `align_losses`, without logits.

TRL 1.16's ORPO (and CPO) trainers call ``model(...).logits`` and work on the full ``[2B, T, V]``
logits: per-token log-probs, a cross-entropy NLL and the ``logits/*`` metrics. Here the policy forward
goes through the model's own ``forward``, patched by `trainers.fused_forward` after TRL's
``__init__``; called with ``fused_lm_head=True`` it runs the backbone and hands the hidden states
and the LM head's parameters to the core (`align_losses.linear_token_stats`), which returns per-token
log-probs of the labelled tokens only, tiled over the vocabulary. Nothing of size ``tokens x vocab``
is ever built, so the memory of a step is flat in the vocabulary and grows with the sequence only
as the backbone does.

What changes against `trl.experimental.orpo.ORPOTrainer` (tokenisation, collation, PEFT, logging,
evaluation are TRL's):

* `fused_paired_pass` replaces the full-logits forward. Its labels are, per row of the concatenated
  batch (chosen rows first): for the chosen rows every attended token (TRL's ORPO NLL covers the
  prompt AND the completion), for the rejected rows the completion tokens (all the odds ratio needs).
  One fused call gives both the NLL term and the per-completion average log-probs.
* The loss is `align_losses.fused.orpo_from_tokens` (per-token average completion log-probs and
  `align_losses.losses.orpo_loss`: NLL token mean minus ``beta * mean log sigmoid(log odds)``), as in
  `align_losses.FusedORPOLoss`.
* ``concatenated_forward`` returns TRL's tuple, except that the two "logits" slots hold the
  ``[B, T - 1]`` vocabulary-mean logits (whose ``.mean()`` is TRL's ``.mean()`` of the
  ``[B, T - 1, V]`` logits) instead of the logits.
* An empty completion (prompt alone fills ``max_length``) gets an average log-prob of 0, not TRL's NaN.
* Encoder-decoder models are refused (the fused head is for causal LMs).

Metrics, under TRL's names and from the same fused pass: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/rejected``, ``logps/chosen``,
``logits/rejected``, ``logits/chosen``, ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``
(``eval_``-prefixed in evaluation). ``logits/chosen``/``logits/rejected`` are, as in TRL, the mean of
the logits over every element of ``[B, T - 1, V]`` (all positions but the last, prompt and padding
included, the whole vocabulary). They come from the identity
``mean_v(h . W_v + b_v) = h . mean_v(W) + mean_v(b)`` at no projection cost. With a final soft-cap
(Gemma-2), the averaged quantity is still what TRL averages, the soft-capped logits
``c * tanh(a / c)``: the identity does not hold through the ``tanh``, so the labelled positions take
the exact vocabulary mean from the main pass and the other positions are run once more through the
core, without gradient, asking only for the mean logit (tiled, no ``[tokens, V]`` buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from align_losses.fused import PairLoss, orpo_from_tokens, split_pairs

# The paired pass is shared with CPO / SimPO and lives in `trainers._common`; the names stay importable from here.
from ._common import PAIRED_COLUMNS, PairedPass, PairedTrainerMixin, fused_paired_pass  # noqa: F401
from .configs import LCEOptionsMixin


@dataclass
class FusedORPOConfig(LCEOptionsMixin, ORPOConfig):
    """`trl.experimental.orpo.ORPOConfig` plus the fused head's options (`trainers.configs.LCEOptionsMixin`:
    ``lce_impl``, ``lce_memory_budget``, ``lce_token_chunk``, ``lce_filter_mass``)."""


class FusedORPOTrainer(PairedTrainerMixin, ORPOTrainer):
    """`trl.experimental.orpo.ORPOTrainer` on the fused head (see the module docstring).

    Takes the same arguments as `ORPOTrainer`; ``args`` may be a `FusedORPOConfig` or a plain `ORPOConfig`.
    """

    _tag_names = ["trl", "orpo", "align-losses"]
    _default_config = FusedORPOConfig

    def _fused_pass(self, model, batch) -> PairedPass:
        return fused_paired_pass(self, model, batch, padding_value=self.padding_value, nll_over="sequence")

    def _paired_loss(self, fused: PairedPass) -> PairLoss:
        """``(chosen average log-probs [B], rejected [B], ORPOOutput)`` of a fused pass: `orpo_from_tokens`."""
        return orpo_from_tokens(*split_pairs(fused.tokens), beta=self.beta)

    def _mean_logit_halves(self, fused: PairedPass):
        """TRL's ORPO averages the logits of every position but the last: ``[B, T - 1]`` each."""
        return fused.halves(fused.mean_logit_all[:, :-1])

    def _extra_metrics(self, result, prefix: str) -> dict:
        m = self._metric
        return {
            f"{prefix}log_odds_ratio": m(result.log_odds_ratio.mean()),
            f"{prefix}log_odds_chosen": m(result.log_odds_chosen.mean()),
        }
