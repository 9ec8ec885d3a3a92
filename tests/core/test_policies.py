"""Policies: each score function keeps what it says."""

from __future__ import annotations

import pytest
import torch

import knorm_lib as kl
from helpers import CONTEXT, N_LAYERS, _brute_force_kept, _check_consistent


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

