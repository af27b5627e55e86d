"""Drop-in subclasses of TRL's trainers whose losses run on the fused linear + cross-entropy core.

    from trainers import FusedDPOTrainer, FusedDPOConfig

Each trainer takes the arguments of the TRL trainer it subclasses and either its Fused*Config or the
plain TRL config. Any other script that calls ``model(**batch, labels=labels).loss``: ``apply_fused_head(model)``
(`trainers.patch`). See `trainers.fused_forward` for how the hidden states reach `align_losses`.
Names load on first use: importing TRL's trainers takes seconds (the ``align-losses`` command
answers ``--help`` and bad arguments without them), and ORPO/CPO live in `trl.experimental`,
whose import warns.
"""

import importlib

_WHERE = {
    "FusedDPOConfig": "configs",
    "FusedKTOConfig": "configs",
    "FusedSFTConfig": "configs",
    "DataCollatorForPackedPreference": "dpo",
    "FusedDPOTrainer": "dpo",
    "FusedKTOTrainer": "kto",
    "FusedSFTTrainer": "sft",
    "FusedORPOConfig": "orpo",
    "FusedORPOTrainer": "orpo",
    "FusedCPOConfig": "cpo",
    "FusedCPOTrainer": "cpo",
    "FusedSimPOConfig": "cpo",
    "FusedSimPOTrainer": "cpo",
    "FusedGRPOConfig": "grpo",
    "FusedGRPOTrainer": "grpo",
    "FusedRLOOConfig": "rloo",
    "FusedRLOOTrainer": "rloo",
    "ExtractionSummary": "extract",
    "extract_logps": "extract",
    "reference_columns": "extract",
    "FusedHeadOutput": "fused_forward",
    "FusedHeadSettings": "fused_forward",
    "install_fused_head": "fused_forward",
    "read_head_quirks": "fused_forward",
    "apply_fused_head": "patch",
    "remove_fused_head": "patch",
    "fused_head_backend": "patch",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
