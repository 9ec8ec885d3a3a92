"""Compression: counts, skips, storage order, the tie rule, re-rotation, kvpress agreement."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import knorm_lib as kl
from helpers import AWKWARD_RATIOS, CONTEXT, N_LAYERS, _check_consistent


def test_n_kept_matches_kvpress():
    """n_kept_for must be kvpress's compute_n_kept(n, 1 - keep_ratio) exactly (float truncation
    included), so our compression ratios mean what kvpress's mean."""
    from kvpress.utils import compute_n_kept

    for keep_ratio in AWKWARD_RATIOS:
        for n in range(1, 300):
            assert kl.n_kept_for(n, keep_ratio) == compute_n_kept(n, 1 - keep_ratio), (n, keep_ratio)
    assert kl.n_kept_for(100, 1.0) == 100
    assert kl.n_kept_for(3, 0.1) == 1  # never empties a layer


@pytest.mark.parametrize("keep_ratio", [0.9, 0.7, 0.5, 0.3, 0.1, 1 / 3])
@pytest.mark.parametrize("order", ["original", "by_norm"])
def test_compress_cache_counts_skips_and_order(keep_ratio, order, full_cache):
    """compress_cache keeps n_kept_for(S, keep_ratio) tokens per compressed layer, leaves the
    skip_layers (default (0, 1)) untouched, stores kept tokens by position ("original") or by
    ascending key norm ("by_norm"), and never mutates its input."""
    s = full_cache.seq_len
    before = [k.clone() for k in full_cache.keys]
    comp = kl.compress_cache(full_cache, keep_ratio, "knorm", order=order)
    assert comp.seq_len == s
    n_kept = kl.n_kept_for(s, keep_ratio)
    assert comp.lengths() == [s, s] + [n_kept] * (N_LAYERS - 2)
    for layer in (0, 1):
        assert torch.equal(comp.keys[layer], full_cache.keys[layer])
        assert torch.equal(comp.values[layer], full_cache.values[layer])
        assert torch.equal(comp.positions[layer], full_cache.positions[layer])
    for layer in range(2, N_LAYERS):
        _check_consistent(comp, full_cache, layer)
        pos = comp.positions[layer]
        if order == "original":
            assert torch.equal(pos, pos.sort(dim=-1).values)
        else:
            norms = comp.keys[layer].float().norm(dim=-1)
            assert (norms[..., 1:] >= norms[..., :-1]).all()
    for k, b in zip(full_cache.keys, before):
        assert torch.equal(k, b)


def test_orders_keep_the_same_set(full_cache):
    """"original" and "by_norm" differ only in storage order, never in which tokens are kept."""
    a = kl.compress_cache(full_cache, 0.5, "knorm", skip_layers=(), order="original")
    b = kl.compress_cache(full_cache, 0.5, "knorm", skip_layers=(), order="by_norm")
    for pa, pb in zip(a.positions, b.positions):
        assert torch.equal(pa, pb.sort(dim=-1).values)


def test_keep_indices_keeps_the_newest_of_equal_scores():
    scores = torch.tensor([[[1.0, 2.0, 1.0, 2.0, 1.0, 0.5]]])
    positions = torch.arange(6).expand(1, 1, 6)
    assert sorted(kl.keep_indices(scores, positions, 3)[0, 0].tolist()) == [1, 3, 4]
    # storage order need not be positional: the rule reads positions, not slots
    shuffled = torch.tensor([[[5, 0, 3, 1, 4, 2]]])
    kept = kl.keep_indices(scores.gather(-1, shuffled), shuffled, 3)
    assert sorted(shuffled.gather(-1, kept)[0, 0].tolist()) == [1, 3, 4]


def test_prefill_compression_keeps_the_newest_of_tied_tokens(tiny64, all_tied):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = kl.prefill(tiny64, ids).cache
    for keep_ratio in (0.5, 0.25, 0.1):
        n_kept = kl.n_kept_for(40, keep_ratio)
        out = kl.compress_cache(cache, keep_ratio, all_tied, skip_layers=())
        for positions in out.positions:
            assert bool((positions == torch.arange(40 - n_kept, 40)).all())


def test_storage_by_norm_orders_equal_norms_by_position(tiny64):
    """Repeated tokens at the same position-free layer input tie in norm: equal norms store by position."""
    ids = torch.tensor([[7, 9, 7, 9, 7, 9, 7, 9, 3, 3, 3, 3]])
    cache = kl.prefill(tiny64, ids).cache
    out = kl.compress_cache(cache, 1.0, "knorm", skip_layers=(), order="by_norm")
    norms = kl._norms(out.keys[0])[0]
    pos = out.positions[0][0]
    for head in range(norms.shape[0]):
        assert bool((norms[head, 1:] >= norms[head, :-1]).all())
        tied = norms[head, 1:] == norms[head, :-1]
        assert bool((pos[head, 1:][tied] > pos[head, :-1][tied]).all())


def test_rerotation_is_identity_when_nothing_evicted(tiny64, ids):
    """keep_ratio=1, order="original", every layer "compressed": each slot equals its position,
    the rotation is the identity, and "rerotated" must equal "absolute"."""
    absolute = kl.prefill_ppl(tiny64, ids, CONTEXT, 1.0, skip_layers=())
    rerotated = kl.prefill_ppl(tiny64, ids, CONTEXT, 1.0, skip_layers=(), position_mode="rerotated")
    torch.testing.assert_close(absolute.nll, rerotated.nll, rtol=0, atol=1e-6)


def test_rerotation_with_every_layer_skipped_equals_absolute(tiny64, ids):
    """With every layer skipped (keep_ratio<1 asked, nothing evicted), re-rotation must preserve
    attention: "rerotated" equals "absolute"."""
    all_layers = tuple(range(N_LAYERS))
    absolute = kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, skip_layers=all_layers)
    rerotated = kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, skip_layers=all_layers, position_mode="rerotated")
    torch.testing.assert_close(absolute.nll, rerotated.nll, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rerotation_by_a_uniform_shift_preserves_attention(dtype, tiny64, tiny32, ids):
    """A non-trivial rotation: streaming with n_sink=0 keeps a contiguous window (positions
    S-n_kept..S-1) in layers 2-3, while layers 0-1 are skipped (whole). Re-rotation moves EVERY
    layer's keys back by the same S-n_kept positions and numbers the new tokens from n_kept, so
    every query-key distance is unchanged and the result must equal "absolute". A wrong sign or
    angle in the rotation, or a skipped layer not shifted along, breaks this."""
    model = tiny64 if dtype == torch.float64 else tiny32
    kw = dict(policy="streaming", n_sink=0, skip_layers=(0, 1))
    absolute = kl.prefill_ppl(model, ids, CONTEXT, 0.75, **kw)
    rerotated = kl.prefill_ppl(model, ids, CONTEXT, 0.75, position_mode="rerotated", **kw)
    relative = kl.prefill_ppl(model, ids, CONTEXT, 0.75, position_mode="cache_relative", **kw)
    torch.testing.assert_close(absolute.nll.double(), rerotated.nll.double(), rtol=0, atol=1e-5)
    # the shift is real: without re-rotating the keys, the same query positions give another result
    assert (absolute.nll - relative.nll).abs().max().item() > 1e-4


def test_rerotate_keys_positions(tiny64, full_cache):
    """rerotate_keys puts compressed layers at slots 0..n_kept-1 (in storage order), shifts the
    skipped layers as a whole to end at n_kept-1, and returns n_kept as the next position."""
    s = full_cache.seq_len
    comp = kl.compress_cache(full_cache, 0.5, "knorm", skip_layers=(0, 1), order="by_norm")
    n_kept = kl.n_kept_for(s, 0.5)
    rot, next_pos = kl.rerotate_keys(comp, tiny64)
    assert next_pos == n_kept
    for layer in range(N_LAYERS):
        length = s if layer < 2 else n_kept
        expected = torch.arange(n_kept - length, n_kept).expand_as(rot.positions[layer])
        assert torch.equal(rot.positions[layer], expected)
        assert torch.equal(rot.values[layer], comp.values[layer])
        # a rotation: norms unchanged, keys moved
        torch.testing.assert_close(rot.keys[layer].norm(dim=-1), comp.keys[layer].norm(dim=-1))
        assert not torch.allclose(rot.keys[layer], comp.keys[layer])


@pytest.mark.parametrize("keep_ratio", [0.5, 0.9])
def test_kept_set_matches_kvpress_knormpress(keep_ratio, real_model, news_ids, news_prefill):
    """Our "knorm" compression keeps, per layer and KV head, the tokens that kvpress's own
    KnormPress keeps for the same ratio (skip_layers=(), every layer compressed), wherever
    kvpress's order is defined: kvpress ranks with ``topk``, which orders equal scores arbitrarily,
    while ours keeps the newest of equal scores (``keep_indices``). So the kept sets may differ
    only in tokens whose score equals the boundary score, and layer 0 of real prose has such exact
    ties (repeated tokens, whose key norms RoPE leaves unchanged).

    kvpress runs as a context manager during a prefill with the same attention function, so both
    caches hold bit-identical keys; kvpress's kept key rows are matched against the full cache to
    recover their original positions. kvpress stores kept tokens in score order (ascending norm),
    which is our order="by_norm" (equal norms: by position)."""
    import kvpress

    model, _ = real_model
    full = news_prefill.cache
    press = kvpress.KnormPress(compression_ratio=1 - keep_ratio)
    with torch.no_grad(), press(model):
        out = model(input_ids=news_ids, past_key_values=DynamicCache(), use_cache=True)
    theirs = out.past_key_values
    ours = kl.compress_cache(full, keep_ratio, "knorm", skip_layers=())
    ours_by_norm = kl.compress_cache(full, keep_ratio, "knorm", skip_layers=(), order="by_norm")
    n_kept = kl.n_kept_for(news_ids.shape[1], keep_ratio)
    assert len(theirs.layers) == len(full.keys) == model.config.num_hidden_layers
    n_tie_swaps = 0
    for layer, cached in enumerate(theirs.layers):
        their_keys = cached.keys[0]                                   # (H_kv, n_kept, D)
        assert their_keys.shape[1] == n_kept == ours.keys[layer].shape[2]
        match = (their_keys[:, :, None, :] == full.keys[layer][0][:, None, :, :]).all(-1)  # (H_kv, n_kept, S)
        assert match.sum(-1).min() >= 1, f"layer {layer}: a kvpress key is not a row of the full cache"
        norms = full.keys[layer][0].float().norm(dim=-1)              # (H_kv, S)
        boundary = norms.sort(dim=-1).values[:, n_kept - 1]           # the largest kept norm, per head
        for head in range(their_keys.shape[0]):
            theirs_set = set(match[head].int().argmax(-1).tolist())
            ours_set = set(ours.positions[layer][0, head].tolist())
            differ = sorted(theirs_set ^ ours_set)
            assert all(norms[head, j] == boundary[head] for j in differ), \
                f"layer {layer} head {head}: kept sets differ beyond exact ties at the boundary"
            n_tie_swaps += len(differ) // 2
            # storage: the same sequence of norms (ascending); equal norms may sit in either order
            assert torch.equal(their_keys[head].float().norm(dim=-1),
                               ours_by_norm.keys[layer][0, head].float().norm(dim=-1))
            if not differ:
                their_pos = match[head].int().argmax(-1)
                ours_pos = ours_by_norm.positions[layer][0, head]
                same_place = their_pos == ours_pos
                tied = (norms[head, ours_pos][:, None] == norms[head, ours_pos][None, :]).sum(-1) > 1
                assert bool((same_place | tied).all()), f"layer {layer} head {head}: different storage order"
    print(f"kept-set differences at exact boundary ties: {n_tie_swaps}")



def _rope(k: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE by hand (rotate-half layout) of keys ``(n, D)`` at ``positions`` with ``base``."""
    d = k.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    return k * angles.cos() + torch.cat([-k[:, d // 2:], k[:, :d // 2]], dim=-1) * angles.sin()


def test_rerotation_uses_each_layers_own_rope():
    """Gemma 3 rotates local and global layers with different bases (10k and 1M): re-rotation moves
    each kept key to its slot with its own layer's base. Checked against a hand computation from
    the keys before RoPE (k_norm's output, captured by a hook). Windows are off in this config (the
    attention function does not implement them yet), the per-type RoPE stays on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=256,
                               max_position_embeddings=512, sliding_window=None,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    kl._register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    before_rope, handles = {}, []

    def keep(i):
        def hook(module, args, out):
            before_rope[i] = out   # Gemma 3 normalises (1, H_kv, n, D), after the transpose
        return hook
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_norm.register_forward_hook(keep(i)))
    pre = kl.prefill(model, torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4)))
    for h in handles:
        h.remove()
    comp = kl.compress_cache(pre.cache, 0.5, "knorm", ())
    rot, next_position = kl.rerotate_keys(comp, model)
    bases = {"sliding_attention": 10_000.0, "full_attention": 1_000_000.0}
    for i, layer_type in enumerate(cfg.layer_types):
        kept = comp.positions[i][0, 0]                               # the one KV head's kept positions
        k = before_rope[i][0, 0, kept]                               # (n_kept, D)
        slots = torch.arange(next_position - kept.numel(), next_position, dtype=torch.float64)
        expected = _rope(k, slots, bases[layer_type])
        # transformers computes RoPE's cos and sin in float32 even for a float64 model
        torch.testing.assert_close(rot.keys[i][0, 0], expected, rtol=0, atol=1e-6)
        other = "full_attention" if layer_type == "sliding_attention" else "sliding_attention"
        assert not torch.allclose(rot.keys[i][0, 0], _rope(k, slots, bases[other]), atol=1e-3)
