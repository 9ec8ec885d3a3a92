"""Probes of knorm_study/norm_distributions.py (see knorm_study/fingerprint.py)."""

from __future__ import annotations

import functools
from typing import Any

import torch

import knorm_lib as kl
from knorm_study.fingerprint import FLOAT32_RTOL, probe
from knorm_study.probes import _models as m

N_TOKENS = 24
N_EARLY = 8
# token ids below the tiny model's vocabulary that the embedded tokenizer decodes as each kind:
# "\n"; "a", " a", "I" (stop words, "I" only after lower()); ",", "." and a lone byte of a UTF-8
# sequence (decoded "\ufffd": punctuation); " " and "\t" (whitespace only: other); "<|endoftext|>"
# (other); "A" (a stop word after lower()); "1" (other)
_KIND_IDS = (198, 81, 253, 57, 28, 30, 120, 216, 197, 0, 49, 33)


def _doc_ids(seed: int) -> torch.Tensor:
    """Seeded ids with every kind placed at fixed positions after the first."""
    ids = m.ids(N_TOKENS, seed).clone()
    for j, token in enumerate(_KIND_IDS):
        ids[0, 1 + 2 * j] = token
    return ids


@functools.cache
def _docs() -> tuple[tuple[str, kl.TokenizedDoc], ...]:
    return (("wiki", kl.TokenizedDoc("w-a", _doc_ids(21))), ("wiki", kl.TokenizedDoc("w-b", _doc_ids(22))),
            ("news", kl.TokenizedDoc("n-a", _doc_ids(23))))


@functools.cache
def _table() -> Any:
    """The norm table of three documents on the tiny model (shared; never modified)."""
    from knorm_study import norm_distributions as nd

    return nd.norm_table(m.tiny_llama(), m.tokenizer(), list(_docs()))


@probe("norm_distributions")
def token_kinds() -> dict[str, Any]:
    """``token_kinds`` on real text (newlines, punctuation, capitalised stop words, runs of spaces)
    and on the ids the norm table uses; the stop-word list and the kinds' order."""
    from knorm_study import norm_distributions as nd

    tok = m.tokenizer()
    text = "Hello, the cat.\n\nIt is  a dog; and I ran   away! 42 (x) --\tThe Which... é"
    return {"text": nd.token_kinds(tok, kl.encode(tok, text)),
            "ids": [nd.token_kinds(tok, doc.input_ids) for _, doc in _docs()],
            "stop_words": sorted(nd.STOP_WORDS), "kinds": list(nd.TOKEN_KINDS)}


@probe("norm_distributions", rtol=FLOAT32_RTOL)
def norm_table() -> dict[str, Any]:
    """``norm_table`` (``key_norms`` / ``value_norms`` of one prefill per document, the kinds):
    its columns, per (document, layer, head) the norm sums and position-weighted sums (an order
    check), one head's norms in full, and the kinds per document."""
    norms = _table()
    weighted = norms.assign(kw=norms.key_norm * (norms.position + 1), vw=norms.value_norm * (norms.position + 1))
    per = weighted.groupby(["corpus", "document", "layer", "kv_head"])[["key_norm", "value_norm", "kw", "vw"]].sum()
    one = norms[(norms.document == "w-b") & (norms.layer == 3) & (norms.kv_head == 1)]
    return {"columns": sorted(norms.columns), "n_rows": len(norms),
            "per_head": {"/".join(map(str, k)): [float(x) for x in v] for k, v in per.iterrows()},
            "key_norm_w-b_3_1": one.key_norm.astype(float).tolist(), "value_norm_w-b_3_1": one.value_norm.astype(float).tolist(),
            "positions": one.position.tolist(), "kinds": one.kind.tolist(),
            "kinds_l2h0": norms[(norms.layer == 2) & (norms.kv_head == 0)].groupby("document").kind.apply(list).to_dict()}


@probe("norm_distributions", rtol=FLOAT32_RTOL)
def analyses() -> dict[str, Any]:
    """The notebook's steps on the table: ``sink_ratio``, ``norm_by_kind`` (relative medians and
    counts), ``head_stability`` and ``summarize`` (all documents; one document and layers 0-1 only:
    the ``None`` branches)."""
    from knorm_study import norm_distributions as nd

    norms = _table()
    rel, counts = nd.norm_by_kind(norms)
    return {"sink_ratio": nd.sink_ratio(norms).to_dict(),
            "norm_by_kind_relative": rel.to_dict(), "norm_by_kind_columns": list(rel.columns),
            "kind_counts": {k: int(v) for k, v in counts.items()},
            "head_stability": nd.head_stability(norms),
            "summary": nd.summarize(norms, N_EARLY, 3),
            "summary_n_early_3": nd.summarize(norms, 3, 3)["early_over_late_median_norm"],
            "summary_one_doc_early_layers": nd.summarize(norms[(norms.document == "n-a") & (norms.layer < 2)], N_EARLY, 1)}


def _summary(below: float, stab: float | None, deep: float | None) -> dict[str, Any]:
    return {"n_documents": 4, "sink_ratio_median_all": 0.8234, "sink_ratio_median_layers_2plus": deep,
            "fraction_heads_sink_below_median": below, "early_over_late_median_norm": {0: 0.9},
            "median_norm_by_kind_relative": {"first": 0.41, "newline": 1.07, "punctuation": 0.96,
                                             "stop_word": 1.013, "other": 1.004},
            "head_stability_spearman_mean": stab, "key_value_norm_spearman": 0.3141, "key_norm_by_layer": {0: 5.0}}


@probe("norm_distributions")
def findings() -> dict[str, Any]:
    """``findings`` and ``headline`` on synthetic summaries: the sink below / not below the median
    in more than half the heads (0.5 itself), head stability high, at 0.5, low and unmeasured, the
    deep-layer ratio measured or not."""
    from knorm_study import norm_distributions as nd

    cases = {"low_sink": _summary(0.875, 0.8125, 0.7712), "boundary": _summary(0.5, 0.5, None),
             "high_sink": _summary(0.125, None, 1.2345), "unstable": _summary(0.53, 0.4999, 0.999)}
    return {name: {"findings": nd.findings({"results": {"summary": s}}), "headline": nd.headline({"results": {"summary": s}})}
            for name, s in cases.items()}


@probe("norm_distributions")
def spread() -> dict[str, Any]:
    """``norm_spread`` and ``spread_summary`` on the tiny model's table (one layer type), and on a tiny
    Gemma 3 with windows (local, global, local), and ``findings`` stating them."""
    from knorm_study import norm_distributions as nd

    gemma = m.tiny_gemma3_windowed()
    docs = [(c, kl.TokenizedDoc(d.title, d.input_ids)) for c, d in _docs()]
    hybrid = nd.spread_summary(gemma, nd.norm_table(gemma, m.tokenizer(), docs))
    llama = nd.spread_summary(m.tiny_llama(), _table())
    summary = _summary(0.875, 0.8125, 0.7712)
    return {"llama": llama, "hybrid": hybrid,
            "findings": [nd.findings({"results": {"summary": summary, "spread": s}}) for s in (llama, hybrid)]}
