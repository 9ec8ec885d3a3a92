"""Core properties of knorm_lib, checked on a tiny random-weight Llama (fast, no data needed).

Each test states the property it checks and why the study depends on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import knorm_lib as kl

N_TOKENS = 64
CONTEXT = 40
N_LAYERS = 4
N_KV_HEADS = 2
HEAD_DIM = 16


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """``(1, n)`` random token ids from a seeded generator (independent of the global RNG)."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids():
    return random_ids(N_TOKENS, seed=0)


def _full_forward_nll(model, ids, context_len):
    """Reference: cross-entropy of ONE plain forward over all tokens, at the scored positions."""
    with torch.no_grad():
        logits = model(ids).logits[0]
    return F.cross_entropy(logits[context_len:-1].double(), ids[0, context_len + 1:], reduction="none")


# ----------------------------------------------------------------------------------------------
# 1. keep_ratio = 1 is the model itself
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keep_all_reproduces_model_loss(dtype, tiny64, tiny32, ids):
    """keep_ratio=1: prefill + teacher-forced continuation must give exactly the loss of one
    plain forward (positions context_len..n-2 predicting tokens context_len+1..n-1), with KL 0.
    Otherwise every compressed number would be measured against the wrong baseline."""
    model = tiny64 if dtype == torch.float64 else tiny32
    res = kl.prefill_ppl(model, ids, CONTEXT, keep_ratio=1.0)
    ref = _full_forward_nll(model, ids, CONTEXT)
    assert res.nll.shape == (N_TOKENS - CONTEXT - 1,)
    torch.testing.assert_close(res.nll.double(), ref, rtol=1e-5, atol=1e-6)
    assert math.isclose(res.nll.double().mean().item(), ref.mean().item(), rel_tol=1e-5)
    assert res.kl_mean == 0.0
    assert res.top1_agree == 1.0
    assert res.n_kept == CONTEXT


def test_keep_all_by_norm_is_lossless(tiny64, ids):
    """keep_ratio=1 with order="by_norm" goes through the real compression code path (every
    layer gathered into norm order) and must still match the plain forward: KL ~ 0, top-1
    agreement 1. (keep_ratio=1 with "original" takes the identity shortcut, tested above.)"""
    res = kl.prefill_ppl(tiny64, ids, CONTEXT, keep_ratio=1.0, skip_layers=(), order="by_norm")
    ref = _full_forward_nll(tiny64, ids, CONTEXT)
    torch.testing.assert_close(res.nll.double(), ref, rtol=1e-5, atol=1e-6)
    assert res.kl.max().item() < 1e-10
    assert res.top1_agree == 1.0


# ----------------------------------------------------------------------------------------------
# 2. Storage order matters only under re-rotation
# ----------------------------------------------------------------------------------------------

def test_order_irrelevant_under_absolute_positions(tiny64, ids):
    """Attention over cached keys is a set operation: with true ("absolute") positions, storing
    the kept tokens by norm instead of by position changes neither logits nor NLL. This refutes
    the write-up's explanation of its perplexity jump."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    new_ids = ids[:, CONTEXT:-1]
    caches = {o: kl.compress_cache(pre.cache, 0.5, "knorm", skip_layers=(), order=o) for o in kl.ORDERS}
    # the by_norm cache really is stored in a different order (else the test would be vacuous)
    assert any(not torch.equal(a, b) for a, b in zip(caches["original"].positions, caches["by_norm"].positions))
    logits = {o: kl.continuation_logits(tiny64, c, new_ids, "absolute") for o, c in caches.items()}
    torch.testing.assert_close(logits["original"], logits["by_norm"], rtol=1e-5, atol=1e-5)

    nll = {o: kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, skip_layers=(), order=o).nll for o in kl.ORDERS}
    torch.testing.assert_close(nll["original"], nll["by_norm"], rtol=1e-5, atol=1e-5)


def test_order_matters_under_rerotation(tiny64, ids):
    """Re-rotation assigns positions by storage slot, so there (and only there) by_norm storage
    moves keys to different positions and must change the result."""
    nll = {o: kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, skip_layers=(), order=o, position_mode="rerotated").nll
           for o in kl.ORDERS}
    assert (nll["original"] - nll["by_norm"]).abs().max().item() > 1e-4


# ----------------------------------------------------------------------------------------------
# 3. cache_relative positions: the write-up's bug
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_ratio", [0.9, 0.5, 0.1, 0.99])
def test_cache_relative_changes_result_when_evicting(keep_ratio, tiny64, ids):
    """Numbering new tokens from the compressed length puts queries at the wrong distance from
    every key, so whenever anything was evicted the result must change."""
    assert kl.n_kept_for(CONTEXT, keep_ratio) < CONTEXT
    absolute = kl.prefill_ppl(tiny64, ids, CONTEXT, keep_ratio, skip_layers=())
    relative = kl.prefill_ppl(tiny64, ids, CONTEXT, keep_ratio, skip_layers=(), position_mode="cache_relative")
    assert (absolute.nll - relative.nll).abs().max().item() > 1e-4


def test_cache_relative_equals_absolute_when_nothing_evicted(tiny64, ids):
    """With keep_ratio=1 the compressed length IS the true length, so the modes coincide."""
    absolute = kl.prefill_ppl(tiny64, ids, CONTEXT, 1.0, skip_layers=())
    relative = kl.prefill_ppl(tiny64, ids, CONTEXT, 1.0, skip_layers=(), position_mode="cache_relative")
    torch.testing.assert_close(absolute.nll, relative.nll, rtol=0, atol=1e-10)


def test_cache_relative_is_what_transformers_does_without_position_ids(tiny64, ids):
    """The "cache_relative" mode claims to reproduce ``model(new_ids, past_key_values=cache)``
    without position_ids on a cache whose layer 0 was compressed. Check that claim, so the
    study's reproduction of the bug is faithful."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, 0.5, "knorm", skip_layers=())
    new_ids = ids[:, CONTEXT:-1]
    with torch.no_grad():
        naive = tiny64(input_ids=new_ids, past_key_values=cache.to_transformers(), use_cache=True).logits[0]
    torch.testing.assert_close(kl.continuation_logits(tiny64, cache, new_ids, "cache_relative"), naive,
                               rtol=1e-7, atol=1e-9)
    assert not torch.allclose(kl.continuation_logits(tiny64, cache, new_ids, "absolute"), naive, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 4. How many and which tokens are kept
# ----------------------------------------------------------------------------------------------

AWKWARD_RATIOS = [0.9, 0.7, 0.3, 0.1, 1 / 3, 2 / 3, 0.5, 0.25, 0.05, 0.01, 0.999, 1e-9, 1.0]


def test_n_kept_matches_kvpress():
    """n_kept_for must be kvpress's compute_n_kept(n, 1 - keep_ratio) exactly (float truncation
    included), so our compression ratios mean what kvpress's mean."""
    from kvpress.utils import compute_n_kept

    for keep_ratio in AWKWARD_RATIOS:
        for n in range(1, 300):
            assert kl.n_kept_for(n, keep_ratio) == compute_n_kept(n, 1 - keep_ratio), (n, keep_ratio)
    assert kl.n_kept_for(100, 1.0) == 100
    assert kl.n_kept_for(3, 0.1) == 1  # never empties a layer


@pytest.fixture(scope="module")
def full_cache(tiny64):
    """An uncompressed prefill cache of 37 tokens (odd, so ratios truncate)."""
    return kl.prefill(tiny64, random_ids(37, seed=1)).cache


def _check_consistent(comp: kl.KVCache, full: kl.KVCache, layer: int) -> None:
    """Every kept (key, value) row is the full cache's row at the recorded original position."""
    pos = comp.positions[layer]
    idx = pos.unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)
    assert torch.equal(comp.keys[layer], full.keys[layer].gather(2, idx))
    assert torch.equal(comp.values[layer], full.values[layer].gather(2, idx))


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


def _brute_force_kept(keys: torch.Tensor, n_kept: int, lowest: bool) -> torch.Tensor:
    """Sorted positions of the n_kept lowest (or highest) key norms, per KV head."""
    norms = keys[0].double().norm(dim=-1)  # (H_kv, S)
    order = norms.argsort(dim=-1, descending=not lowest)
    return order[:, :n_kept].sort(dim=-1).values


@pytest.mark.parametrize("policy,lowest", [("knorm", True), ("high_norm", False)])
@pytest.mark.parametrize("keep_ratio", [0.7, 0.5, 0.1])
def test_norm_policies_keep_lowest_or_highest_norms(policy, lowest, keep_ratio, full_cache):
    """knorm keeps, per layer and per KV head, exactly the lowest-norm keys (the paper's
    method); high_norm keeps the highest (the paper's ablation). Checked against argsort."""
    comp = kl.compress_cache(full_cache, keep_ratio, policy, skip_layers=())
    n_kept = kl.n_kept_for(full_cache.seq_len, keep_ratio)
    for layer in range(N_LAYERS):
        expected = _brute_force_kept(full_cache.keys[layer], n_kept, lowest)
        assert torch.equal(comp.positions[layer][0], expected), (policy, layer)
        _check_consistent(comp, full_cache, layer)
        # the heads choose independently (else per-head selection would be untested)
    assert any(not torch.equal(p[0, 0], p[0, 1]) for p in comp.positions)


@pytest.mark.parametrize("n_sink", [4, 2, 0])
def test_streaming_keeps_sinks_and_recent(n_sink, full_cache):
    """streaming keeps the first n_sink tokens plus the most recent ones (StreamingLLM)."""
    s = full_cache.seq_len
    comp = kl.compress_cache(full_cache, 0.5, "streaming", skip_layers=(), options=kl.PolicyOptions(n_sink=n_sink))
    n_kept = kl.n_kept_for(s, 0.5)
    expected = torch.cat([torch.arange(n_sink), torch.arange(s - (n_kept - n_sink), s)])
    for p in comp.positions:
        assert torch.equal(p, expected.expand_as(p))


def test_random_policy_is_seeded(full_cache):
    """random is reproducible with the same seed and differs with another seed."""
    def kept(seed):
        return kl.compress_cache(full_cache, 0.5, "random", skip_layers=(), options=kl.PolicyOptions(seed=seed)).positions

    a, b, c = kept(1), kept(1), kept(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_registered_policy_is_used_everywhere(tiny64, ids, full_cache):
    """register_policy makes a new score function usable by compress_cache and prefill_ppl."""
    @kl.register_policy("_test_oldest")
    def oldest(kv, opts):
        return -kv.positions.float()

    try:
        comp = kl.compress_cache(full_cache, 0.5, "_test_oldest", skip_layers=())
        n_kept = kl.n_kept_for(full_cache.seq_len, 0.5)
        assert all(torch.equal(p, torch.arange(n_kept).expand_as(p)) for p in comp.positions)
        assert kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, policy="_test_oldest").nll.isfinite().all()
    finally:
        kl.POLICIES.pop("_test_oldest", None)


# ----------------------------------------------------------------------------------------------
# 5. RoPE preserves key norms
# ----------------------------------------------------------------------------------------------

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
        norms = kl.key_norms(tiny64, ids)
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


# ----------------------------------------------------------------------------------------------
# 6. Re-rotation
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# 7. One prefill, many compressions
# ----------------------------------------------------------------------------------------------

SWEEP_CONFIGS = [
    kl.EvalConfig(1.0),
    kl.EvalConfig(0.5),
    kl.EvalConfig(0.5, "knorm", (), "by_norm", "rerotated"),
    kl.EvalConfig(0.3, "knorm", (), "original", "cache_relative"),
    kl.EvalConfig(0.7, "high_norm", (0,)),
    kl.EvalConfig(0.5, "random", (), seed=1),
    kl.EvalConfig(0.5, "random", (), seed=2),
    kl.EvalConfig(0.5, "streaming", (), n_sink=2),
    kl.EvalConfig(0.5, "streaming", (), n_sink=6),
    kl.EvalConfig(0.5, "tova", ()),
    kl.EvalConfig(1.0, "knorm", (), "by_norm", "rerotated"),
]


def test_sweep_equals_separate_prefill_ppl(tiny64, ids):
    """sweep (one prefill, score cache shared across configs) gives per token the same results as
    one prefill_ppl call per configuration -- including configs that share a policy but differ in
    seed or n_sink, which must not share scores."""
    swept = kl.sweep(tiny64, ids, CONTEXT, SWEEP_CONFIGS)
    assert [r.config for r in swept] == SWEEP_CONFIGS
    for cfg, res in zip(SWEEP_CONFIGS, swept):
        single = kl.prefill_ppl(tiny64, ids, CONTEXT, cfg.keep_ratio, cfg.policy, cfg.skip_layers, cfg.order,
                                cfg.position_mode, cfg.seed, cfg.n_sink)
        for name in ("nll", "kl"):
            torch.testing.assert_close(getattr(res, name), getattr(single, name), rtol=0, atol=1e-6, msg=str(cfg))
        assert torch.equal(res.correct, single.correct)
        assert torch.equal(res.top1_agree_mask, single.top1_agree_mask)
        assert (res.n_kept, res.cache_bytes, res.context_len) == (single.n_kept, single.cache_bytes, single.context_len)
    # configs sharing a policy but not its options really differ (a score cache keyed on the
    # policy name alone would make these pairs equal)
    by_cfg = {(r.config.policy, r.config.seed, r.config.n_sink): r.nll for r in swept}
    assert not torch.allclose(by_cfg[("random", 1, 4)], by_cfg[("random", 2, 4)])
    assert not torch.allclose(by_cfg[("streaming", 0, 2)], by_cfg[("streaming", 0, 6)])


def test_evaluation_leaves_the_cache_untouched(tiny64, ids):
    """continuation_logits and generate_greedy must not grow or modify the cache they are given:
    sweep relies on reusing one prefill cache for every configuration."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, 0.5, "knorm")
    snapshot = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
    for mode in kl.POSITION_MODES:
        kl.continuation_logits(tiny64, cache, ids[:, CONTEXT:-1], mode)
    kl.generate_greedy(tiny64, ids[:, :CONTEXT], 5, keep_ratio=0.5, pre=pre)
    assert cache.lengths() == [CONTEXT, CONTEXT, 20, 20] and pre.cache.lengths() == [CONTEXT] * N_LAYERS
    for (k, v), k2, v2 in zip(snapshot, cache.keys, cache.values):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_summary_is_json_ready(tiny64, ids):
    """EvalResult.summary() holds plain numbers that round-trip through JSON."""
    res = kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5)
    summary = json.loads(json.dumps(res.summary()))
    assert summary["keep_ratio"] == 0.5 and summary["skip_layers"] == [0, 1]
    assert summary["n_scored"] == N_TOKENS - CONTEXT - 1
    assert math.isclose(summary["ppl"], math.exp(summary["mean_nll"]))


# ----------------------------------------------------------------------------------------------
# 8. Greedy generation
# ----------------------------------------------------------------------------------------------

def _greedy_reference(model, ids, n_new):
    """Greedy decoding by re-running the WHOLE sequence each step: no cache at all."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, ids.shape[1]:]


def test_generate_greedy_keep_all_equals_reference(tiny64, ids):
    """generate_greedy with keep_ratio=1 must reproduce plain greedy decoding token for token."""
    prompt = ids[:, :CONTEXT]
    gen = kl.generate_greedy(tiny64, prompt, 12, keep_ratio=1.0)
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
    gen = kl.generate_greedy(tiny64, prompt, 10, keep_ratio=0.5, skip_layers=(1,), position_mode=position_mode)
    pre = kl.prefill(tiny64, prompt)
    cache = kl.compress_cache(pre.cache, 0.5, "knorm", skip_layers=(1,))
    logits = kl.continuation_logits(tiny64, cache, gen[:-1].view(1, -1), position_mode)
    assert torch.equal(logits.argmax(-1), gen[1:])
    assert gen[0] == pre.last_logits.argmax()


def test_generation_agreement():
    """generation_agreement: matching-prefix length and per-position agreement of two token lists."""
    a = torch.tensor([5, 6, 7, 8, 9])
    assert kl.generation_agreement(a, a.clone()) == {"matching_prefix": 5, "token_agreement": 1.0}
    b = a.clone()
    b[2] = 0
    assert kl.generation_agreement(a, b) == {"matching_prefix": 2, "token_agreement": pytest.approx(0.8)}
    b[0] = 0
    assert kl.generation_agreement(a, b) == {"matching_prefix": 0, "token_agreement": pytest.approx(0.6)}
    # different lengths compare over the shorter one
    assert kl.generation_agreement(a, a[:3]) == {"matching_prefix": 3, "token_agreement": 1.0}


def test_generation_agreement_on_generated_tokens(tiny64, ids):
    """On real generations, agreement is consistent with the tokens themselves."""
    prompt = ids[:, :CONTEXT]
    full = kl.generate_greedy(tiny64, prompt, 16)
    comp = kl.generate_greedy(tiny64, prompt, 16, keep_ratio=0.1, skip_layers=())
    agree = kl.generation_agreement(comp, full)
    same = (comp == full)
    assert agree["token_agreement"] == pytest.approx(same.float().mean().item())
    p = agree["matching_prefix"]
    assert same[:p].all() and (p == len(full) or not same[p])


# ----------------------------------------------------------------------------------------------
# 9. Bad input: a clear error that names the argument, raised before any work
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def forward_count(tiny64):
    """Counts forward passes of the tiny model, to show validation precedes any work."""
    calls = []
    handle = tiny64.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


BAD_KEEP_RATIOS = [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", None, True]


@pytest.mark.parametrize("keep_ratio", BAD_KEEP_RATIOS, ids=repr)
def test_bad_keep_ratio(keep_ratio, tiny64, ids, full_cache, forward_count):
    """keep_ratio must be a number in (0, 1]; every entry point says so by name."""
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.n_kept_for(10, keep_ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.compress_cache(full_cache, keep_ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, keep_ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.sweep(tiny64, ids, CONTEXT, [kl.EvalConfig(0.5), kl.EvalConfig(keep_ratio)])
    assert forward_count == []
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.generate_greedy(tiny64, ids[:, :8], 2, keep_ratio=keep_ratio)


def test_empty_text():
    """encode refuses empty or blank text, naming `text`, without calling the tokenizer."""
    calls = []

    def tokenizer(*args, **kwargs):
        calls.append(args)
        raise AssertionError("tokenizer must not be called")

    for text in ("", "   \n\t", None):
        with pytest.raises(ValueError, match="text"):
            kl.encode(tokenizer, text)
    assert calls == []


@pytest.mark.parametrize("context_len", [N_TOKENS, N_TOKENS + 5, N_TOKENS - 1, 0, -3, 10.0, True])
def test_bad_context_len(context_len, tiny64, ids, forward_count):
    """context_len must leave at least two tokens to score: n-1, n and beyond are refused."""
    with pytest.raises(ValueError, match="context_len"):
        kl.prefill_ppl(tiny64, ids, context_len, 0.5)
    with pytest.raises(ValueError, match="context_len"):
        kl.sweep(tiny64, ids, context_len, [kl.EvalConfig(0.5)])
    assert forward_count == []


def test_largest_valid_context_len(tiny64, ids):
    """context_len = n-2 is the largest allowed: exactly one token is scored."""
    assert kl.prefill_ppl(tiny64, ids, N_TOKENS - 2, 0.5).nll.shape == (1,)


def test_unknown_policy(tiny64, ids, full_cache, forward_count):
    """An unknown policy name is refused by name, listing the choices."""
    with pytest.raises(ValueError, match="policy.*knorm"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, policy="no_such_policy")
    with pytest.raises(ValueError, match="policy"):
        kl.compress_cache(full_cache, 0.5, "no_such_policy")
    with pytest.raises(ValueError, match="policy"):
        kl.compress_cache(full_cache, 0.5, object())
    assert forward_count == []


@pytest.mark.parametrize("skip_layers", [(99,), (-1,), (0, N_LAYERS), (1.5,)], ids=repr)
def test_skip_layers_outside_model(skip_layers, tiny64, ids, full_cache, forward_count):
    """skip_layers must name layers of the model."""
    with pytest.raises(ValueError, match="skip_layers"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, skip_layers=skip_layers)
    with pytest.raises(ValueError, match="skip_layers"):
        kl.compress_cache(full_cache, 0.5, skip_layers=skip_layers)
    assert forward_count == []


@pytest.mark.parametrize("name,kwargs", [("order", {"order": "sorted"}),
                                         ("position_mode", {"position_mode": "relative"})])
def test_unknown_order_or_position_mode(name, kwargs, tiny64, ids, full_cache, forward_count):
    """order and position_mode accept only their documented choices."""
    with pytest.raises(ValueError, match=name):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, **kwargs)
    assert forward_count == []
    if name == "order":
        with pytest.raises(ValueError, match=name):
            kl.compress_cache(full_cache, 0.5, **kwargs)
    else:
        with pytest.raises(ValueError, match=name):
            kl.continuation_logits(tiny64, full_cache, ids[:, CONTEXT:-1], **kwargs)
    with pytest.raises(ValueError, match=name):
        kl.generate_greedy(tiny64, ids[:, :8], 2, **kwargs)


def test_bad_input_ids_and_counts(tiny64, ids, forward_count):
    """input_ids must be integer ids of batch size 1; max_new_tokens and max_tokens >= 1."""
    with pytest.raises(ValueError, match="input_ids"):
        kl.prefill_ppl(tiny64, ids.float(), CONTEXT, 0.5)
    with pytest.raises(ValueError, match="input_ids"):
        kl.prefill_ppl(tiny64, ids.repeat(2, 1), CONTEXT, 0.5)
    with pytest.raises(ValueError, match="input_ids"):
        kl.prefill(tiny64, ids[:, :0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        kl.generate_greedy(tiny64, ids, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        kl.encode(lambda *a, **k: None, "some text", max_tokens=0)
    assert forward_count == []


def test_missing_corpus_says_make_data(tmp_path, monkeypatch):
    """A missing corpus raises FileNotFoundError naming the corpus and `make data`, and creates
    nothing; an unknown corpus name is a ValueError naming `corpus`."""
    monkeypatch.setattr(kl, "CORPUS_DIR", tmp_path)
    for name in kl.CORPORA:
        with pytest.raises(FileNotFoundError, match=rf"corpus='{name}'.*make data"):
            kl.load_corpus(name)
    with pytest.raises(ValueError, match="corpus"):
        kl.load_corpus("books")
    assert list(tmp_path.iterdir()) == []


def test_missing_model_says_make_data(tmp_path, monkeypatch):
    """load_model() without the embedded model raises FileNotFoundError mentioning `make data`,
    and creates nothing."""
    monkeypatch.setattr(kl, "DEFAULT_MODEL_DIR", tmp_path / "SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="make data"):
        kl.load_model()
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_path(tmp_path):
    """A model path that does not exist raises FileNotFoundError naming it, and creates nothing."""
    with pytest.raises(FileNotFoundError, match="model.*/nonexistent/model-dir"):
        kl.load_model("/nonexistent/model-dir")
    missing = tmp_path / "no-model-here"
    with pytest.raises(FileNotFoundError, match="no-model-here"):
        kl.load_model(str(missing))
    assert list(tmp_path.iterdir()) == []


def test_model_dir_without_model(tmp_path):
    """A directory that exists but holds no model (e.g. a wrong path into data/) must also give a
    FileNotFoundError naming the path -- not an unrelated error from a tokenizer fallback."""
    empty = tmp_path / "empty-model-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-model-dir"):
        kl.load_model(str(empty))
    assert list(empty.iterdir()) == []


def test_bad_dtype_string():
    """dtype given as a string must name a torch dtype."""
    with pytest.raises(ValueError, match="dtype"):
        kl.load_model("/nonexistent/model-dir", dtype="float33")


# ----------------------------------------------------------------------------------------------
# 10. Atomic JSON writes
# ----------------------------------------------------------------------------------------------

def test_write_json_atomic(tmp_path):
    """write_json_atomic creates parent folders, leaves no temporary file behind, writes valid
    JSON, replaces an existing file, and on a serialisation error keeps the old file intact."""
    path = tmp_path / "results" / "run.json"
    obj = {"ppl": 39.68, "keep_ratios": [1.0, 0.9], "nested": {"a": None}}
    kl.write_json_atomic(path, obj)
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    assert json.loads(path.read_text(encoding="utf-8")) == obj

    kl.write_json_atomic(path, {"ppl": 155.91, "path": tmp_path})  # non-JSON types become strings
    assert json.loads(path.read_text(encoding="utf-8")) == {"ppl": 155.91, "path": str(tmp_path)}

    kl.write_json_atomic(path, {"ppl": 155.91, "path": tmp_path, "acc": float("nan")})  # NaN is not JSON
    assert json.loads(path.read_text(encoding="utf-8"))["acc"] is None

    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        kl.write_json_atomic(path, circular)
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    assert json.loads(path.read_text(encoding="utf-8"))["ppl"] == 155.91


def test_write_json_atomic_never_exposes_a_partial_file(tmp_path, monkeypatch):
    """The documented mechanism: the complete JSON is written to a temporary file in the same
    folder, then moved over the target with os.replace, so the target holds the old content
    until the new one is whole."""
    path = tmp_path / "run.json"
    kl.write_json_atomic(path, {"old": True})
    real_replace = kl.os.replace
    seen = []

    def checking_replace(src, dst):
        src, dst = Path(src), Path(dst)
        seen.append(dst)
        assert src.parent == dst.parent and src != dst
        assert json.loads(src.read_text(encoding="utf-8")) == {"new": [1, 2, 3]}
        assert json.loads(dst.read_text(encoding="utf-8")) == {"old": True}
        real_replace(src, dst)

    monkeypatch.setattr(kl.os, "replace", checking_replace)
    kl.write_json_atomic(path, {"new": [1, 2, 3]})
    assert seen == [path]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_span_metrics_reads_exactly_the_spans_tokens(tiny32):
    """span_metrics: input position p is scored token p - context_len - 1 of a sweep result, so a
    span's verdict is the argmax check at exactly those positions (the passkey's digits)."""
    ids = random_ids(N_TOKENS, seed=3)
    res = kl.sweep(tiny32, ids, CONTEXT, [kl.EvalConfig(1.0)])[0]
    logits = tiny32(ids).logits[0]
    start, end = CONTEXT + 5, CONTEXT + 9
    want = logits[start - 1:end - 1].argmax(-1) == ids[0, start:end]
    m = kl.span_metrics(res, start, end)
    assert m["correct"] == bool(want.all()) and m["n_tokens"] == 4
    assert m["token_acc"] == pytest.approx(want.float().mean().item())
    nll = F.cross_entropy(logits[start - 1:end - 1].double(), ids[0, start:end], reduction="sum").item()
    assert m["nll"] == pytest.approx(nll, rel=1e-4)
    assert kl.span_metrics(res, N_TOKENS - 3)["n_tokens"] == 3  # end=None: to the last token
    # force a span the model gets right: replace the targets by the model's own argmax
    forced = ids.clone()
    for p in range(CONTEXT + 1, N_TOKENS):
        forced[0, p] = tiny32(forced[:, :p]).logits[0, -1].argmax()
    assert kl.span_metrics(kl.sweep(tiny32, forced, CONTEXT, [kl.EvalConfig(1.0)])[0], CONTEXT + 1)["correct"]
    for bad in (CONTEXT, N_TOKENS):  # not scored: predicted by the prefill, or past the end
        with pytest.raises(ValueError, match="start"):
            kl.span_metrics(res, bad)
    with pytest.raises(ValueError, match="end"):
        kl.span_metrics(res, start, start)


def test_wilson_interval():
    """Wilson 95 % interval: inside [0, 1], contains the rate, known values, bad input refused."""
    lo, hi = kl.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert kl.wilson_interval(0, 5)[0] == 0.0 and kl.wilson_interval(5, 5)[1] == 1.0
    assert kl.wilson_interval(5, 5)[0] > 0.5
    with pytest.raises(ValueError, match="successes"):
        kl.wilson_interval(6, 5)
    with pytest.raises(ValueError, match="n="):
        kl.wilson_interval(0, 0)


# ---- section 7: the speed study's measuring tools (06_speed_tradeoffs) ----

def test_weight_bytes_counts_tied_weights_once():
    """Decode streams every weight once per step: a tied embedding / lm_head is one tensor."""
    tied = kl.random_llama(seed=0, tie_word_embeddings=True)
    untied = kl.random_llama(seed=0, tie_word_embeddings=False)
    assert kl.weight_bytes(untied) == sum(p.numel() * 4 for p in untied.parameters())
    embed = tied.config.vocab_size * tied.config.hidden_size * 4
    assert kl.weight_bytes(tied) == kl.weight_bytes(untied) - embed
    assert kl.weight_bytes(kl.random_llama(seed=0, dtype=torch.bfloat16)) * 2 == kl.weight_bytes(untied)


def test_peak_memory_sees_an_allocation():
    """A 64 MB tensor created (and kept) inside ``fn`` raises the peak by at least that much."""
    assert kl.rss_bytes() > 0
    out, mem = kl.peak_memory(lambda: torch.ones(16 * 2**20))
    assert out.numel() == 16 * 2**20 and mem["kind"] == "rss"
    assert mem["increase_bytes"] >= 0.9 * 64 * 2**20
    assert mem["peak_bytes"] == mem["baseline_bytes"] + mem["increase_bytes"]
    with pytest.raises(ValueError, match="interval_s"):
        kl.peak_memory(lambda: None, interval_s=0)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_timed_decode_equals_generate_greedy(keep_ratio, tiny32, ids):
    """The timed decode loop generates exactly what generate_greedy does (true positions for new
    tokens on the compressed cache), leaves the cache untouched, and reports one time per step."""
    pre = kl.prefill(tiny32, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, keep_ratio)
    lengths = cache.lengths()
    out = kl.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 6, warmup=2)
    ref = kl.generate_greedy(tiny32, ids[:, :CONTEXT], 9, keep_ratio=keep_ratio, pre=pre)
    assert out["tokens"] == ref[1:].tolist()
    assert cache.lengths() == lengths
    assert len(out["step_s"]) == 6 and len(out["warmup_step_s"]) == 2 and all(t > 0 for t in out["step_s"])
    assert out["min_s"] <= out["q25_s"] <= out["median_s"] <= out["q75_s"] <= out["max_s"]
    wrong = kl.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 6, warmup=2, position_mode="cache_relative")
    if keep_ratio < 1:  # numbering from the compressed length is the bug: different tokens
        assert wrong["tokens"] != out["tokens"]
    with pytest.raises(ValueError, match="n_tokens"):
        kl.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 0)
    with pytest.raises(ValueError, match="warmup"):
        kl.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 2, warmup=-1)


def test_time_ttft_pieces_add_up(tiny32, ids):
    """TTFT of a configuration = its repeat's prefill + that cache's compression; keep 1.0 is no
    compression; the returned prefill is the uncompressed cache."""
    t, pre = kl.time_ttft(tiny32, ids[:, :CONTEXT], [1.0, 0.5], ["knorm", "streaming"], repeats=3, warmup=1)
    assert t["n_tokens"] == CONTEXT and len(t["prefill_s"]) == 3
    assert set(t["ttft_s"]) == {"knorm@1.0", "knorm@0.5", "streaming@1.0", "streaming@0.5"}
    assert t["compress_s"]["knorm@1.0"] == [0.0] * 3
    for key, times in t["ttft_s"].items():
        assert times == [p + c for p, c in zip(t["prefill_s"], t["compress_s"][key])]
    assert all(c > 0 for c in t["compress_s"]["knorm@0.5"])
    assert t["prefill_peak_memory"]["increase_bytes"] >= 0
    assert pre.cache.lengths() == [CONTEXT] * N_LAYERS
    with pytest.raises(ValueError, match="repeats"):
        kl.time_ttft(tiny32, ids, [1.0], repeats=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.time_ttft(tiny32, ids, [1.5])
    with pytest.raises(ValueError, match="policy"):
        kl.time_ttft(tiny32, ids, [0.5], ["nope"])


def test_machine_rates_and_profile(tiny32, ids):
    """Bandwidth and matmul probes return positive rates over the bytes/FLOPs they moved; the
    operator profile of a decode names the matrix products."""
    bw = kl.memory_bandwidth(8 * 2**20, repeats=2)
    assert bw["n_bytes"] == 8 * 2**20
    assert all(bw[f"{k}_bytes_per_s"] > 0 and len(bw[f"{k}_s"]) == 2 for k in ("read", "copy", "gemv"))
    mm = kl.matmul_rate(64, repeats=2)
    assert mm["flop_per_s"] > 0 and len(mm["times_s"]) == 2
    for fn, arg in [(kl.memory_bandwidth, "n_bytes"), (kl.matmul_rate, "n")]:
        with pytest.raises(ValueError, match=arg):
            fn(0)
    pre = kl.prefill(tiny32, ids[:, :CONTEXT])
    ops = kl.op_profile(lambda: kl.timed_decode(tiny32, pre.cache, pre.last_logits.argmax(-1), 2, warmup=0), top=25)
    assert 0 < len(ops) <= 25 and any(o["op"] in ("aten::mm", "aten::addmm", "aten::linear") for o in ops)
    assert all(o["calls"] >= 1 and o["self_cpu_s"] >= 0 for o in ops)
    steps = {o["op"]: o for o in kl.decode_profile(tiny32, pre.cache, pre.last_logits.argmax(-1), n_steps=2, top=50)}
    # two steps: each layer appends one key and one value, and the cache copy is outside the profile
    assert steps["aten::cat"]["calls"] >= 2 * 2 * N_LAYERS
    assert pre.cache.lengths() == [CONTEXT] * N_LAYERS
    with pytest.raises(ValueError, match="n_steps"):
        kl.decode_profile(tiny32, pre.cache, pre.last_logits.argmax(-1), n_steps=0)


def test_cold_warm_ttft_runs_in_a_fresh_process(ids):
    """The child process times the configurations in the given order (baseline first), every round."""
    out = kl.cold_warm_ttft(ids[:, :16], keep_ratios=(1.0, 0.5), rounds=2, model_config={"num_hidden_layers": 2},
                            skip_layers=(0,))
    assert [(r["round"], r["keep_ratio"]) for r in out["rows"]] == [(0, 1.0), (0, 0.5), (1, 1.0), (1, 0.5)]
    assert all(r["ttft_s"] > 0 for r in out["rows"]) and out["import_s"] > 0 and out["load_s"] > 0
    with pytest.raises(ValueError, match="model_config"):
        kl.cold_warm_ttft(ids, model_config=[("hidden_size", 8)])
    with pytest.raises(ValueError, match="rounds"):
        kl.cold_warm_ttft(ids, rounds=0)
