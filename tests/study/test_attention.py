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


def _docs(n_tokens: int = 30, seeds: tuple[int, ...] = (1, 2, 3)):
    from knorm_lib import TokenizedDoc

    return [("wiki", TokenizedDoc(f"d{s}", torch.randint(0, 100, (1, n_tokens), generator=torch.Generator().manual_seed(s))))
            for s in seeds]


def test_spearman_of_the_key_before_qk_norm_matches_an_independent_computation():
    """On a QK-norm model (Gemma 3: windows, one KV head) ``spearman_prenorm`` is the Spearman ρ of
    k_proj's output norms, taken here by a hook on k_proj, with the attention received; a model
    without QK-norm gets no such column."""
    from scipy import stats

    from helpers import tiny_family

    model = tiny_family("gemma3_text")[0]
    docs = _docs()
    table = attention.spearman_table(model, docs)
    n_kv, stop = model.config.num_key_value_heads, int(0.9 * 30)
    for _, doc in docs:
        outs = {}
        hooks = [layer.self_attn.k_proj.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out))
                 for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(input_ids=doc.input_ids, use_cache=False)
        for h in hooks:
            h.remove()
        received = attention.attention_received(model, doc.input_ids)
        for layer, out in outs.items():
            norms = out[0].view(out.shape[1], n_kv, -1).norm(dim=-1).T   # (H_kv, n)
            for head in range(n_kv):
                want = stats.spearmanr(norms[head, 1:stop].numpy(), received[layer, head, 1:stop].numpy()).statistic
                got = table[(table.document == doc.title) & (table.layer == layer) & (table.kv_head == head)]
                assert got.spearman_prenorm.item() == pytest.approx(want, abs=1e-9)
    assert "spearman_prenorm" not in attention.spearman_table(tiny_family("llama")[0], docs[:1])


def test_knorm_prenorm_loses_what_knorm_loses_without_qk_norm_and_areas_split_by_layer_type():
    """Without QK-norm, knorm_prenorm's attention lost equals knorm's row for row (it ranks the same
    keys); ``loss_areas_by_type`` on a one-type model equals ``loss_areas``, and on a hybrid model each
    type's areas equal ``loss_areas`` restricted to that type's layers."""
    from helpers import tiny_family
    from knorm_study.probes._models import tiny_gemma3_hybrid

    llama = tiny_family("llama")[0]
    lost, _ = attention.attention_lost(llama, _docs(), 20, [1.0, 0.5, 0.25], ["knorm", "knorm_prenorm"])
    a, b = (lost[lost.policy == p].drop(columns="policy").reset_index(drop=True) for p in ("knorm", "knorm_prenorm"))
    assert a.equals(b)
    by_type = attention.loss_areas_by_type(lost, attention.layer_types(llama))
    assert set(by_type.layer_type) == {"full_attention"}
    assert by_type.drop(columns="layer_type").equals(attention.loss_areas(lost))

    gemma = tiny_gemma3_hybrid()   # layer types past layer 1: local, global, local, global
    types = attention.layer_types(gemma)
    assert "sliding_attention" in types and "full_attention" in types
    lost, _ = attention.attention_lost(gemma, _docs(), 20, [1.0, 0.5, 0.25], ["knorm", "knorm_prenorm", "random"])
    by_type = attention.loss_areas_by_type(lost, types)
    for t in set(types):
        layers = [i for i, x in enumerate(types) if x == t and i >= 2]
        if not layers:
            assert by_type[by_type.layer_type == t].empty
            continue
        want = attention.loss_areas(lost[lost.layer.isin(layers)])
        got = by_type[by_type.layer_type == t].drop(columns="layer_type").reset_index(drop=True)
        assert got.equals(want)


def test_prenorm_text_states_the_verdict_the_intervals_give():
    """Per layer type: ρ(before) − ρ(cached) per document resolved negative reads "tracks attention
    more closely"; a difference straddling 0 reads "not resolved"; a record without the columns or
    the layer types gives no text."""
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    rows, areas = [], []
    for d in range(6):
        for layer, t in enumerate(types):
            shift = -0.2 if t == "full_attention" else (0.05 if d % 2 else -0.05)
            rows.append({"document": f"d{d}", "layer": layer, "kv_head": 0, "spearman": -0.1 + 0.01 * d,
                         "spearman_position_controlled": -0.1, "spearman_prenorm": -0.1 + 0.01 * d + shift + 0.001 * d,
                         "spearman_prenorm_position_controlled": -0.1})
        for t in ("full_attention", "sliding_attention"):
            areas += [{"document": f"d{d}", "policy": p, "layer_type": t, "area_above_oracle": a + 0.001 * d}
                      for p, a in (("knorm", 0.2), ("knorm_prenorm", 0.1), ("random", 0.4))]
    record = {"parameters": {"keep_ratios": [1.0, 0.5]},
              "results": {"spearman": rows, "layer_types": types, "loss_areas_by_type": areas}}
    text = attention.prenorm_text(record)
    glob, local = text.split("; loss area")[0], text.split("local (sliding window) layers:")[1]
    assert "global (full attention) layers" in glob and "tracks attention more closely" in glob
    assert "ρ(before) − ρ(cached)" in local and "(not resolved)" in local.split(";")[0]
    assert "loses less attention" in text
    table = attention.by_layer_type_text(record)
    assert "| global (full attention) | 2 |" in table and "| local (sliding window) | 3 |" in table
    assert attention.by_layer_type_text({"results": {"spearman": rows, "loss_areas_by_type": areas}}) == ""


def test_signal_by_type_headline_says_per_layer_type_whether_knorm_beats_random():
    """knorm's loss area minus random's, per document and layer type: resolved below 0 reads "knorm
    loses less", above 0 "knorm loses more", straddling 0 "no difference resolved"; a model with
    one layer type gives no line."""
    areas = []
    for d in range(6):
        for t, knorm in (("full_attention", 0.30 + (0.02 if d % 2 else -0.02)), ("sliding_attention", 0.1),
                         ("chunked_attention", 0.5)):
            areas += [{"document": f"d{d}", "layer_type": t, "policy": "knorm", "area_above_oracle": knorm + 0.001 * d},
                      {"document": f"d{d}", "layer_type": t, "policy": "random", "area_above_oracle": 0.3}]
    record = {"identity": {"model_name": "org/hybrid", "model_slug": "org--hybrid"},
              "results": {"loss_areas_by_type": areas,
                          "layer_types": ["sliding_attention", "full_attention", "chunked_attention"]}}
    line = attention.signal_by_type_headline(record)
    parts = dict(part.split(" layers ", 1) for part in line.split(":** ")[1].rstrip(".\n").split("; "))
    assert "(org/hybrid," in line and set(parts) == {"global (full attention)", "local (sliding window)",
                                                     "chunked_attention"}
    assert parts["global (full attention)"].endswith("n = 6 (no difference resolved)")
    assert parts["local (sliding window)"].startswith("-0.197 [") and parts["local (sliding window)"].endswith("(knorm loses less)")
    assert parts["chunked_attention"].endswith("(knorm loses more)")
    one_type = {"identity": {}, "results": {"loss_areas_by_type": areas, "layer_types": ["full_attention"] * 3}}
    assert attention.signal_by_type_headline(one_type) == ""
