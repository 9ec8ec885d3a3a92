"""Prefill evaluation: keep_ratio 1 is the model, positions, sweeps, metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import knorm_lib as kl
from helpers import CONTEXT, N_LAYERS, N_TOKENS, REAL_CONTEXT, SWEEP_CONFIGS, _full_forward_nll


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


def test_keep_all_reproduces_real_model_loss(real_model, news_ids):
    """keep_ratio=1 on ~300 real tokens: prefill + teacher-forced continuation gives the loss of
    one plain forward (1e-5 relative), with KL 0 and full top-1 agreement."""
    model, _ = real_model
    res = kl.prefill_ppl(model, news_ids, REAL_CONTEXT, keep_ratio=1.0)
    with torch.no_grad():
        logits = model(news_ids).logits[0]
    ref = F.cross_entropy(logits[REAL_CONTEXT:-1].double(), news_ids[0, REAL_CONTEXT + 1:], reduction="none")
    assert res.nll.shape == (news_ids.shape[1] - REAL_CONTEXT - 1,)
    assert math.isclose(res.nll.double().mean().item(), ref.mean().item(), rel_tol=1e-5)
    torch.testing.assert_close(res.nll.double(), ref, rtol=1e-4, atol=1e-4)
    assert res.kl_mean == 0.0 and res.top1_agree == 1.0
    # a sane language model on real prose (guards against scoring the wrong tokens)
    assert 2.0 < res.ppl < 200.0


def test_keep_all_by_norm_is_lossless(tiny64, ids):
    """keep_ratio=1 with order="by_norm" goes through the real compression code path (every
    layer gathered into norm order) and must still match the plain forward: KL ~ 0, top-1
    agreement 1. (keep_ratio=1 with "original" takes the identity shortcut, tested above.)"""
    res = kl.prefill_ppl(tiny64, ids, CONTEXT, keep_ratio=1.0, skip_layers=(), order="by_norm")
    ref = _full_forward_nll(tiny64, ids, CONTEXT)
    torch.testing.assert_close(res.nll.double(), ref, rtol=1e-5, atol=1e-6)
    assert res.kl.max().item() < 1e-10
    assert res.top1_agree == 1.0


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


def test_cache_relative_positions_raise_ppl_and_order_does_not(real_model, news_ids):
    """The write-up's jump, reproduced and explained at keep_ratio 0.5 (every layer compressed):
    numbering new tokens from the compressed length ("cache_relative") raises perplexity over
    true positions ("absolute"), while storing the kept tokens by norm instead of by position
    changes nothing under true positions (1e-4 relative)."""
    model, _ = real_model
    configs = [kl.EvalConfig(0.5, "knorm", (), "original", "absolute"),
               kl.EvalConfig(0.5, "knorm", (), "by_norm", "absolute"),
               kl.EvalConfig(0.5, "knorm", (), "original", "cache_relative")]
    absolute, by_norm, relative = kl.sweep(model, news_ids, REAL_CONTEXT, configs)
    assert relative.ppl > absolute.ppl
    assert relative.kl_mean > absolute.kl_mean
    assert math.isclose(absolute.ppl, by_norm.ppl, rel_tol=1e-4)


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


def test_sweep_with_given_reference_equals_sweep(tiny64, ids40):
    """Passing the uncompressed continuation's logits (the re-prefill path) changes no metric."""
    cfgs = [kl.EvalConfig(1.0), kl.EvalConfig(0.5, "knorm", ()), kl.EvalConfig(0.25, "random", (0,))]
    base = kl.sweep(tiny64, ids40, 24, cfgs)
    ref = kl.continuation_logits(tiny64, kl.prefill(tiny64, ids40[:, :24]).cache, ids40[:, 24:-1])
    again = [kl.sweep(tiny64, ids40, 24, [c], reference_logits=ref)[0] for c in cfgs]
    for a, b in zip(base, again):
        torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=1e-12)
    assert base[1].kl_mean > 0


def test_evaluation_leaves_the_cache_untouched(tiny64, ids):
    """continuation_logits must not grow or modify the cache it is given: sweep relies on reusing
    one prefill cache for every configuration."""
    pre = kl.prefill(tiny64, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, 0.5, "knorm")
    snapshot = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
    for mode in kl.POSITION_MODES:
        kl.continuation_logits(tiny64, cache, ids[:, CONTEXT:-1], mode)
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


def test_token_metrics_chunking_is_exact(tiny64, ids40):
    """Chunked metrics equal the one-block computation."""
    logits = tiny64(ids40).logits[0].detach()
    ref = logits.flip(0)
    tgt = ids40[0]
    a = kl.token_metrics(logits, tgt, ref, chunk=7)
    b = kl.token_metrics(logits, tgt, ref, chunk=10_000)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    direct_kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(a["kl"], direct_kl, rtol=1e-8, atol=1e-10)


def test_token_metrics_against_a_precomputed_reference_are_identical(tiny32, ids40):
    """A ``Reference`` computed once (what a sweep shares across configurations) gives bitwise the
    metrics of passing the logits, sliced or whole; a float64 comparison recomputes its terms."""
    logits = tiny32(ids40).logits[0].detach()
    ref_logits = logits.flip(0).contiguous()
    tgt = ids40[0]
    ref = kl.Reference.of(ref_logits)
    for rows in (slice(None), slice(None, -1)):
        a = kl.token_metrics(logits[rows], tgt[rows], ref_logits[rows])
        b = kl.token_metrics(logits[rows], tgt[rows], ref[rows])
        for k in a:
            assert torch.equal(a[k], b[k]), k
    c = kl.token_metrics(logits.double(), tgt, ref)
    d = kl.token_metrics(logits.double(), tgt, ref_logits)
    for k in c:
        assert torch.equal(c[k], d[k]), k
