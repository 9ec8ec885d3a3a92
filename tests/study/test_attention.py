"""knorm_study.attention: attention received and lost."""

from __future__ import annotations

import pytest
import torch

from helpers import _eager_probs
from knorm_study import attention, intervals


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



def _rho_rows(per_doc: dict[str, tuple[float, float]]) -> list[dict]:
    """Spearman rows: per document, ρ = early in layers 0-1 and late in layers 2-3 (two heads each)."""
    return [{"document": doc, "layer": layer, "kv_head": h, "spearman": early if layer < 2 else late}
            for doc, (early, late) in per_doc.items() for layer in range(4) for h in range(2)]


def test_early_minus_late_is_a_paired_per_document_difference():
    weaker_first = {f"d{i}": (-0.05 + 0.01 * i, -0.3 + 0.02 * i) for i in range(6)}
    d = attention.early_minus_late(_rho_rows(weaker_first))
    assert d["n"] == 6 and d["mean"] == pytest.approx(0.225)   # mean of 0.25 - 0.01 i, i = 0..5
    assert intervals.positive(d) == "holds"
    stronger_first = {doc: (late, early) for doc, (early, late) in weaker_first.items()}
    assert intervals.positive(attention.early_minus_late(_rho_rows(stronger_first))) == "fails"
    mixed = {f"d{i}": (-0.1 + (0.05 if i % 2 else -0.05), -0.1) for i in range(6)}
    assert intervals.positive(attention.early_minus_late(_rho_rows(mixed))) == "not resolved"
    assert attention.early_minus_late([]) is None


def test_findings_state_the_first_layers_verdict_from_the_interval():
    rows = _rho_rows({f"d{i}": (-0.3 + 0.01 * i, -0.05) for i in range(6)})
    record = {"parameters": {"keep_ratios": [1.0, 0.5]},
              "results": {"spearman": rows, "summary": {
                  "spearman_mean_layers_0_1": -0.28, "spearman_mean_layers_2plus": -0.05,
                  "fraction_heads_negative_layers_2plus": 1.0, "spearman_position_controlled_mean_layers_2plus": -0.1,
                  "sink_attention_mean": 0.3, "fraction_lost": {}, "loss_area_above_oracle": {}}}}
    text = attention.findings(record)
    assert "stronger in the first layers, against the paper's reason" in text and "n = 6 documents" in text
