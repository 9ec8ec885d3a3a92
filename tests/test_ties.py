"""The tie rule: wherever a policy ranks tokens, equal scores resolve by position (the newest token
stays, the oldest goes first), the same way in prefill compression, both streaming engines and the
storage order. Constructed ties make the rule the only thing that decides."""
from __future__ import annotations

import pytest
import torch

import knorm_lib as kl


@pytest.fixture(scope="module")
def all_tied():
    """A registered policy whose scores are all equal: every decision is a tie."""
    @kl.register_policy("_all_tied")
    def _all_tied(kv, opts):
        return torch.zeros(kv.positions.shape, dtype=torch.float32, device=kv.keys.device)
    yield "_all_tied"
    kl.POLICIES.pop("_all_tied")


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


@pytest.mark.parametrize("engine", ["one_pass", "sequential"])
@pytest.mark.parametrize("schedule", [dict(keep_ratio=0.5), dict(max_cache=6)], ids=["keep_ratio", "max_cache"])
def test_streaming_engines_evict_the_oldest_of_tied_tokens(tiny64, all_tied, engine, schedule):
    """All scores equal: after step t the newest budget[t] tokens remain, in both engines."""
    n = 24
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(6))
    budget = kl.budget_schedule(n, **schedule)
    res = kl.streaming_ppl(tiny64, ids, all_tied, skip_layers=(), engine=engine, **schedule)
    # the rule: token j is evicted at the first step t with j <= t - budget[t]
    expected = torch.full((n,), n, dtype=torch.long)
    for t in range(n):
        for j in range(t + 1):
            if expected[j] == n and j <= t - int(budget[t]):
                expected[j] = t
    for evict in res.evictions.values():
        assert bool((evict == expected).all())


def test_engines_agree_on_exact_ties_of_repeated_tokens(tiny64):
    """knorm over a text that repeats a few tokens, every layer compressed: layer 0's keys of a
    repeated token tie in norm, and both engines take the same decisions."""
    ids = torch.tensor([[5, 6, 7, 8] * 8])
    seq = kl.streaming_ppl(tiny64, ids, "knorm", keep_ratio=0.5, skip_layers=(), engine="sequential")
    one = kl.streaming_ppl(tiny64, ids, "knorm", keep_ratio=0.5, skip_layers=(), engine="one_pass")
    for layer in seq.evictions:
        assert torch.equal(seq.evictions[layer], one.evictions[layer]), f"layer {layer}"
    torch.testing.assert_close(one.nll, seq.nll, rtol=1e-9, atol=1e-9)
