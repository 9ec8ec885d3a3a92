"""Streaming protocol: the one-pass evaluator must equal the sequential reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import knorm_lib as kl

STATIC = ["knorm", "high_norm", "random", "streaming"]
SCHEDULES = [dict(keep_ratio=0.5), dict(max_cache=12)]


@pytest.fixture(scope="module")
def ids48():
    return torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("policy", STATIC)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["keep_ratio", "max_cache"])
@pytest.mark.parametrize("skip_layers", [(), (0, 1)], ids=["skip-none", "skip-0-1"])
def test_one_pass_equals_sequential(tiny64, ids48, policy, schedule, skip_layers):
    """Per-token NLL of the masked one-pass forward equals one-forward-per-token, with the same
    eviction step for every (layer, KV head, token)."""
    seq = kl.streaming_ppl(tiny64, ids48, policy, skip_layers=skip_layers, engine="sequential", **schedule)
    one = kl.streaming_ppl(tiny64, ids48, policy, skip_layers=skip_layers, engine="one_pass", **schedule)
    assert seq.nll.shape == one.nll.shape == (47,)
    torch.testing.assert_close(one.nll, seq.nll, rtol=1e-5, atol=1e-5)
    assert set(seq.evictions) == set(one.evictions) == set(range(4)) - set(skip_layers)
    for layer in seq.evictions:
        assert torch.equal(seq.evictions[layer], one.evictions[layer]), f"layer {layer}"
    assert seq.kl_mean > 0  # something was evicted, so the comparison is not vacuous


def test_budget_at_least_length_is_the_plain_model(tiny64, ids48):
    """With a budget >= the sequence length nothing is evicted: both engines give the model's loss."""
    plain = F.cross_entropy(tiny64(ids48).logits[0, :-1], ids48[0, 1:], reduction="none").detach()
    for engine in ("one_pass", "sequential"):
        res = kl.streaming_ppl(tiny64, ids48, "knorm", max_cache=48, skip_layers=(), engine=engine)
        torch.testing.assert_close(res.nll, plain, rtol=1e-10, atol=1e-10)
        assert all(bool((e == 48).all()) for e in res.evictions.values()) or not res.evictions
        assert res.top1_agree == 1.0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["keep_ratio", "max_cache"])
def test_evictions_per_step_follow_the_schedule(tiny64, ids48, schedule):
    """After adding token t, exactly (retained before) + 1 - budget[t] tokens leave each head."""
    n = ids48.shape[1]
    budget = kl.budget_schedule(n, **schedule)
    expected = torch.cat([torch.zeros(1, dtype=torch.long), budget[:-1]]) + 1 - budget
    res = kl.streaming_ppl(tiny64, ids48, "knorm", skip_layers=(0,), engine="sequential", **schedule)
    for evict in res.evictions.values():
        for head in evict:
            counts = torch.bincount(head[head < n], minlength=n)
            assert torch.equal(counts, expected)


def test_budget_schedules():
    """keep_ratio uses the same count as prefill compression; max_cache caps the cache."""
    b = kl.budget_schedule(10, keep_ratio=0.5)
    assert b.tolist() == [kl.n_kept_for(t + 1, 0.5) for t in range(10)]
    assert kl.budget_schedule(6, max_cache=4).tolist() == [1, 2, 3, 4, 4, 4]
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.budget_schedule(10)
    with pytest.raises(ValueError, match="max_cache"):
        kl.budget_schedule(10, max_cache=0)


def test_eviction_steps_heap_matches_brute_force():
    """The heap simulation equals a direct replay of 'evict the lowest until budget remain'."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 30, generator=g)
    budget = kl.budget_schedule(30, keep_ratio=0.4)
    evict = kl.eviction_steps(scores, budget)
    for h in range(2):
        alive: list[int] = []
        expected = [30] * 30
        for t in range(30):
            alive.append(t)
            while len(alive) > budget[t]:
                worst = min(alive, key=lambda j: (scores[h, j].item(), j))
                alive.remove(worst)
                expected[worst] = t
        assert evict[h].tolist() == expected


def test_one_pass_cache_relative_equals_sequential(tiny64, ids48):
    """The position bug is reproduced identically by both engines."""
    kw = dict(keep_ratio=0.5, skip_layers=(), position_mode="cache_relative")
    seq = kl.streaming_ppl(tiny64, ids48, "knorm", engine="sequential", **kw)
    one = kl.streaming_ppl(tiny64, ids48, "knorm", engine="one_pass", **kw)
    torch.testing.assert_close(one.nll, seq.nll, rtol=1e-5, atol=1e-5)
    absolute = kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=0.5, skip_layers=())
    assert (seq.nll - absolute.nll).abs().max() > 1e-4


def test_rerotated_streaming_is_identity_without_eviction(tiny64, ids48):
    """Re-rotating to contiguous slots changes nothing when nothing is evicted (slot = position)."""
    res = kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=1.0, skip_layers=(), position_mode="rerotated")
    plain = kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=1.0, skip_layers=())
    torch.testing.assert_close(res.nll, plain.nll, rtol=1e-8, atol=1e-8)
    assert res.config.engine == "sequential"


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["keep_ratio", "max_cache"])
@pytest.mark.parametrize("skip_layers", [(), (0, 1)], ids=["skip-none", "skip-0-1"])
def test_h2o_one_pass_equals_sequential(tiny64, ids48, schedule, skip_layers):
    """H2O's scores change with later queries, yet replaying its steps inside each layer of one
    forward takes the same eviction decisions as one forward per token."""
    seq = kl.streaming_ppl(tiny64, ids48, "h2o", skip_layers=skip_layers, engine="sequential", **schedule)
    one = kl.streaming_ppl(tiny64, ids48, "h2o", skip_layers=skip_layers, **schedule)
    assert one.config.engine == "one_pass" and seq.config.engine == "sequential"
    torch.testing.assert_close(one.nll, seq.nll, rtol=1e-8, atol=1e-8)
    for layer in seq.evictions:
        assert torch.equal(seq.evictions[layer], one.evictions[layer]), f"layer {layer}"
    assert seq.kl_mean > 0
    with pytest.raises(ValueError, match="h2o"):
        kl.prefill_ppl(tiny64, ids48, 30, 0.5, policy="h2o")


def test_h2o_differs_from_a_static_policy(tiny64, ids48):
    """The replay really uses attention: H2O's evictions differ from sink+recent's and knorm's."""
    h2o = kl.streaming_ppl(tiny64, ids48, "h2o", keep_ratio=0.5, skip_layers=())
    for other in ("streaming", "knorm"):
        res = kl.streaming_ppl(tiny64, ids48, other, keep_ratio=0.5, skip_layers=())
        assert any(not torch.equal(h2o.evictions[i], res.evictions[i]) for i in h2o.evictions)


def test_h2o_keeps_recent_window(tiny64, ids48):
    """H2O never evicts a token from the most recent half of the budget."""
    n = ids48.shape[1]
    res = kl.streaming_ppl(tiny64, ids48, "h2o", max_cache=10, skip_layers=(0, 1, 2))
    evict = res.evictions[3]
    for j in range(n):
        steps = evict[:, j]
        assert bool((steps[steps < n] >= j + 5).all())  # alive while among the 5 most recent


def test_streaming_bad_input(tiny64, ids48):
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=1.5)
    with pytest.raises(ValueError, match="policy"):
        kl.streaming_ppl(tiny64, ids48, "nope", keep_ratio=0.5)
    with pytest.raises(ValueError, match="engine"):
        kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=0.5, engine="fast")
    with pytest.raises(ValueError, match="rerotated"):
        kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=0.5, engine="one_pass", position_mode="rerotated")
    with pytest.raises(ValueError, match="skip_layers"):
        kl.streaming_ppl(tiny64, ids48, "knorm", keep_ratio=0.5, skip_layers=(7,))


def test_real_model_engines_agree(real_model, news_ids):
    """SmolLM2 in float32 over 256 tokens. Default skip_layers: PPL to 1e-3 relative. Compressing
    every layer, keys of repeated tokens in layer 0 tie up to float32 rounding (a one-token forward
    and a full forward round differently), so the engines may flip such decisions: replaying the
    sequential engine's eviction steps in the one-pass forward reproduces it, so the flips explain
    the whole difference."""
    model, _ = real_model
    news_ids_256 = news_ids[:, :256]
    seq = kl.streaming_ppl(model, news_ids_256, "knorm", keep_ratio=0.5, engine="sequential")
    one = kl.streaming_ppl(model, news_ids_256, "knorm", keep_ratio=0.5, engine="one_pass")
    assert abs(seq.ppl - one.ppl) / seq.ppl <= 1e-3
    seq_all = kl.streaming_ppl(model, news_ids_256, "knorm", keep_ratio=0.5, skip_layers=(), engine="sequential")
    one_all = kl.streaming_ppl(model, news_ids_256, "knorm", keep_ratio=0.5, skip_layers=(), engine="one_pass")
    flips = sum(int((seq_all.evictions[i] != one_all.evictions[i]).sum()) for i in seq_all.evictions)
    replay = kl.streaming_ppl(model, news_ids_256, "knorm", keep_ratio=0.5, skip_layers=(), engine="one_pass",
                              evict_override=seq_all.evictions)
    torch.testing.assert_close(replay.nll, seq_all.nll, rtol=1e-4, atol=1e-4)
    if flips == 0:
        torch.testing.assert_close(one_all.nll, seq_all.nll, rtol=1e-4, atol=1e-4)
    else:
        assert (one_all.nll - seq_all.nll).abs().max() > 0


def test_streaming_policy_never_evicts_the_first_token(tiny64, ids48):
    """Even when the early budget is smaller than n_sink, the first token (the attention sink) stays."""
    res = kl.streaming_ppl(tiny64, ids48, "streaming", keep_ratio=0.5, skip_layers=())
    for evict in res.evictions.values():
        assert bool((evict[:, 0] == ids48.shape[1]).all())
