"""Attention analysis, token kinds and metric helpers."""
from __future__ import annotations

import pytest
import torch

import knorm_lib as kl


@pytest.fixture(scope="module")
def ids40():
    return torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))


def _eager_probs(model, ids):
    """Attention probabilities from transformers' own eager implementation: (layers, H_q, n, n)."""
    model.set_attn_implementation("eager")
    try:
        out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)
    return torch.stack([a[0] for a in out.attentions])


def test_attention_received_is_causally_normalised_mean(tiny64, ids40):
    """Key j's value is the mean, over the n - j queries that see it and the query heads of its
    group, of the attention it gets (checked against transformers' eager attention)."""
    probs = _eager_probs(tiny64, ids40)  # (L, H_q, n, n)
    n, n_kv = ids40.shape[1], tiny64.config.num_key_value_heads
    groups = tiny64.config.num_attention_heads // n_kv
    expected = probs.sum(2).view(probs.shape[0], n_kv, groups, n).mean(2) / torch.arange(n, 0, -1)
    got = kl.attention_received(tiny64, ids40)
    assert got.shape == (4, n_kv, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_attention_mass_lost_bounds(tiny64, ids40):
    """Nothing is lost at keep_ratio 1; the oracle loses the least; losses lie in [0, mass on context]."""
    rows = kl.attention_mass_lost(tiny64, ids40, 30, [1.0, 0.5, 0.25], ["knorm", "random", "high_norm"])
    assert {r["policy"] for r in rows} == {"knorm", "random", "high_norm", "oracle"}
    for r in rows:
        assert -1e-9 <= r["mass_lost"] <= r["mass_on_context"] + 1e-9
        if r["keep_ratio"] == 1.0:
            assert r["mass_lost"] == pytest.approx(0.0, abs=1e-9)
    oracle = {(r["keep_ratio"], r["layer"], r["kv_head"]): r["mass_lost"] for r in rows if r["policy"] == "oracle"}
    for r in rows:
        assert r["mass_lost"] >= oracle[(r["keep_ratio"], r["layer"], r["kv_head"])] - 1e-9
    assert any(r["mass_lost"] > oracle[(r["keep_ratio"], r["layer"], r["kv_head"])] + 1e-6
               for r in rows if r["policy"] == "random")


def test_token_kinds(real_model):
    _, tok = real_model
    ids = kl.encode(tok, "The cat sat.\nIt was happy, and fed.")
    kinds = kl.token_kinds(tok, ids)
    text = [tok.decode([t]) for t in ids[0].tolist()]
    by_text = dict(zip(text, kinds))
    assert kinds[0] == "first"
    assert by_text["."] == "punctuation" and by_text[","] == "punctuation"
    assert by_text[" and"] == "stop_word" and by_text[" cat"] == "other"
    assert any(k == "newline" for k in kinds)
    assert set(kinds) <= set(kl.TOKEN_KINDS)


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


def test_streaming_sweep_equals_separate_calls(tiny64, ids40):
    cfgs = [dict(policy="knorm", keep_ratio=0.5), dict(policy="streaming", max_cache=8)]
    swept = kl.streaming_sweep(tiny64, ids40, cfgs)
    for cfg, res in zip(cfgs, swept):
        alone = kl.streaming_ppl(tiny64, ids40, **cfg)
        torch.testing.assert_close(res.nll, alone.nll)
        torch.testing.assert_close(res.kl, alone.kl)


def _threshold_rows(values: dict[float, tuple[float, float]]) -> list[dict]:
    return [{"variant": "v", "document": doc, "keep_ratio": r, "ppl": ppl[i]}
            for r, ppl in values.items() for i, doc in enumerate(("a", "b"))]


def test_keep_ratio_thresholds_need_every_larger_ratio_to_pass():
    """1 %: 0.9 passes (+0.5 %), 0.5 fails (+3 %), so 0.25's lucky dip (+2 %) does not count for it;
    5 %: everything down to 0.25 passes, 0.1 (+20 %) fails."""
    rows = _threshold_rows({1.0: (10, 20), 0.9: (10.05, 20.1), 0.5: (10.3, 20.6), 0.25: (10.2, 20.4), 0.1: (12, 24)})
    out = kl.keep_ratio_thresholds(rows, ["variant"], (0.01, 0.05))
    assert out.to_dict("records") == [{"variant": "v", "within_0.01": 0.9, "within_0.05": 0.25}]
    bad = _threshold_rows({1.0: (10, 20), 0.9: (11, 22), 0.5: (10, 20)})
    assert kl.keep_ratio_thresholds(bad, ["variant"], (0.05,))["within_0.05"].isna().all()


def test_keep_ratio_thresholds_bad_input():
    with pytest.raises(ValueError, match="keep_ratio 1.0"):
        kl.keep_ratio_thresholds(_threshold_rows({0.9: (1, 1)}), ["variant"])
    with pytest.raises(ValueError, match="missing column"):
        kl.keep_ratio_thresholds([{"variant": "v", "keep_ratio": 1.0, "ppl": 1}], ["variant"])
    with pytest.raises(ValueError, match="tolerances"):
        kl.keep_ratio_thresholds(_threshold_rows({1.0: (1, 1)}), ["variant"], (-0.1,))


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


def test_streaming_full_budget_reuses_the_reference(tiny64, ids40):
    """keep_ratio 1.0 with a reference given: no forward, and the same numbers as running it."""
    ref = kl.full_logits(tiny64, ids40)
    shortcut = kl.streaming_ppl(tiny64, ids40, "knorm", keep_ratio=1.0, skip_layers=(), reference_logits=ref)
    ran = kl.streaming_ppl(tiny64, ids40, "knorm", keep_ratio=1.0, skip_layers=())
    torch.testing.assert_close(shortcut.nll, ran.nll, rtol=1e-10, atol=1e-10)
    assert shortcut.evictions == {} and shortcut.kl_mean == 0
