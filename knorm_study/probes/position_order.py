"""Probes of knorm_study/position_order.py (see knorm_study/fingerprint.py)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

import knorm_lib as kl
from knorm_study.fingerprint import _plain, probe
from knorm_study.probes import _models as m

KEEP_RATIOS = (1.0, 0.7, 0.5, 0.25)
POLICIES = ("knorm", "random", "high_norm")
SKIP_LAYERS = (0, 1)
CONTEXT_LEN, CONTINUATION_LEN = 24, 8
STREAM_TOKENS = 12


def _predictable(seed: int) -> torch.Tensor:
    """Seeded ids of which two in three (after the first) are the tiny model's own greedy choice:
    next-token accuracy and top-1 agreement are neither 0 nor 1, and move with the cache."""
    model, ids = m.tiny_llama(), m.ids(CONTEXT_LEN + CONTINUATION_LEN + 1, seed).clone()
    with torch.inference_mode():
        for t in range(1, ids.shape[1]):
            if t % 3:
                ids[0, t] = model(input_ids=ids[:, :t]).logits[0, -1].argmax()
    return ids


@functools.cache
def _docs() -> tuple[tuple[str, kl.TokenizedDoc], ...]:
    return (("wiki", kl.TokenizedDoc("w-a", _predictable(41))), ("news", kl.TokenizedDoc("n-a", _predictable(42))))


@functools.cache
def _prefill() -> Any:
    """The prefill protocol's rows on two documents (shared; never modified)."""
    from knorm_study import position_order as po

    configs = po.prefill_configs(list(KEEP_RATIOS), list(POLICIES), list(SKIP_LAYERS))
    return po.prefill_rows(m.tiny_llama(), list(_docs()), CONTEXT_LEN, configs)[0]


@functools.cache
def _streaming() -> Any:
    """The streaming protocol's rows on two documents (shared; never modified)."""
    from knorm_study import position_order as po

    configs = po.streaming_configs(list(KEEP_RATIOS), list(SKIP_LAYERS))
    return po.streaming_rows(m.tiny_llama(), list(_docs()), STREAM_TOKENS, configs)[0]


def _records(df: Any) -> list[dict[str, Any]]:
    return df.to_dict("records")


def _denoised(obj: Any) -> Any:
    """``obj`` with floats below 1e-11 in magnitude as 0.0: where the code computes the same number
    two ways (storage orders under true positions, the one-pass and sequential engines, a keep_ratio
    1 cache), their difference and the KL between them are rounding noise (about 1e-16, a host's
    reduction order, not the code's behaviour); every real value here is above 1e-5."""
    if isinstance(obj, dict):
        return {k: _denoised(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_denoised(v) for v in obj]
    if isinstance(obj, float) and abs(obj) < 1e-11:
        return 0.0
    return obj


def _columns(df: Any) -> dict[str, list[Any]]:
    """A DataFrame column by column (rows in order): compact for the record."""
    return df.to_dict("list")


def _table(df: Any) -> dict[str, Any]:
    """A DataFrame with tuple column labels as plain lists (JSON keys must be strings)."""
    return {"index": [str(i) for i in df.index],
            "columns": {" | ".join(map(str, c)) if isinstance(c, tuple) else str(c): df[c].tolist() for c in df.columns}}


@probe("position_order")
def configs() -> dict[str, Any]:
    """``prefill_configs`` and ``streaming_configs`` with the notebook's arguments and with others
    (knorm not listed first, one skipped layer)."""
    from knorm_study import position_order as po

    prefill = lambda *a: [dataclasses.astuple(c) for c in po.prefill_configs(*a)]
    return {"prefill": prefill(list(KEEP_RATIOS), list(POLICIES), list(SKIP_LAYERS)),
            "prefill_other": prefill([0.9, 1.0], ["random", "knorm", "streaming"], [0]),
            "streaming": po.streaming_configs(list(KEEP_RATIOS), list(SKIP_LAYERS)),
            "streaming_other": po.streaming_configs([0.5, 1.0], [1]),
            "metrics": list(po.METRICS), "order_tolerance": po.ORDER_TOLERANCE}


@probe("position_order")
def prefill() -> dict[str, Any]:
    """``prefill_rows`` (every configuration on two documents, "PPL without compression"),
    ``plan_b_table``, ``knorm_aggregate``, ``policy_aggregate`` and ``invariants``."""
    from knorm_study import position_order as po

    df = _prefill()
    return _denoised({"rows": _columns(df), "plan_b": _table(po.plan_b_table(df)),
                      "knorm_aggregate": _columns(po.knorm_aggregate(df)),
                      "policy_aggregate": _columns(po.policy_aggregate(df)), "invariants": po.invariants(df)})


@probe("position_order")
def streaming() -> dict[str, Any]:
    """``streaming_rows`` (both engines, every position mode and order, the first ``stream_tokens``),
    ``streaming_aggregate`` and ``streaming_invariants``."""
    from knorm_study import position_order as po

    sdf = _streaming()
    return _denoised({"rows": _columns(sdf), "aggregate": _columns(po.streaming_aggregate(sdf)),
                      "invariants": po.streaming_invariants(sdf)})


class _FoldedTokenizer:
    """The embedded tokenizer with its ids folded into the tiny model's vocabulary."""

    def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": m.tokenizer()(text, **kwargs)["input_ids"] % m.VOCAB}


@probe("position_order")
def reference_ppl() -> dict[str, Any]:
    """``reference_ppl``: the full model's perplexity on the longest wiki articles (the embedded
    tokenizer's ids folded into the tiny vocabulary)."""
    from knorm_study import position_order as po

    return {"reference": po.reference_ppl(m.tiny_llama(), _FoldedTokenizer(), 2, 40)}


def _invariants(order: float, rerotated: float, lo: float, hi: float, at_1: float, plan_b: bool) -> dict[str, Any]:
    return {"order_max_rel_diff_absolute": order, "order_max_rel_diff_rerotated": rerotated,
            "cache_relative_min_inflation_when_evicting": lo, "cache_relative_max_inflation_when_evicting": hi,
            "cache_relative_equals_absolute_at_keep_1": at_1, "plan_b_constant_across_keep_ratios": plan_b}


def _streaming_invariants(order: float, by_ratio: dict[str, float], rerotated: float) -> dict[str, Any]:
    return {"order_max_rel_diff_absolute": order, "cache_relative_min_inflation_when_evicting": min(by_ratio.values()),
            "cache_relative_inflation_by_keep_ratio": by_ratio, "order_max_rel_diff_rerotated": rerotated}


# invariants (synthetic: the measured ones are near-zero rounding noise where order cannot matter,
# unfit for exact text) for every branch of the prose: the bug shown or not, order within the
# tolerance (1e-4 itself included) or not, cache_relative equal at keep_ratio 1 (1e-6 itself) or
# not, the streaming protocol agreeing or not, its damage growing at every step or not
_CASES = {
    "bug": (_invariants(3e-7, 0.1234, 1.8765, 3.2109, 0.0, True),
            _streaming_invariants(5e-8, {"1.0": 1.0, "0.7": 1.31, "0.5": 1.62, "0.25": 2.5}, 0.0456)),
    "order_matters": (_invariants(5e-4, 0.0812, 0.9123, 1.0444, 2e-6, False),
                      _streaming_invariants(2e-5, {"1.0": 1.0, "0.7": 0.95, "0.5": 1.1, "0.25": 1.05}, 0.0173)),
    "at_the_tolerances": (_invariants(1e-4, 0.0567, 1.2, 1.5, 1e-6, True),
                          _streaming_invariants(2e-3, {"1.0": 1.0, "0.7": 1.2, "0.5": 1.2, "0.25": 1.4}, 0.0222)),
    "not_equal_at_1": (_invariants(2e-5, 0.0333, 1.0, 1.1, 5e-6, False),
                       _streaming_invariants(1e-4, {"1.0": 1.0, "0.5": 0.9, "0.7": 1.3, "0.25": 1.7}, 0.0111)),
}


@probe("position_order")
def findings() -> dict[str, Any]:
    """``findings`` and ``headline`` on records holding the measured aggregates (``_lookup``),
    policies and documents and synthetic invariants for every branch; one with a model name."""
    from knorm_study import position_order as po

    df = _prefill()
    results = {"documents": [{"corpus": c, "title": d.title} for c, d in _docs()],
               "aggregate": _records(po.knorm_aggregate(df)), "policies": _records(po.policy_aggregate(df))}
    parameters = {"keep_ratios": list(KEEP_RATIOS), "sizes": {"stream_tokens": STREAM_TOKENS}}
    out = {}
    for name, (inv, stream) in _CASES.items():
        record = _plain({"parameters": parameters,
                         "results": {**results, "invariants": inv, "invariants_streaming": stream}})
        out[name] = {"findings": po.findings(record), "headline": po.headline(record)}
    record = _plain({"parameters": parameters, "identity": {"model_slug": "org--tiny", "model_name": "org/tiny"},
                     "results": {**results, "invariants": _CASES["bug"][0], "invariants_streaming": _CASES["bug"][1]}})
    out["named_model"] = po.headline(record)
    return out
