"""knorm_study.kvpress_architectures: kvpress's KnormPress against knorm_lib's, layer by layer, on
tiny random Gemma 3 and Qwen 3 (64 tokens, window 16, keep ratio 0.5: 32 of 64 kept, 7 of the 15 a
sliding cache layer holds)."""

from __future__ import annotations

import json

import pytest
import torch

import knorm_lib as kl
from knorm_study import kvpress_architectures as ka

S, F = "sliding_attention", "full_attention"
FULL, HELD = ka.N_TOKENS, ka.WINDOW - 1                      # 64 positions; a sliding cache layer holds 15
KEPT, KEPT_HELD = kl.n_kept_for(FULL, ka.KEEP_RATIO), kl.n_kept_for(HELD, ka.KEEP_RATIO)   # 32, 7
PLAIN = ("DynamicCache()", "kvpress pipeline")             # every layer a DynamicLayer holding everything
SLIDING_CACHE = ("DynamicCache(config)", "no cache passed")  # transformers' DynamicSlidingWindowLayer


@pytest.fixture(scope="module")
def rows():
    return {family: ka.compare(family) for family in ka.FAMILIES}


def of(rows, kinds, layer_type=None):
    out = [r for r in rows if r["cache_kind"] in kinds and layer_type in (None, r["layer_type"])]
    assert out
    return out


def test_the_models_are_what_the_study_says(rows):
    """Gemma 3: 4 sliding and 2 global layers, one KV head; Qwen 3: 2 KV heads, windows only when
    asked; the library's keys are kvpress's model's keys, bit for bit (exact row matching is sound)."""
    for family, want in {"gemma3_text": [S, S, F, S, S, F], "gemma3": [S, S, F, S, S, F],
                         "qwen3": [F] * 4, "qwen3_sliding": [F, S, S, S]}.items():
        assert [r["layer_type"] for r in rows[family] if r["cache_kind"] == "DynamicCache()"] == want
        assert all(r["library_keys_max_abs_diff"] == 0.0 for r in rows[family])
    assert rows["gemma3_text"][0]["model_class"] == "Gemma3ForCausalLM"
    assert rows["gemma3"][0]["model_class"] == "Gemma3ForConditionalGeneration"
    assert all(len(r["kvpress_kept_in_window"]) == 2 for r in of(rows["qwen3_sliding"], PLAIN, S))


def test_qwen3_kvpress_keeps_the_library_set_on_every_layer(rows):
    """No windows: every cache, every layer, every head: kvpress keeps 32 of 64, exactly the set
    knorm_lib keeps (both scopes are the same here), stored by ascending key norm; the question runs."""
    for r in rows["qwen3"]:
        assert (r["n_before"], r["kvpress_kept"], r["library_kept_all"]) == (FULL, KEPT, KEPT)
        assert r["same_set_as_all"] and r["same_set_as_global"], r
        assert r["kvpress_storage_order"] == "ascending key norm"
        assert r["continuation"] == "ok" and r["continuation_reads"] == [KEPT, KEPT]
        assert r["kvpress_warnings"] == []


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_sliding"])
def test_on_a_whole_cache_kvpress_compresses_sliding_layers_like_compress_all(rows, family):
    """DynamicCache() and kvpress's own pipeline: kvpress compresses the sliding layers too (32 of 64
    kept), the set of knorm_lib's compress="all", not "global" (which keeps all 64 there)."""
    for r in of(rows[family], PLAIN):
        assert r["cache_layer_class"] == "DynamicLayer" and r["n_before"] == FULL
        assert r["kvpress_kept"] == r["library_kept_all"] == KEPT and r["same_set_as_all"], r
        assert r["same_set_as_global"] == (r["layer_type"] == F)
        assert r["continuation"] == "ok"
    for r in of(rows[family], PLAIN, S):
        assert r["library_kept_global"] == FULL and r["holds_window_limit"] is False
        assert r["same_in_window_as_all"] and not r["same_in_window_as_global"]


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_sliding"])
def test_then_the_window_reads_stored_slots_not_positions(rows, family):
    """kvpress stores the kept keys by ascending norm, and the next query's window on a plain cache
    counts stored slots: it reads the last 15 slots (the highest-norm kept keys), of which fewer lie in
    its true window (positions 49..63) than kvpress kept there (what knorm_lib's window reads)."""
    rs = of(rows[family], PLAIN, S)
    for r in rs:
        assert r["kvpress_storage_order"] == "ascending key norm"
        assert all(n == HELD for n in r["continuation_reads"])
        assert all(a <= b for a, b in zip(r["continuation_reads_in_window"], r["kvpress_kept_in_window"]))
        assert r["kvpress_kept_in_window"] == r["library_all_kept_in_window"]
    assert sum(map(sum, (r["continuation_reads_in_window"] for r in rs))) < \
        sum(map(sum, (r["kvpress_kept_in_window"] for r in rs)))


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_sliding"])
def test_on_transformers_sliding_cache_kvpress_halves_the_window_then_breaks(rows, family):
    """DynamicCache(config) and the README's no-cache example: a sliding layer holds the last 15
    entries, kvpress keeps the 7 lowest-norm of those (knorm over the window, neither library scope);
    the global layers match the library; the question then fails (the mask is sized for 15 + 2, the
    layer holds 7 + 2) though it runs without the press."""
    for r in of(rows[family], SLIDING_CACHE, S):
        assert r["cache_layer_class"] == "DynamicSlidingWindowLayer"
        assert (r["n_before"], r["kvpress_kept"]) == (HELD, KEPT_HELD) and r["holds_window_limit"] is False
        assert r["same_set_as_knorm_of_last_window"] and not r["same_set_as_all"] and not r["same_set_as_global"]
    for r in of(rows[family], SLIDING_CACHE, F):
        assert r["kvpress_kept"] == KEPT and r["same_set_as_all"] and r["same_set_as_global"]
    for r in of(rows[family], SLIDING_CACHE):
        assert r["continuation"].startswith("RuntimeError") and r["continuation_without_press"] == "ok"
        assert f"({KEPT_HELD + 2})" in r["continuation"] and f"({HELD + 2})" in r["continuation"]


def test_gemma3_multimodal_class_skips_sliding_layers_as_documented(rows):
    """Gemma3ForConditionalGeneration: the sliding layers keep everything (64 on DynamicCache(), the
    15 of a sliding cache layer), the global layers match the library: compress="global". On a plain
    cache the layers then differ in length and kvpress's own pipeline fails at the question."""
    rs = rows["gemma3"]
    for r in of(rs, ka.CACHE_KINDS, S):
        assert not r["kvpress_compressed"] and r["kvpress_kept"] == r["n_before"]
        assert r["same_in_window_as_global"] and r["kvpress_kept_in_window"] == [HELD]
    for r in of(rs, ka.CACHE_KINDS, F):
        assert r["kvpress_kept"] == KEPT and r["same_set_as_all"] and r["same_set_as_global"]
    for r in of(rs, PLAIN, S):
        assert r["same_set_as_global"] and r["n_before"] == FULL
    for r in of(rs, SLIDING_CACHE, S):
        assert r["holds_window_limit"] and r["continuation"] == "ok"
    for r in of(rs, PLAIN):
        assert r["continuation"].startswith("RuntimeError") and r["continuation_without_press"] == "ok"
    summary = ka.summarize(rs)
    assert summary["DynamicCache()"]["removed_fraction"] == pytest.approx(2 * (FULL - KEPT) / (6 * FULL))
    assert summary["DynamicCache(config)"]["removed_fraction"] == pytest.approx(2 * (FULL - KEPT) / (4 * HELD + 2 * FULL))


def test_what_kvpress_says_about_gemma3(rows):
    """Its README lists Gemma3ForCausalLM as tested; its code does not (it warns "not tested" and
    exempts sliding layers for Gemma3ForConditionalGeneration only)."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from kvpress.presses.base_press import SUPPORTED_MODELS

    assert "Gemma3ForCausalLM" in ka.KVPRESS_DOCS["readme_supported_models"]
    assert Gemma3ForConditionalGeneration in SUPPORTED_MODELS and Gemma3ForCausalLM not in SUPPORTED_MODELS
    assert all(not r["kvpress_tested_class"] for r in rows["gemma3_text"])
    assert all(r["kvpress_warnings"] == ["Model <class 'transformers.models.gemma3.modeling_gemma3.Gemma3ForCausalLM'>"
                                         " not tested"] for r in rows["gemma3_text"])
    summary = ka.summarize(rows["gemma3_text"])
    assert summary["DynamicCache()"]["removed_fraction"] == 0.5
    assert summary["DynamicCache()"]["layers_compressed"] == {S: "4/4", F: "2/2"}


def test_kept_positions_matches_rows_exactly():
    """Storage order comes back; a row found nowhere, or twice, is an error."""
    full = torch.randn(1, 2, 10, 4, dtype=torch.float64)
    idx = torch.tensor([[7, 2, 5], [0, 9, 1]])
    picked = full.gather(2, idx[None, :, :, None].expand(1, 2, 3, 4))
    assert ka.kept_positions(picked, full) == idx.tolist()
    with pytest.raises(AssertionError, match="match"):
        ka.kept_positions(picked + 1e-12, full)
    doubled = full.clone()
    doubled[0, 0, 3] = doubled[0, 0, 7]
    with pytest.raises(AssertionError, match="match"):
        ka.kept_positions(picked, doubled)
    with pytest.raises(ValueError, match="family"):
        ka.compare("llama")


def test_main_writes_one_json_line(rows, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ka, "compare", lambda family: rows[family])
    monkeypatch.setattr(ka.runtime, "RESULTS_DIR", tmp_path)
    ka.main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"what", "config", "numbers", "machine"}
    assert set(line["numbers"]["per_family"]) == set(line["numbers"]["headline"]) == set(ka.FAMILIES)
    assert json.loads((tmp_path / "benchmarks" / "kvpress_architectures.json").read_text()) == line
