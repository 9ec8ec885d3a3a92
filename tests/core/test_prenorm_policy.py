"""knorm_prenorm: KnormPress scored on the key before QK-norm, and its kvpress press."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import knorm_lib as kl
from helpers import random_ids

QK_NORM = {"qwen3": dict(head_dim=16),
           "olmo2": dict(),   # k_norm over the whole projection, all heads at once
           "gemma3_text": dict(head_dim=16, layer_types=["full_attention"] * 3)}   # global layers only


def _qk_norm_model(model_type: str):
    """A tiny float64 random-weight model with QK-norm, built from its config (k_norm's gain far
    from 1, so the normalised and the projected keys rank differently)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                               max_position_embeddings=512, **QK_NORM[model_type])
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    kl._register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.3 if "norm" in name else torch.randn_like(p) * 0.2)
    assert kl.has_qk_norm(model)
    return model


def _projected_key_norms(model, run) -> dict[int, torch.Tensor]:
    """An independent computation: each layer's k_proj output in the first forward of ``run()``,
    captured by a hook, its per-head norms (H_kv, n)."""
    out, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, output, i=i):
            out.setdefault(i, output[0].view(output.shape[1], model.config.num_key_value_heads, -1).norm(dim=-1).T)
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return out, result


def test_without_qk_norm_it_keeps_exactly_what_knorm_keeps(tiny64, real_model, news_ids):
    """On a model without QK-norm (a tiny Llama, SmolLM2) the kept sets are knorm's, prefill and
    one-pass streaming alike."""
    for model, ids in ((tiny64, random_ids(37, seed=1)), (real_model[0], news_ids[:, :160])):
        assert not kl.has_qk_norm(model)
        pre = kl.prefill(model, ids, capture_hidden=True)
        for ratio in (0.7, 0.3):
            ours = kl.compress_cache(pre.cache, ratio, "knorm_prenorm", (), layer_inputs=pre.layer_inputs)
            knorm = kl.compress_cache(pre.cache, ratio, "knorm", ())
            assert all(torch.equal(a, b) for a, b in zip(ours.positions, knorm.positions))
        stream = kl.streaming_ppl(model, ids[:, :64], "knorm_prenorm", keep_ratio=0.5, skip_layers=(0,))
        plain = kl.streaming_ppl(model, ids[:, :64], "knorm", keep_ratio=0.5, skip_layers=(0,))
        assert stream.evictions.keys() == plain.evictions.keys()
        assert all(torch.equal(stream.evictions[i], plain.evictions[i]) for i in plain.evictions)
        assert torch.equal(stream.nll, plain.nll)


@pytest.mark.parametrize("model_type", sorted(QK_NORM))
def test_with_qk_norm_it_keeps_the_lowest_projected_key_norms(model_type):
    """On Qwen 3, OLMo 2 and Gemma 3 (random weights) the kept set is the lowest norms of k_proj's
    output, computed independently, and differs from knorm's (the cached, normalised key's)."""
    model = _qk_norm_model(model_type)
    ids = random_ids(40, seed=2)
    norms, pre = _projected_key_norms(model, lambda: kl.prefill(model, ids, capture_hidden=True))
    n_kept = kl.n_kept_for(40, 0.5)
    ours = kl.compress_cache(pre.cache, 0.5, "knorm_prenorm", (), layer_inputs=pre.layer_inputs)
    knorm = kl.compress_cache(pre.cache, 0.5, "knorm", ())
    for layer, positions in enumerate(ours.positions):
        expected = norms[layer].argsort(dim=-1)[:, :n_kept].sort(dim=-1).values
        assert torch.equal(positions[0], expected), layer
    assert any(not torch.equal(a, b) for a, b in zip(ours.positions, knorm.positions))
    # streaming: the one-pass engine evicts by the norms of its own forward's k_proj outputs (a token's
    # score is fixed once its key exists; later layers see the compressed layers' outputs)
    norms, res = _projected_key_norms(
        model, lambda: kl.streaming_ppl(model, ids, "knorm_prenorm", max_cache=12, skip_layers=()))
    for layer, evict in res.evictions.items():
        expected = kl.eviction_steps(-norms[layer].float(), kl.budget_schedule(40, max_cache=12))
        assert torch.equal(evict, expected), layer
    with pytest.raises(ValueError, match="engine"):
        kl.streaming_ppl(model, ids, "knorm_prenorm", keep_ratio=0.5, engine="sequential")


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_the_kvpress_press_keeps_what_the_policy_keeps(model_type):
    """``PrenormKnormPress`` under kvpress's protocol (a context manager around the prefill) keeps,
    per layer and KV head, the policy's kept set."""
    from knorm_study.presses import PrenormKnormPress

    model = _qk_norm_model(model_type)
    ids = random_ids(40, seed=3)
    full = kl.prefill(model, ids, capture_hidden=True)
    ours = kl.compress_cache(full.cache, 0.5, "knorm_prenorm", (), layer_inputs=full.layer_inputs)
    with torch.no_grad(), PrenormKnormPress(compression_ratio=0.5)(model):
        theirs = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    for layer, cached in enumerate(theirs.layers):
        keys = full.cache.keys[layer][0]
        match = (cached.keys[0][:, :, None, :] == keys[:, None, :, :]).all(-1)   # (H_kv, n_kept, n)
        assert bool((match.sum(-1) == 1).all()), layer
        kept = match.int().argmax(-1).sort(dim=-1).values
        assert torch.equal(kept, ours.positions[layer][0]), layer
