"""knorm_study.attention: attention received and lost."""

from __future__ import annotations

import pytest
import torch

from helpers import _eager_probs
from knorm_study import attention


def test_attention_received_is_causally_normalised_mean(tiny64, ids40):
    """Key j's value is the mean, over the n - j queries that see it and the query heads of its
    group, of the attention it gets (checked against transformers' eager attention)."""
    probs = _eager_probs(tiny64, ids40)  # (L, H_q, n, n)
    n, n_kv = ids40.shape[1], tiny64.config.num_key_value_heads
    groups = tiny64.config.num_attention_heads // n_kv
    expected = probs.sum(2).view(probs.shape[0], n_kv, groups, n).mean(2) / torch.arange(n, 0, -1)
    got = attention.attention_received(tiny64, ids40)
    assert got.shape == (4, n_kv, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_attention_mass_lost_bounds(tiny64, ids40):
    """Nothing is lost at keep_ratio 1; the oracle loses the least; losses lie in [0, mass on context]."""
    rows = attention.attention_mass_lost(tiny64, ids40, 30, [1.0, 0.5, 0.25], ["knorm", "random", "high_norm"])
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

