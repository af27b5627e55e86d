"""`trainers.apply_fused_head` on tiny random models of each family: the loss and every parameter gradient
equal to the unpatched model's (fp32, relative 1e-5), the LM head's forward never run with labels,
instance and class patches, `remove_fused_head`, generation, refused heads, and the options."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from trainers import apply_fused_head, remove_fused_head

VOCAB = 160
RTOL = 1e-5

_COMMON = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

#: family -> (model class, config class, config overrides). Quirks set so that they matter: soft-caps small
#: enough to bend the logits, logit scales far from 1, MoE router loss weighted 0.5.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 8, "tie_word_embeddings": False}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {
        "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "decoder_sparse_step": 1, "output_router_logits": True, "router_aux_loss_coef": 0.5}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True, "router_aux_loss_coef": 0.5,
        "sliding_window": None}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"head_dim": 8, "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "cohere": ("CohereForCausalLM", "CohereConfig", {"logit_scale": 0.5}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 4.0}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {}),
    # Router loss read from the forward (`trainers.model_source`): Llama 4's text model returns router logits and adds
    # no loss, and its base_model_prefix names no child; DBRX and JetMoE keep their coefficient under other names.
    "llama4_text": ("Llama4ForCausalLM", "Llama4TextConfig", {
        "head_dim": 8, "intermediate_size_mlp": 64, "num_local_experts": 4, "num_experts_per_tok": 1,
        "output_router_logits": True, "router_aux_loss_coef": 0.5}),
    "mllama_text": ("MllamaForCausalLM", "MllamaTextConfig", {"cross_attention_layers": [1]}),  # the same prefix
    "dbrx": ("DbrxForCausalLM", "DbrxConfig", {}),
    "jetmoe": ("JetMoeForCausalLM", "JetMoeConfig", {
        "kv_channels": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
        "aux_loss_coef": 0.5}),
}


def tiny_family(family: str, seed: int = 0):
    """A 2-layer random model of ``family``, fp32, eager attention, no dropout, head weights large enough that
    the logits are far from flat (so that a wrong head shows)."""
    model_name, config_name, extra = FAMILIES[family]
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    elif family == "dbrx":
        config = transformers.DbrxConfig(
            d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB, output_router_logits=True,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2, "moe_loss_weight": 0.5},
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    else:
        common = {k: v for k, v in _COMMON.items() if family != "gpt_neox" or k != "num_key_value_heads"}
        config = getattr(transformers, config_name)(**{**common, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.3)
    return model


def batch(seed: int = 1, shape=(2, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, shape, generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(out, grads, ref_out, ref_grads):
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=RTOL, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).norm() / ref.norm().clamp(min=1e-30)
        assert err <= RTOL, f"{name}: relative gradient error {err:.2e}"


class HeadCalls:
    """Records the calls of the LM head's forward (the patched forward must never make one with labels)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


@pytest.mark.parametrize("mode", ["instance", "class"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loss_and_grads_match_unpatched(family, mode):
    ref = tiny_family(family)
    model = copy.deepcopy(ref)
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref.train()
    model.train()
    ref_out, ref_grads = loss_and_grads(ref, **inputs)
    assert ref_out.logits is not None
    target = type(model) if mode == "class" else model
    calls = HeadCalls(model)
    apply_fused_head(target)
    try:
        out, grads = loss_and_grads(model, **inputs)
        assert calls.count == 0, "the LM head's forward ran on a call with labels"
        assert out.logits is None
        assert_same(out, grads, ref_out, ref_grads)
        if getattr(model.config, "output_router_logits", False):
            if ref_out.aux_loss is None:  # a forward that computes no router loss (Llama 4's text model)
                assert out.aux_loss is None
            else:
                torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, rtol=RTOL, atol=0)
            assert out.router_logits is not None
        # Without labels: the model's own forward, head and logits included.
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(logits, ref(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
        assert calls.count == 1
    finally:
        remove_fused_head(target)
    with torch.no_grad():
        assert model(**inputs).logits is not None  # removed: the original forward again
    assert calls.count == 2


def test_class_patch_reaches_models_loaded_later(tmp_path):
    """What Axolotl-style code does: patch the class, then someone else loads the model."""
    ref = tiny_family("qwen3")
    ref.save_pretrained(tmp_path)
    ids, mask, labels = batch()
    ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    cls = transformers.Qwen3ForCausalLM
    original = cls.__dict__["forward"]
    apply_fused_head(cls)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        model.config._attn_implementation = "eager"
        calls = HeadCalls(model)
        out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
        assert calls.count == 0 and out.logits is None
        assert_same(out, grads, ref_out, ref_grads)
    finally:
        remove_fused_head(cls)
    assert cls.__dict__["forward"] is original


def test_remove_restores_exactly():
    model = tiny_family("qwen3")
    assert "forward" not in model.__dict__
    hooks = len(model._forward_pre_hooks)
    apply_fused_head(model)
    apply_fused_head(model, z_loss=1e-3)  # again: new options, one patch
    remove_fused_head(model)
    assert "forward" not in model.__dict__ and len(model._forward_pre_hooks) == hooks
    assert not any(k.startswith("_align_losses") for k in model.__dict__)
    with pytest.raises(ValueError, match="no fused head was applied"):
        remove_fused_head(model)
    with pytest.raises(ValueError, match="no fused head was applied"):
        remove_fused_head(transformers.LlamaForCausalLM)


def test_generate_gives_the_same_tokens():
    ref = tiny_family("llama")
    model = apply_fused_head(copy.deepcopy(ref))
    ids = torch.randint(3, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(model.generate(ids, **kwargs), ref.generate(ids, **kwargs), rtol=0, atol=0)


def test_num_items_shift_labels_tuple_and_positional():
    ref = tiny_family("qwen3")
    model = apply_fused_head(copy.deepcopy(ref))
    ids, mask, labels = batch()
    # num_items_in_batch: the sum over scored tokens divided by it (gradient accumulation)
    for n in (7, torch.tensor(23)):
        a = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
        b = ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss
        torch.testing.assert_close(a, b, rtol=RTOL, atol=0)
    # shift_labels (context parallelism): used as they are; the unpatched model also needs `labels` to score
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    a = model(input_ids=ids, labels=labels, shift_labels=shifted).loss
    torch.testing.assert_close(a, ref(input_ids=ids, labels=labels, shift_labels=shifted).loss, rtol=RTOL, atol=0)
    # ... and they win over `labels` (not the shift of `labels`, which would give the same loss as above)
    other = batch(seed=5)[2]
    a = model(input_ids=ids, labels=labels, shift_labels=other).loss
    b = ref(input_ids=ids, labels=labels, shift_labels=other).loss
    torch.testing.assert_close(a, b, rtol=RTOL, atol=0)
    assert not torch.allclose(b, ref(input_ids=ids, labels=labels).loss)
    # return_dict=False: a tuple, the loss first
    a = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(a, tuple)
    torch.testing.assert_close(a[0], ref(input_ids=ids, labels=labels).loss, rtol=RTOL, atol=0)
    # positional arguments are named as the model's forward names them (labels is the 6th)
    a = model(ids, mask, None, None, None, labels)
    torch.testing.assert_close(a.loss, ref(input_ids=ids, attention_mask=mask, labels=labels).loss, rtol=RTOL, atol=0)


def test_label_smoothing_and_z_loss():
    ref = tiny_family("gemma2")  # soft-capped: the mean logit is of the capped logits
    ids, mask, labels = batch()
    eps, z = 0.1, 1e-2
    model = apply_fused_head(copy.deepcopy(ref), label_smoothing=eps, z_loss=z)
    out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)

    ref.zero_grad(set_to_none=True)
    logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, ignore_index=-100, reduction="none", label_smoothing=eps
    )
    lse = torch.logsumexp(logits, dim=-1)
    ref_loss = ((per_token + z * lse**2) * keep).sum() / keep.sum()
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    assert_same(out, grads, type(out)(loss=ref_loss), ref_grads)


def test_fused_lm_head_gives_per_token_log_probs():
    """The opt-in path for custom losses: per-token log-probs and entropy, differentiable, instead of the loss."""
    ref = tiny_family("cohere")
    model = apply_fused_head(copy.deepcopy(ref))
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, fused_outputs=("entropy",))
    logp = torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    want = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    torch.testing.assert_close(out.log_probs, want, rtol=RTOL, atol=1e-6)
    entropy = -(logp.exp() * logp).sum(-1) * keep
    torch.testing.assert_close(out.entropy, entropy, rtol=RTOL, atol=1e-6)
    assert out.log_probs.requires_grad and out.is_top1 is None
    torch.testing.assert_close(out.label_mask, keep)
    # label smoothing / z-loss are options of the loss of calls with labels: a fused call says it has neither
    apply_fused_head(model, label_smoothing=0.1)
    with pytest.warns(UserWarning, match="label_smoothing and z_loss are in the loss of calls with `labels` only"):
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)


def test_no_labels_with_grad_in_training_warns():
    model = apply_fused_head(tiny_family("qwen3"))
    model.train()
    ids, mask, _ = batch()
    with pytest.warns(UserWarning, match="without `labels`"):
        assert model(input_ids=ids).logits is not None


# -------------------------------------------------------------------------------------------------------------- heads
class ScaledLinear(torch.nn.Linear):
    """A head whose forward is not its weight's product: the fused core could not reproduce it."""

    def forward(self, x):
        return super().forward(x) * 2.0


class QuietLinear(torch.nn.Linear):
    """A subclass that keeps `nn.Linear.forward`: accepted."""


def with_head(model, head):
    old = model.get_output_embeddings()
    with torch.no_grad():
        head[-1].weight.copy_(old.weight) if isinstance(head, torch.nn.Sequential) else head.weight.copy_(old.weight)
    model.set_output_embeddings(head)
    return model


def _bad_heads():
    return {
        "ScaledLinear": lambda: ScaledLinear(32, VOCAB, bias=False),
        "Sequential": lambda: torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, VOCAB, bias=False)),
    }


@pytest.mark.parametrize("head", sorted(_bad_heads()))
@pytest.mark.parametrize("mode", ["instance", "class"])
def test_refuses_a_head_it_cannot_reproduce(head, mode):
    model = with_head(tiny_family("qwen3"), _bad_heads()[head]())
    ids, _, labels = batch()
    if mode == "instance":
        with pytest.raises(ValueError, match=rf"LM head of Qwen3ForCausalLM is a .*{head}.*plain `nn.Linear`"):
            apply_fused_head(model)
        assert "forward" not in model.__dict__  # nothing installed
        return
    apply_fused_head(type(model))
    try:
        with pytest.raises(ValueError, match=rf"is a .*{head}"):
            model(input_ids=ids, labels=labels)
        with torch.no_grad():
            assert model(input_ids=ids).logits is not None  # without labels the model's own forward
    finally:
        remove_fused_head(type(model))


def test_accepts_linear_subclass_without_forward():
    ref = with_head(tiny_family("qwen3"), QuietLinear(32, VOCAB, bias=False))
    model = apply_fused_head(copy.deepcopy(ref))
    ids, mask, labels = batch()
    assert_same(*loss_and_grads(model, input_ids=ids, labels=labels), *loss_and_grads(ref, input_ids=ids, labels=labels))


def test_option_errors():
    model = tiny_family("qwen3")
    for kwargs, match in (
        ({"label_smoothing": -0.1}, "label_smoothing must be a finite number >= 0"),
        ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\]"),
        ({"z_loss": "x"}, "z_loss must be a finite number"),
        ({"z_loss": float("inf")}, "z_loss must be a finite number"),
        ({"backend_options": ["filter_mass"]}, "backend_options must be a dict"),
        ({"backend_options": {"chunk": 3}}, "unknown backend_options"),
        ({"impl": "nope"}, "nope"),
        ({"label_smoothing": 0.1, "backend_options": {"filter_mass": True}}, "filter_mass cannot be combined"),
    ):
        with pytest.raises(ValueError, match=match):
            apply_fused_head(model, **kwargs)
        assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="no output embeddings"):
        apply_fused_head(transformers.Qwen3Model(model.config))
    with pytest.raises(ValueError, match="expects a transformers PreTrainedModel"):
        apply_fused_head(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="got the class Linear"):
        apply_fused_head(torch.nn.Linear)


def test_head_check_tied_embedding_and_adapters():
    """`output_head` accepts an `nn.Embedding` head only when it is the model's input embedding (tied)."""
    from trainers.fused_forward import output_head

    class TiedLM(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.out = self.embed if tied else torch.nn.Embedding(VOCAB, 8)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.out

    assert output_head(TiedLM(tied=True)) is not None
    with pytest.raises(ValueError, match="is a torch.nn.modules.sparse.Embedding"):
        output_head(TiedLM(tied=False))


def test_class_removed_under_an_instance_install():
    """A fused trainer's instance install over a patched class keeps working after the class patch is removed."""
    from trainers.fused_forward import FusedHeadSettings, install_fused_head

    ref = tiny_family("qwen3")
    model = copy.deepcopy(ref)
    apply_fused_head(type(model))
    try:
        install_fused_head(model, FusedHeadSettings())  # what the fused trainers do (no loss on labels)
    finally:
        remove_fused_head(type(model))
    ids, mask, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss)
        assert model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs is not None


# ------------------------------------------------------------------------------------------- forwards it cannot copy
def _tiny_bert_like(name):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "ModernBertDecoderForCausalLM":
        config = transformers.ModernBertDecoderConfig(**common, sep_token_id=3, cls_token_id=1)
    elif name == "BartForConditionalGeneration":
        config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64)
    else:
        config = getattr(transformers, name.replace("LMHeadModel", "Config").replace("ForCausalLM", "Config")
                         .replace("ForMaskedLM", "Config"))(**common, is_decoder="MaskedLM" not in name)
    torch.manual_seed(0)
    return getattr(transformers, name)(config).eval()


#: model class -> what its forward does that the fused loss would not (each computed a different loss without error
#: before the check: a transform before the head, no shift, the decoder's inputs, an extra z-loss)
UNREPRODUCIBLE = {
    # (an instance's head is refused first by `output_head`: "not one of its own modules")
    "BertLMHeadModel": "not one of its own (attributes|modules)",  # cls.predictions: dense + norm, then the decoder
    "RobertaForCausalLM": "not one of its own (attributes|modules)",  # lm_head.dense + layer_norm, then lm_head.decoder
    "ModernBertDecoderForCausalLM": "does not call `self.decoder`",  # decoder(lm_head(h)): a norm first
    "BertForMaskedLM": "code of its own|not one of its own modules",  # masked LM: no shift
    "BartForConditionalGeneration": "encoder-decoder|code of its own",
}


@pytest.mark.parametrize("mode", ["instance", "class"])
@pytest.mark.parametrize("name", sorted(UNREPRODUCIBLE))
def test_refuses_a_forward_whose_loss_it_cannot_reproduce(name, mode):
    model = _tiny_bert_like(name)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)  # the model's own loss works
    target = type(model) if mode == "class" else model
    with pytest.raises(ValueError, match=UNREPRODUCIBLE[name]):
        apply_fused_head(target)
    assert "forward" not in model.__dict__ and "_align_losses_class_head" not in type(model).__dict__


def test_refuses_a_forward_that_adds_its_own_loss_term():
    """Bamba adds `z_loss_coefficient * mean(logsumexp**2)` to the loss: not the fused loss's z-loss (per scored token)."""
    with pytest.raises(ValueError, match="z_loss_coefficient"):
        apply_fused_head(transformers.BambaForCausalLM)
    assert "_align_losses_class_head" not in transformers.BambaForCausalLM.__dict__


def test_router_loss_in_another_form_is_refused_when_router_logits_are_on():
    """Doge passes its MoE loss function a top-k computed from the expert count: with router logits on, the fused
    forward cannot reproduce the model's loss, and says so before running the backbone; off, it is the model's loss."""
    config = transformers.DogeConfig(
        **{k: v for k, v in _COMMON.items()}, is_moe=True, num_experts=16, num_experts_per_tok=2,
        router_aux_loss_coef=0.5,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.DogeForCausalLM(config).float()
    model = copy.deepcopy(ref)
    ids, mask, labels = batch()
    apply_fused_head(model)
    calls = HeadCalls(model)
    backbone_calls = []
    model.model.register_forward_pre_hook(lambda *_: backbone_calls.append(1))
    with pytest.raises(ValueError, match="DogeForCausalLM's forward computes its MoE router loss in a form the fused "
                                         "head does not reproduce: call it with output_router_logits=False"):
        model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    assert not backbone_calls and calls.count == 0
    out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=RTOL, atol=0)
    for name, g in ref_grads.items():
        # 1e-4, not RTOL: the gradient of Doge's per-head scalar `A` (its dynamic mask) is a long sum with
        # cancellation, 1.1e-5 apart in fp32 between two summation orders of the same math.
        assert (grads[name] - g).norm() <= 1e-4 * g.norm(), name


def test_every_tested_family_passes_the_forward_check():
    """The source check accepts the families tested above and the common multimodal ones (their forward is the
    pattern), so it refuses only what it must."""
    from trainers.patch import check_causal_lm_forward

    for family in FAMILIES.values():
        check_causal_lm_forward(getattr(transformers, family[0]))
    for name in ("Gemma3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaForConditionalGeneration",
                 "MiniCPM3ForCausalLM", "GptOssForCausalLM", "FalconH1ForCausalLM", "MambaForCausalLM"):
        check_causal_lm_forward(getattr(transformers, name))


def test_no_scored_token_gives_the_models_nan():
    """A batch whose labels are all -100 (a prompt-only row packed alone): transformers divides 0 by 0."""
    ref = tiny_family("qwen3")
    model = apply_fused_head(copy.deepcopy(ref))
    ids, mask, labels = batch()
    none = torch.full_like(labels, -100)
    for extra in ({}, {"num_items_in_batch": 0}, {"num_items_in_batch": torch.tensor(0)}):
        want = ref(input_ids=ids, attention_mask=mask, labels=none, **extra).loss
        assert torch.isnan(want)
        out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=none, **extra)
        assert torch.isnan(out.loss)
        assert all(bool((g == 0).all()) for g in grads.values())  # no NaN reaches the weights
    # num_items_in_batch from the other micro-batches of the step: the sum (0) over it, as the model
    torch.testing.assert_close(model(input_ids=ids, labels=none, num_items_in_batch=9).loss,
                               ref(input_ids=ids, labels=none, num_items_in_batch=9).loss, rtol=0, atol=0)


def test_logits_to_keep_with_labels():
    """``logits_to_keep=0`` (every position, the default) is the fused loss; any other value asks for logits, so the
    model's own forward answers, with its own result (here all T positions: the same loss, with logits)."""
    ref = tiny_family("qwen3")
    model = apply_fused_head(copy.deepcopy(ref))
    calls = HeadCalls(model)
    ids, mask, labels = batch()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=0)
    assert out.logits is None and calls.count == 0
    torch.testing.assert_close(out.loss, want, rtol=RTOL, atol=0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=ids.shape[1])
    assert out.logits is not None and calls.count == 1
    torch.testing.assert_close(out.loss, want, rtol=RTOL, atol=0)


def test_remove_keeps_a_forward_installed_over_ours(monkeypatch):
    """TRL's `add_fused_lm_head` on a patched instance (what `SFTTrainer` does) wraps our forward; removing ours keeps
    TRL's head (it answers its fused calls, as if ours had never been there) and the model's own loss returns."""
    import align_losses
    from trl.trainer.utils import add_fused_lm_head

    ref = tiny_family("qwen3")
    model = apply_fused_head(copy.deepcopy(ref))
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    trl_forward = model.__dict__["forward"]
    remove_fused_head(model)
    assert model.__dict__["forward"] is trl_forward and len(model._forward_pre_hooks) == 0
    core_calls = []
    monkeypatch.setattr(align_losses, "linear_token_stats", lambda *a, **k: core_calls.append(1))
    ids, mask, labels = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        assert out.entropy is not None and not core_calls  # TRL's head, not ours
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=0)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert plain.logits is not None and not core_calls  # the model's own forward under both
        torch.testing.assert_close(plain.loss, want, rtol=0, atol=0)


def _tiny_gemma3_image_text(softcap):
    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         intermediate_size=64, vocab_size=VOCAB + 4, final_logit_softcapping=softcap,
                         max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=VOCAB + 3, boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    return model


def test_gemma3_image_text_softcap_it_does_not_apply_is_refused():
    """Gemma-3's image-text model keeps `final_logit_softcapping` in its text config and does not apply it (the text
    model does): patched, the loss was soft-capped (5.92 against the model's 7.07 here). Without it: the same loss."""
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="final_logit_softcapping=3.0, which its forward does not apply"):
        apply_fused_head(_tiny_gemma3_image_text(3.0))
    cls = transformers.Gemma3ForConditionalGeneration
    apply_fused_head(cls)  # the class: checked on the call, the instance's config is not known before
    try:
        capped = _tiny_gemma3_image_text(3.0)
        with pytest.raises(ValueError, match="final_logit_softcapping=3.0, which its forward does not apply"):
            capped(input_ids=ids, labels=labels)
    finally:
        remove_fused_head(cls)
    ref = _tiny_gemma3_image_text(None)
    model = apply_fused_head(copy.deepcopy(ref))
    assert_same(*loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels),
                *loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels))


def test_accepts_a_class_whose_forward_liger_replaced(monkeypatch):
    """The check reads the forward the model's class defines (its loss is what ours reproduces), not whatever replaced
    it on the class since: after Liger's `apply_liger_kernel_to_qwen3` (which swaps `Qwen3ForCausalLM.forward` for
    its own) the patch is accepted and gives the model's own loss."""
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3

    ref = tiny_family("qwen3")
    ids, mask, labels = batch()
    ref_out, ref_grads = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    model = copy.deepcopy(ref)
    cls = transformers.Qwen3ForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    apply_liger_kernel_to_qwen3(rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=False,
                                swiglu=False)
    assert cls.forward.__module__.startswith("liger_kernel")
    apply_fused_head(model)
    assert_same(*loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels), ref_out, ref_grads)


def test_remove_restores_trls_head_and_nested_installs():
    """Under ours, TRL's head installed first comes back; an instance patch over a class patch outlives the class's
    removal, and removing it leaves the class's own forward."""
    from trl.trainer.utils import add_fused_lm_head

    ref = tiny_family("qwen3")
    ids, mask, labels = batch()
    model = copy.deepcopy(ref)
    add_fused_lm_head(model)
    trl_forward = model.__dict__["forward"]
    apply_fused_head(model)
    remove_fused_head(model)
    assert model.__dict__["forward"] is trl_forward and len(model._forward_pre_hooks) == 0

    cls = type(ref)
    original = cls.__dict__["forward"]
    model = copy.deepcopy(ref)
    apply_fused_head(cls)
    try:
        apply_fused_head(model, z_loss=1e-2)
    finally:
        remove_fused_head(cls)
    assert cls.__dict__["forward"] is original
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)  # the instance's patch, z-loss included
        assert out.logits is None and out.loss > ref(input_ids=ids, labels=labels).loss
    remove_fused_head(model)
    assert "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss)
