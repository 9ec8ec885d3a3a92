"""knorm_study.norm_distributions."""

from __future__ import annotations

import torch

import knorm_lib as kl
from helpers import HEAD_DIM, N_KV_HEADS, N_LAYERS, N_TOKENS
from knorm_study import norm_distributions


def test_token_kinds(real_model):
    _, tok = real_model
    ids = kl.encode(tok, "The cat sat.\nIt was happy, and fed.")
    kinds = norm_distributions.token_kinds(tok, ids)
    text = [tok.decode([t]) for t in ids[0].tolist()]
    by_text = dict(zip(text, kinds))
    assert kinds[0] == "first"
    assert by_text["."] == "punctuation" and by_text[","] == "punctuation"
    assert by_text[" and"] == "stop_word" and by_text[" cat"] == "other"
    assert any(k == "newline" for k in kinds)
    assert set(kinds) <= set(norm_distributions.TOKEN_KINDS)


def test_key_norms_equal_pre_rope_norms(tiny64, ids):
    """RoPE rotates coordinate pairs, so a key's L2 norm is the same before and after it: the
    norms KnormPress ranks by (post-RoPE, from the cache) are the pre-RoPE norms. Also checks
    key_norms' shape (layers, H_kv, S) and float32 dtype."""
    captured = {}

    def hook(layer_idx):
        def fn(module, args, output):
            b, s, _ = output.shape
            captured[layer_idx] = output.view(b, s, N_KV_HEADS, HEAD_DIM).transpose(1, 2)
        return fn

    handles = [layer.self_attn.k_proj.register_forward_hook(hook(i)) for i, layer in enumerate(tiny64.model.layers)]
    try:
        norms = norm_distributions.key_norms(kl.prefill(tiny64, ids).cache)
    finally:
        for h in handles:
            h.remove()
    assert norms.shape == (N_LAYERS, N_KV_HEADS, N_TOKENS)
    assert norms.dtype == torch.float32
    pre_rope = torch.stack([captured[i][0].norm(dim=-1) for i in range(N_LAYERS)])
    torch.testing.assert_close(norms.double(), pre_rope, rtol=1e-5, atol=1e-5)
    # RoPE really was applied to the cached keys (else the test would be vacuous)
    post_rope = kl.prefill(tiny64, ids).cache.keys[2]
    assert not torch.allclose(post_rope, captured[2])


def test_norm_spread_per_layer_and_layer_type():
    """On a hybrid model (a tiny Gemma 3: local, global, local) the spread per layer equals std / mean
    of the cached keys' norms computed here from the prefill (positions after the first, per head,
    averaged over documents); ``spread_summary`` groups it by layer type and ``findings`` states it."""
    import math

    from helpers import tiny_family

    class Tok:   # every token "other" but the first
        def decode(self, ids):
            return "x"

    model, _ = tiny_family("gemma3_text")
    docs = [("wiki", kl.TokenizedDoc(f"d{s}", torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(s))))
            for s in (1, 2)]
    table = norm_distributions.norm_table(model, Tok(), docs)
    spread = norm_distributions.norm_spread(table)
    for layer in range(3):
        expected = []
        for _, doc in docs:
            norms = kl.prefill(model, doc.input_ids).cache.keys[layer][0, :, 1:].double().norm(dim=-1)   # (H_kv, n - 1)
            expected += (norms.std(dim=-1, unbiased=False) / norms.mean(dim=-1)).tolist()
        assert math.isclose(spread[layer], sum(expected) / len(expected), rel_tol=1e-5)
    recorded = norm_distributions.spread_summary(model, table)
    types = recorded["by_layer_type"]
    assert types["sliding_attention"]["layers"] == [0, 2] and types["full_attention"]["layers"] == [1]
    assert types["full_attention"]["key_norm_cv_median"] == spread[1]
    record = {"results": {"summary": norm_distributions.summarize(table, 8, len(docs)), "spread": recorded}}
    assert "local (sliding-window) layers (2)" in norm_distributions.findings(record)
    record["results"].pop("spread")   # a record from before: no sentence about it
    assert "Spread of key norms" not in norm_distributions.findings(record)
