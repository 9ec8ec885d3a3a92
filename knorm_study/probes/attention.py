"""Probes of knorm_study/attention.py (see knorm_study/fingerprint.py)."""

from __future__ import annotations

import functools
import math
from typing import Any

import knorm_lib as kl
from knorm_study.fingerprint import FLOAT32_RTOL, probe
from knorm_study.probes import _models as m

N_TOKENS = 30       # int(0.9 * 30) = 27 positions enter the correlations
CONTEXT_LEN = 20
KEEP_RATIOS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1)   # the notebook's
POLICIES = ("knorm", "random", "high_norm", "streaming", "sink_random")


@functools.cache
def _docs() -> tuple[tuple[str, kl.TokenizedDoc], ...]:
    return tuple((corpus, kl.TokenizedDoc(title, m.ids(N_TOKENS, seed)))
                 for corpus, title, seed in (("wiki", "w-a", 31), ("wiki", "w-b", 32), ("news", "n-a", 33)))


@functools.cache
def _corr() -> Any:
    from knorm_study import attention

    return attention.spearman_table(m.tiny_llama(), list(_docs()))


@functools.cache
def _lost() -> tuple[Any, Any]:
    from knorm_study import attention

    return attention.attention_lost(m.tiny_llama(), list(_docs()), CONTEXT_LEN, list(KEEP_RATIOS), list(POLICIES))


def _records(df: Any) -> dict[str, list[Any]]:
    """A DataFrame column by column (``fraction_lost`` -> its values, rows in order)."""
    return df.to_dict("list")


@probe("attention")
def check_sizes() -> dict[str, Any]:
    """``check_sizes``: which (context_len, n_tokens) it accepts."""
    from knorm_study import attention

    out = {}
    for context_len, n_tokens in ((192, 256), (254, 256), (255, 256), (256, 256), (0, 256), (1, 3)):
        try:
            attention.check_sizes({"context_len": context_len, "n_tokens": n_tokens})
            out[f"{context_len}/{n_tokens}"] = True
        except ValueError:
            out[f"{context_len}/{n_tokens}"] = False
    return out


@probe("attention", rtol=FLOAT32_RTOL)
def attention_received() -> dict[str, Any]:
    """``attention_received`` (causal mean, query groups averaged) and ``future_attention`` (the
    continuation's mean attention on the context, and the context's cache) on one sequence."""
    from knorm_study import attention

    model, ids = m.tiny_llama(), m.ids(24, 5)
    received = attention.attention_received(model, ids)
    future, cache = attention.future_attention(model, ids, 16)
    return {"received": m.rounded(received), "received_shape": list(received.shape),
            "future": m.rounded(future), "future_shape": list(future.shape),
            "cache_lengths": cache.lengths(), "cache_seq_len": cache.seq_len,
            "cache_key_sums": [float(k.sum()) for k in cache.keys]}


@probe("attention", rtol=FLOAT32_RTOL)
def attention_mass_lost() -> dict[str, Any]:
    """``attention_mass_lost`` for the notebook's policies (``sink_random`` included) and
    keep_ratios and the oracle, under the default options and under n_sink 2 / seed 3."""
    from knorm_study import attention

    model, ids = m.tiny_llama(), m.ids(N_TOKENS, 7)
    out: dict[str, Any] = {}
    for name, kwargs in (("default", {}), ("options", {"options": kl.PolicyOptions(seed=3, n_sink=2)})):
        out[name] = _by_policy(attention.attention_mass_lost(model, ids, CONTEXT_LEN, list(KEEP_RATIOS), list(POLICIES),
                                                             **kwargs))
    out["default_policies"] = _by_policy(attention.attention_mass_lost(model, ids, CONTEXT_LEN, [0.5]))
    return out


def _by_policy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``attention_mass_lost``'s rows, compactly: their (policy@keep_ratio) and (layer, KV head)
    order, ``{policy@keep_ratio: mass_lost per (layer, KV head)}`` and the mass on the context per
    (layer, KV head), the same for every policy and keep_ratio (``False`` if it is not)."""
    out: dict[str, Any] = {"order": [], "cells": [], "mass_lost": {}, "mass_on_context": {}}
    for r in rows:
        key, cell = f"{r['policy']}@{r['keep_ratio']}", f"{r['layer']}/{r['kv_head']}"
        if key not in out["mass_lost"]:
            out["order"].append(key)
        if key == out["order"][0]:
            out["cells"].append(cell)
        out["mass_lost"].setdefault(key, []).append(r["mass_lost"])
        out["mass_on_context"].setdefault(cell, set()).add(r["mass_on_context"])
    out["mass_on_context"] = {c: v.pop() if len(v) == 1 else False for c, v in out["mass_on_context"].items()}
    return out


@probe("attention", rtol=FLOAT32_RTOL)
def spearman_table() -> dict[str, Any]:
    """``spearman_table`` on three documents: every column (ρ with and without the first token,
    position partialled out, the sink's attention and norm rank)."""
    return {"rows": _records(_corr())}


@probe("attention", rtol=FLOAT32_RTOL)
def attention_lost() -> dict[str, Any]:
    """``attention_lost`` (per-row fractions, the recorded curve over documents), ``loss_areas``
    and ``summarize`` on the three documents."""
    from knorm_study import attention

    lost, curve = _lost()
    areas = attention.loss_areas(lost)
    return {"n_rows": len(lost), "columns": sorted(lost.columns),
            "fraction_lost_sum_by_layer": lost.groupby("layer").fraction_lost.sum().to_dict(),
            "curve": _records(curve), "areas": _records(areas),
            "summary": attention.summarize(_corr(), curve, areas)}


def _rho_rows(per_doc: dict[str, tuple[float, float]], extra: bool = False) -> list[dict[str, Any]]:
    """Synthetic spearman rows: per document, ρ ``early`` in layers 0-1 and ``late`` in 2-3, two
    heads (the second head's ρ a little apart), a position-controlled ρ, and (``extra``) a NaN cell
    and a layer-5 row."""
    rows = []
    for i, (doc, (early, late)) in enumerate(per_doc.items()):
        for layer in range(4):
            for head in range(2):
                rho = (early if layer < 2 else late) + 0.01 * head * (layer + 1)
                rows.append({"document": doc, "layer": layer, "kv_head": head, "spearman": rho,
                             "spearman_position_controlled": rho / 2 + 0.003 * layer})
        if extra:
            rows.append({"document": doc, "layer": 2, "kv_head": 2, "spearman": math.nan,
                         "spearman_position_controlled": math.nan})
            rows.append({"document": doc, "layer": 5, "kv_head": 0, "spearman": late - 0.2 + 0.05 * i})
    return rows


def _summary(knorm: float, random: float, ratios: tuple[float, ...]) -> dict[str, Any]:
    lost = {}
    for r in ratios:
        lost.update({f"knorm@{r}": knorm * (1 - r), f"random@{r}": random * (1 - r),
                     f"high_norm@{r}": 0.6 * (1 - r), f"oracle@{r}": 0.05 * (1 - r)})
    return {"spearman_mean_layers_0_1": -0.1234, "spearman_mean_layers_2plus": -0.4321,
            "fraction_heads_negative_layers_2plus": 0.8125, "spearman_position_controlled_mean_layers_2plus": -0.2468,
            "sink_attention_mean": 0.3579, "fraction_lost": lost,
            "loss_area_above_oracle": {"knorm": 0.0123, "random": 0.0456, "sink_random": 0.0234}}


_CASES: dict[str, tuple[dict[str, tuple[float, float]], tuple[float, ...], float, float]] = {
    # documents' (early, late) ρ, keep_ratios, knorm's and random's loss at 1 - keep_ratio = 1
    "strong_negative": ({f"d{i}": (-0.1 + 0.01 * i, -0.5 + 0.02 * i) for i in range(6)},
                        (1.0, 0.9, 0.75, 0.5, 0.25, 0.1), 0.2, 0.5),
    "weak_negative_early_stronger": ({f"d{i}": (-0.6 + 0.01 * i, -0.12 + 0.01 * i) for i in range(5)},
                                     (1.0, 0.7, 0.4, 0.2), 0.5, 0.3),
    "positive_mixed": ({f"d{i}": (0.4 + (0.05 if i % 2 else -0.05), 0.4 + 0.01 * i) for i in range(6)},
                       (1.0, 0.5), 0.4, 0.4),
    "weak_positive": ({f"d{i}": (0.1, 0.2 + 0.005 * i) for i in range(7)}, (1.0, 0.6, 0.3), 0.1, 0.3),
    "two_documents": ({"d0": (-0.2, -0.5), "d1": (-0.1, -0.4)}, (1.0, 0.5, 0.25), 0.2, 0.3),
    "one_document": ({"d0": (-0.2, -0.5)}, (0.9, 0.5), 0.2, 0.3),
    "unresolved_negative": ({f"d{i}": (-0.3 + 0.02 * i, -0.05 + (0.4 if i % 2 else -0.4)) for i in range(6)},
                            (1.0, 0.5), 0.2, 0.3),
}


@probe("attention")
def by_document() -> dict[str, Any]:
    """``spearman_by_document`` (the default field and layers, the position-controlled field,
    other ``min_layer``) and ``early_minus_late`` on synthetic rows (NaN cells and deeper layers
    included): the bootstrap means, intervals and verdict inputs; ``None`` without rows."""
    from knorm_study import attention

    out: dict[str, Any] = {}
    for name, (per_doc, _, _, _) in _CASES.items():
        rows = _rho_rows(per_doc, extra=True)
        out[name] = {"late": attention.spearman_by_document(rows),
                     "controlled": attention.spearman_by_document(rows, "spearman_position_controlled"),
                     "from_layer_3": attention.spearman_by_document(rows, min_layer=3),
                     "early_minus_late": attention.early_minus_late(rows)}
    out["empty"] = [attention.spearman_by_document([]), attention.early_minus_late([]),
                    attention.early_minus_late([r for r in _rho_rows(_CASES["strong_negative"][0]) if r["layer"] >= 2])]
    return out


@probe("attention")
def findings() -> dict[str, Any]:
    """``findings`` and ``headline`` on synthetic records: every verdict of the correlation (holds,
    weak, fails, not resolved, too few documents, not measured) and of the first layers, the middle
    keep_ratio with and without 0.5, knorm beating random or not."""
    from knorm_study import attention

    out = {}
    for name, (per_doc, ratios, knorm, random) in _CASES.items():
        record = {"parameters": {"keep_ratios": list(ratios)},
                  "results": {"summary": _summary(knorm, random, ratios), "spearman": _rho_rows(per_doc)}}
        out[name] = {"findings": attention.findings(record), "headline": attention.headline(record)}
    record = {"parameters": {"keep_ratios": [1.0, 0.5]},
              "results": {"summary": _summary(0.2, 0.3, (1.0, 0.5)), "spearman": []}}
    out["not_measured"] = {"findings": attention.findings(record), "headline": attention.headline(record)}
    return out


@probe("attention", rtol=FLOAT32_RTOL)
def per_layer_type() -> dict[str, Any]:
    """On a hybrid QK-norm model: ``layer_types``, ``spearman_table``'s pre-norm columns,
    ``attention_lost`` with ``knorm_prenorm``, ``loss_areas_by_type``, the per-type bootstraps
    (``spearman_by_document``, ``field_difference``, ``area_difference``) and their Markdown
    (``by_layer_type_text``, ``prenorm_text``) on a record built from them."""
    from knorm_study import attention

    model = m.tiny_gemma3_hybrid()
    types = attention.layer_types(model)
    corr = attention.spearman_table(model, list(_docs()))
    lost, curve = attention.attention_lost(model, list(_docs()), CONTEXT_LEN, list(KEEP_RATIOS),
                                           ["knorm", "knorm_prenorm", "random", "high_norm"])
    by_type = attention.loss_areas_by_type(lost, types)
    rows, areas = _records(corr), _records(by_type)
    record = {"parameters": {"keep_ratios": list(KEEP_RATIOS)},
              "results": {"spearman": corr.to_dict("records"), "layer_types": types,
                          "loss_areas_by_type": by_type.to_dict("records")}}
    per_type = {t: {"rho": attention.spearman_by_document(corr.to_dict("records"), "spearman_prenorm", layer_type=t,
                                                          types=types),
                    "difference": attention.field_difference(corr.to_dict("records"), "spearman_prenorm", "spearman",
                                                             t, types),
                    "area": attention.area_difference(by_type.to_dict("records"), "knorm_prenorm", "knorm", t)}
                for t in sorted(set(types))}
    return {"types": types, "llama_types": attention.layer_types(m.tiny_llama()), "rows": rows,
            "curve": _records(curve), "areas_by_type": areas, "per_type": per_type,
            "text": attention.by_layer_type_text(record), "prenorm_text": attention.prenorm_text(record),
            "no_types_text": attention.by_layer_type_text({"results": {"spearman": rows, "loss_areas_by_type": areas}})}


@probe("attention", rtol=FLOAT32_RTOL)
def qk_norm_headline() -> dict[str, Any]:
    """``qk_norm_headline`` (README's line on the link before and after QK-norm, per layer type) on
    the hybrid QK-norm model's three documents, and on a Llama's (no line)."""
    from knorm_study import attention

    model = m.tiny_gemma3_hybrid()
    corr = attention.spearman_table(model, list(_docs()))
    record = {"identity": {"model_name": "org/hybrid"}, "parameters": {"keep_ratios": list(KEEP_RATIOS)},
              "results": {"spearman": corr.to_dict("records"), "layer_types": attention.layer_types(model),
                          "loss_areas_by_type": []}}
    llama = {"identity": {}, "results": {"spearman": _corr().to_dict("records"), "layer_types": ["full_attention"] * 4}}
    return {"hybrid": attention.qk_norm_headline(record), "llama": attention.qk_norm_headline(llama)}


@probe("attention")
def signal_by_type_headline() -> dict[str, Any]:
    """``signal_by_type_headline`` (README's line on knorm against random per layer type) on a
    hand-built hybrid record of eight documents (knorm below random on global layers, tied on
    local ones), and on one layer type (no line)."""
    from knorm_study import attention

    docs = list("abcdefgh")
    areas = [{"document": d, "layer_type": t, "policy": pol, "area_above_oracle": v + 0.01 * i}
             for i, d in enumerate(docs)
             for t, pols in (("full_attention", {"knorm": 0.1, "random": 0.3}),
                             ("sliding_attention", {"knorm": 0.2 + 0.02 * (-1) ** i, "random": 0.2}))
             for pol, v in pols.items()]
    record = {"identity": {"model_name": "org/hybrid", "model_slug": "org--hybrid"},
              "results": {"loss_areas_by_type": areas, "layer_types": ["sliding_attention", "full_attention"]}}
    one_type = {"identity": {}, "results": {"loss_areas_by_type": areas, "layer_types": ["full_attention"] * 2}}
    return {"hybrid": attention.signal_by_type_headline(record), "one_type": attention.signal_by_type_headline(one_type)}
