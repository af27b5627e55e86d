"""Pipeline-parallel training of a Qwen3-shaped model with a fused DPO or SFT loss.

    torchrun --nproc_per_node 2 examples/pipeline_parallel.py --loss dpo
    torchrun --nproc_per_node 2 examples/pipeline_parallel.py --loss sft --schedule 1f1b --microbatches 4

The model (a `transformers.Qwen3ForCausalLM` built from a config, random init, no download) is split
by decoder layers into one stage per rank with `torch.distributed.pipelining`. The first stage
holds the token embedding, the last stage the final norm and the LM head. The last stage never
builds ``[tokens, vocab]`` logits: the schedule's loss function takes the last stage's hidden states
and the head's weight (which lives on that stage) to one fused core call
(`align_losses.fused.head_pass`), then to `align_losses.fused.dpo_from_tokens` /
`align_losses.fused.sft_from_tokens` (the steps of `align_losses.FusedDPOLoss` / `FusedSFTLoss`).
The head's gradient is accumulated on the last stage by the same backward as the rest of that stage.

Exactness against the unsplit model (`tests/test_pipeline_parallel.py`):

* every micro-batch loss is normalised by the *global* batch (pairs for DPO, completion tokens for
  SFT) and the schedule is built with ``scale_grads=False``, so the micro-batch losses sum to the
  full-batch loss and the accumulated gradients are its gradients;
* the schedule splits the batch along dim 0, so a DPO micro-batch holds whole pairs
  (inputs ``[B, 2, T]``: chosen, rejected);
* sequences are right-padded and attention is plain causal: the padding comes after every real
  token, and its labels are -100, so it never reaches a scored position.

The schedule sends only the model inputs to the first stage and only ``target`` to the last stage's
loss function. For DPO, ``target`` packs the labels and the reference log-probs into one float64
tensor ``[B, 2, T + 1]`` (labels in ``[..., :T]``, exact in float64; the reference sequence log-prob
of each completion in ``[..., T]``), so that the schedule's micro-batch split keeps them together.
The reference log-probs come from a forward-only pass of the pipeline before training (the policy
at step 0 is the reference, as with TRL's ``precompute_ref_log_probs``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from align_losses.fused import HeadOptions, TokenBatch, dpo_from_tokens, head_pass, sft_from_tokens

IGNORE = -100


# ---------------------------------------------------------------------------------------------------------------------
# Model and stages


def qwen3_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 4, **overrides):
    """A small Qwen3 config (the shapes of a real one, scaled down); eager attention for exact comparisons."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        **overrides,
    )
    config._attn_implementation = "eager"
    return config


def build_model(config, seed: int = 0):
    """The full model, randomly initialised from ``seed`` (the same on every rank), fp32."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # a less flat head, so that the losses move visibly
        model.lm_head.weight.normal_(0, 0.2)
    return model


def stage_layers(num_layers: int, num_stages: int, stage_index: int) -> range:
    """The decoder layers of one stage: contiguous, as even as possible, earlier stages one more."""
    per, extra = divmod(num_layers, num_stages)
    start = stage_index * per + min(stage_index, extra)
    return range(start, start + per + (1 if stage_index < extra else 0))


class Qwen3Stage(nn.Module):
    """One pipeline stage of a `Qwen3ForCausalLM`: some of its decoder layers, plus the embedding
    (first stage) or the final norm and the LM head (last stage).

    It holds the model's own submodules (no copies), so its parameters are the model's parameters;
    `parameter_names` maps them back to the full model's names. The LM head is held but not called
    in ``forward``: the last stage outputs the normed hidden states, which the loss function projects
    through the fused core (`FusedPipelineLoss`).

    Input of the first stage: ``input_ids`` ``[B, T]`` or ``[B, 2, T]`` (pairs). Output of every
    stage: hidden states ``[N, T, D]`` with ``N = B`` or ``2B``.
    """

    def __init__(self, model, num_stages: int, stage_index: int):
        super().__init__()
        self.config = model.config
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.layer_ids = list(stage_layers(model.config.num_hidden_layers, num_stages, stage_index))
        backbone = model.model
        self.embed_tokens = backbone.embed_tokens if self.is_first else None
        self.layers = nn.ModuleList([backbone.layers[i] for i in self.layer_ids])
        self.rotary_emb = backbone.rotary_emb  # buffers only
        self.norm = backbone.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self._full_names = _full_names(model, self)

    def parameter_names(self) -> dict:
        """``{stage parameter name: full-model parameter name}``."""
        return dict(self._full_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        if self.is_first:
            hidden = self.embed_tokens(x.reshape(-1, x.shape[-1]))
        else:
            hidden = x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
        )
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
        if self.is_last:
            hidden = self.norm(hidden)
        return hidden


def _full_names(model, stage) -> dict:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {n: by_id[id(p)] for n, p in stage.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------------
# The fused loss on the last stage


def pack_dpo_target(labels: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``[B, 2, T + 1]`` float64: ``labels`` ``[B, 2, T]`` and ``ref_logps`` ``[B, 2]`` (chosen, rejected)."""
    return torch.cat([labels.double(), ref_logps.double().unsqueeze(-1)], dim=-1)


def unpack_dpo_target(target: torch.Tensor):
    return target[..., :-1].long(), target[..., -1].float()


def head_tokens(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, impl: str = "auto") -> TokenBatch:
    """Per-token log-probs of ``labels`` ``[N, T]`` (unshifted, -100 where not scored) under the head over
    ``hidden`` ``[N, T, D]``, per sequence: one fused core call, no logits."""
    hidden = hidden.reshape(*labels.shape, hidden.shape[-1])
    return head_pass(hidden, head.weight, labels, head=HeadOptions(impl=impl, ignore_index=IGNORE), bias=head.bias)


class FusedPipelineLoss:
    """The schedule's ``loss_fn(output, target)``: the fused DPO or SFT loss of one micro-batch.

    ``head`` is the last stage's LM head. Each micro-batch loss is normalised by the global batch
    (set with `set_global_batch` before each step), so the micro-batch losses sum to the loss of the
    full batch; build the schedule with ``scale_grads=False``.
    """

    def __init__(self, head: nn.Linear, loss: str = "dpo", beta: float = 0.1, impl: str = "auto"):
        if loss not in ("dpo", "sft"):
            raise ValueError(f"loss must be 'dpo' or 'sft'; got {loss!r}")
        self.head, self.loss, self.beta, self.impl = head, loss, beta, impl
        self.denominator: Optional[float] = None
        self.records: list = []  # per micro-batch, detached: {"logps": [b, 2]} (DPO) / {"nll": []} (SFT)

    def set_global_batch(self, labels: torch.Tensor) -> None:
        """Pairs (DPO, ``labels`` ``[B, 2, T]``) or scored tokens (SFT, ``[B, T]``) of the whole step."""
        self.denominator = float(labels.shape[0]) if self.loss == "dpo" else float(max(int((labels[..., 1:] != IGNORE).sum()), 1))

    def __call__(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.denominator is None:
            raise RuntimeError("call set_global_batch(labels) before each step")
        if self.loss == "sft":
            out = sft_from_tokens(head_tokens(hidden, self.head, target, self.impl), num_items_in_batch=self.denominator)
            self.records.append({"nll": out.nll_loss})
            return out.loss
        labels, ref = unpack_dpo_target(target)
        tokens = head_tokens(hidden, self.head, labels.reshape(-1, labels.shape[-1]), self.impl)
        # rows alternate chosen, rejected (pairs [b, 2, T] flattened)
        pair = dpo_from_tokens(tokens.rows(slice(0, None, 2)), tokens.rows(slice(1, None, 2)), ref[:, 0], ref[:, 1],
                               beta=self.beta)
        self.records.append({"logps": torch.stack([pair.chosen_logps, pair.rejected_logps], dim=1).detach()})
        return pair.result.loss * (labels.shape[0] / self.denominator)  # mean over this micro-batch -> global share


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline assembly


def build_pipeline(model, loss_fn_factory, *, rank: int, world: int, microbatches: int, schedule: str = "gpipe",
                   device: Optional[torch.device] = None, group=None):
    """``(stage_module, schedule, loss_fn)`` of this rank.

    ``loss_fn_factory(stage_module)`` is called on the last stage only; the other stages get a
    placeholder (a schedule without a loss function runs forward only) and ``loss_fn`` None.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    device = device or torch.device("cpu")
    stage_module = Qwen3Stage(model, world, rank).to(device)
    stage = PipelineStage(stage_module, rank, world, device, group=group)
    loss_fn = loss_fn_factory(stage_module) if stage_module.is_last else None
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(stage, n_microbatches=microbatches, loss_fn=loss_fn or _not_last_stage, scale_grads=False)
    return stage_module, sched, loss_fn


def _not_last_stage(output, target):
    raise RuntimeError("the loss is computed on the last stage only")


def pipeline_step(schedule, stage_module, inputs: torch.Tensor, target: Optional[torch.Tensor]):
    """One forward + backward over the whole batch; returns the full-batch loss on the last stage, else None."""
    if stage_module.is_first:
        schedule.step(inputs)
        return None
    if stage_module.is_last:
        losses: list = []
        schedule.step(target=target, losses=losses)
        return torch.stack([l.detach() for l in losses]).sum()
    schedule.step()
    return None


@torch.no_grad()
def reference_logps(schedule, stage_module, loss_fn, input_ids: torch.Tensor, labels: torch.Tensor):
    """``[B, 2]`` sequence log-probs under the current weights, forward only, on the last stage (None elsewhere).

    A schedule with a loss function computes it in ``eval`` too; the loss function records each
    micro-batch's sequence log-probs (`FusedPipelineLoss.records`), which is what this returns.
    """
    if stage_module.is_first:
        schedule.eval(input_ids)
        return None
    if not stage_module.is_last:
        schedule.eval()
        return None
    loss_fn.set_global_batch(labels)
    loss_fn.records.clear()
    schedule.eval(target=pack_dpo_target(labels, torch.zeros(labels.shape[:2], device=labels.device)))
    return torch.cat([r["logps"] for r in loss_fn.records])


# ---------------------------------------------------------------------------------------------------------------------
# Data


def synthetic_batch(batch: int, seq_len: int, vocab: int, *, pairs: bool, seed: int):
    """Right-padded random sequences: ``(input_ids, labels)``, ``[B, 2, T]`` (pairs) or ``[B, T]``.

    Every sequence has a prompt of 2-5 tokens (labels -100), a completion of at least 2 tokens
    and right padding (token 0, labels -100); in a pair, both completions share the prompt.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 2) if pairs else (batch, 1)
    input_ids = torch.zeros(*shape, seq_len, dtype=torch.long)
    labels = torch.full((*shape, seq_len), IGNORE, dtype=torch.long)
    for b in range(batch):
        prompt_len = int(torch.randint(2, 6, (), generator=g))
        prompt = torch.randint(1, vocab, (prompt_len,), generator=g)
        for s in range(shape[1]):
            length = int(torch.randint(prompt_len + 2, seq_len + 1, (), generator=g))
            input_ids[b, s, :prompt_len] = prompt
            input_ids[b, s, prompt_len:length] = torch.randint(1, vocab, (length - prompt_len,), generator=g)
            labels[b, s, prompt_len:length] = input_ids[b, s, prompt_len:length]
    if not pairs:
        return input_ids[:, 0], labels[:, 0]
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------------
# Training script


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("dpo", "sft"), default="dpo")
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe")
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs (DPO) or sequences (SFT) per step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--impl", default="auto", help="align_losses backend (impl=)")
    args = parser.parse_args(argv)

    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        parser.error(
            f"expected a launch by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; "
            f"{', '.join(missing)} not set. Run: torchrun --nproc_per_node 2 {sys.argv[0]} {' '.join(argv or sys.argv[1:])}"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world < 2:
        parser.error(f"expected at least 2 ranks (one pipeline stage each); got WORLD_SIZE={world}")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        model = build_model(qwen3_config(args.vocab, args.hidden, args.layers), seed=0)
        make_loss = lambda stage: FusedPipelineLoss(stage.lm_head, args.loss, beta=args.beta, impl=args.impl)  # noqa: E731
        stage_module, schedule, loss_fn = build_pipeline(
            model, make_loss, rank=rank, world=world, microbatches=args.microbatches, schedule=args.schedule, device=device
        )
        del model  # this rank keeps only its stage
        optimizer = torch.optim.AdamW(stage_module.parameters(), lr=args.lr, weight_decay=0.0)
        pairs = args.loss == "dpo"
        input_ids, labels = synthetic_batch(args.batch, args.seq_len, args.vocab, pairs=pairs, seed=1)
        input_ids, labels = input_ids.to(device), labels.to(device)
        target = labels
        if pairs:  # the reference: the policy before any update, forward only through the same pipeline
            ref = reference_logps(schedule, stage_module, loss_fn, input_ids, labels)
            target = pack_dpo_target(labels, ref) if stage_module.is_last else None
        if stage_module.is_last:
            loss_fn.set_global_batch(labels)
        for step in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            if loss_fn is not None:
                loss_fn.records.clear()
            loss = pipeline_step(schedule, stage_module, input_ids, target if stage_module.is_last else None)
            optimizer.step()
            if loss is not None:
                print(f"step {step}: {args.loss} loss {loss.item():.6f}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
