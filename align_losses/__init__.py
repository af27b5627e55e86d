"""align-losses: alignment losses on a fused linear + cross-entropy core that never builds logits.

Read in this order: `core` (per-token log-probs and statistics of a linear head), `backends`
(the implementations behind ``impl=``), `losses` (DPO, ORPO, CPO, SimPO, KTO and SFT on
per-sequence log-probs) and `fused` (from hidden states to a loss in one call).
"""

from .core import TokenStats, linear_logprobs, linear_token_stats

__all__ = ["TokenStats", "linear_logprobs", "linear_token_stats"]
