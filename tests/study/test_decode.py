"""Greedy decoding on a compressed cache: the tokens of plain decoding, true positions, the
in-place decode cache and grouped decode attention."""

from __future__ import annotations

import pytest
import torch

import knorm_lib as kl
from helpers import CONTEXT, HEAD_DIM, N_KV_HEADS, N_LAYERS, _greedy_reference
from knorm_study import decode


def test_generate_greedy_leaves_the_prefill_untouched(tiny64, ids):
    """Decoding from a shared prefill (the explorer, 05) must not grow or modify its cache."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    snapshot = [(k.clone(), v.clone()) for k, v in zip(pre.cache.keys, pre.cache.values)]
    decode.generate_greedy(tiny64, ids[:, :CONTEXT], 5, keep_ratio=0.5, pre=pre)
    assert pre.cache.lengths() == [CONTEXT] * N_LAYERS
    for (k, v), k2, v2 in zip(snapshot, pre.cache.keys, pre.cache.values):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_generate_greedy_keep_all_equals_reference(tiny64, ids):
    """generate_greedy with keep_ratio=1 must reproduce plain greedy decoding token for token."""
    prompt = ids[:, :CONTEXT]
    gen = decode.generate_greedy(tiny64, prompt, 12, keep_ratio=1.0)
    ref = _greedy_reference(tiny64, prompt, 12)
    assert gen.shape == (12,)
    assert torch.equal(gen, ref)


@pytest.mark.parametrize("position_mode", ["absolute", "cache_relative", "rerotated"])
def test_generate_greedy_positions_match_teacher_forcing(position_mode, tiny64, ids):
    """Under compression, each greedy token must be the argmax of the teacher-forced continuation
    over the same compressed cache in the same position mode: the decoding loop numbers its tokens
    exactly like continuation_logits does. skip_layers=(1,) mixes a compressed layer 0 (what
    cache_relative keys on) with a whole layer (what rerotated shifts)."""
    prompt = ids[:, :CONTEXT]
    gen = decode.generate_greedy(tiny64, prompt, 10, keep_ratio=0.5, skip_layers=(1,), position_mode=position_mode)
    pre = kl.prefill(tiny64, prompt)
    cache = kl.compress_cache(pre.cache, 0.5, "knorm", skip_layers=(1,))
    logits = kl.continuation_logits(tiny64, cache, gen[:-1].view(1, -1), position_mode)
    assert torch.equal(logits.argmax(-1), gen[1:])
    assert gen[0] == pre.last_logits.argmax()


def test_in_place_decode_cache_appends_exactly(tiny64, ids):
    """The in-place decode cache hands attention bitwise the same keys and values as transformers'
    DynamicCache, layers of different lengths included, when the preallocated room runs out (it
    grows), and the KVCache it came from is never touched."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, 0.5, skip_layers=(1,))
    before = [k.clone() for k in cache.keys]
    in_place, dynamic = decode.in_place_cache(cache, room=3), cache.to_transformers()
    assert [layer.get_seq_length() for layer in in_place.layers] == cache.lengths()
    gen = torch.Generator().manual_seed(0)
    for step in range(7):  # room for 3: the buffer grows on step 4
        for i, n in enumerate(cache.lengths()):
            k, v = torch.randn(2, 1, N_KV_HEADS, 1, HEAD_DIM, generator=gen, dtype=torch.float64)
            a, b = in_place.update(k, v, i), dynamic.update(k, v, i)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape[2] == n + step + 1
            assert in_place.layers[i].get_seq_length() == n + step + 1
    assert all(torch.equal(k, b) for k, b in zip(cache.keys, before))


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_grouped_decode_attention_equals_per_head(keep_ratio, tiny64, ids):
    """A decode step's grouped-query attention (each KV head's query group as one block) is the
    per-query-head attention up to float rounding: float64 logits agree to 1e-12, and greedy
    generation on the in-place cache gives the tokens of the DynamicCache, per-head path."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, keep_ratio)
    token = pre.last_logits.argmax(-1).view(1, 1)
    position = torch.tensor([[CONTEXT]])
    logits = {}
    for grouped in (True, False):
        with kl.grouped_decoding(grouped):
            logits[grouped] = tiny64(input_ids=token, past_key_values=decode.in_place_cache(cache, room=1),
                                     position_ids=position).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-12)
    dyn, in_place = cache.to_transformers(), decode.in_place_cache(cache, room=8)
    a = b = token
    for t in range(8):
        a = decode.greedy_step(tiny64, dyn, a, CONTEXT + t, grouped=False)
        b = decode.greedy_step(tiny64, in_place, b, CONTEXT + t)
        assert torch.equal(a, b)
