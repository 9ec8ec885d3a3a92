"""Probes of knorm_study/quality.py (see knorm_study/fingerprint.py).

04_quality_tradeoffs' steps at tiny sizes: the variants and schedules, ``prefill_sweep`` and
``reprefill_speed``'s non-timing numbers, ``streaming_rows`` and ``run_streaming`` on the tiny
model, then ``curves``, ``aggregates``, ``thresholds``, ``schedule_curves``, ``matched_memory`` and
their Markdown on those rows; and the same analysis with ``findings`` / ``headline`` on
synthetic rows built to reach every branch (enough documents to resolve a paired difference and
too few, thresholds passing, failing and dipping, schedules outside their measured range); plus
the streaming script's ``streaming_findings`` / ``streaming_headline``."""

from __future__ import annotations

import functools
import json
import math
import random
from typing import Any

import knorm_lib as kl
from knorm_study.fingerprint import probe
from knorm_study.probes._models import ids, tiny_llama

KEEP_RATIOS = [1.0, 0.5, 0.25]
SKIP = [0, 1]


def _records(df: Any) -> list[dict[str, Any]]:
    """A DataFrame as the JSON records a result file holds (NaN as null)."""
    from knorm_study import fingerprint

    return fingerprint._plain(df.to_dict("records") if hasattr(df, "to_dict") else df)


def _docs(n_tokens: int, seed: int) -> list[tuple[str, kl.TokenizedDoc]]:
    return [("wiki", kl.TokenizedDoc("w0", ids(n_tokens, seed))), ("news", kl.TokenizedDoc("n0", ids(n_tokens, seed + 1)))]


@probe("quality")
def variants_and_constants() -> dict:
    """``variants`` (with and without the all-layers knorm line), ``variant_order``,
    ``schedule_variants`` (bursts, recent window on and off), the module's constants,
    ``_mid_keep_ratio`` and ``generation_agreement``."""
    import torch

    from knorm_study import quality

    prefill = quality.variants(["knorm", "high_norm", "random", "snapkv"], SKIP, True)
    stream = quality.variants(["knorm", "random", "h2o"], SKIP, True)
    plain = quality.variants(["random", "knorm"], [0], False)
    agree = {}
    ref = torch.tensor([5, 6, 7, 8, 9, 10])
    for name, gen in {"same": ref.clone(), "third": torch.tensor([5, 6, 1, 8, 9, 10]),
                      "first": torch.tensor([0, 6, 7, 8, 1, 10]), "short": torch.tensor([5, 6, 7, 1]),
                      "empty": torch.tensor([], dtype=torch.long)}.items():
        agree[name] = quality.generation_agreement(gen, ref)
    return {"prefill": prefill, "streaming": stream, "plain": plain,
            "order": quality.variant_order(prefill, stream, plain),
            "schedules": quality.schedule_variants([0.5, 0.25, 0.1], [16, 32], 8, SKIP),
            "schedules_no_window": quality.schedule_variants([0.5], [8], 0, [0]),
            "metrics": list(quality.METRICS), "protocols": list(quality.PROTOCOLS),
            "tolerances": list(quality.TOLERANCES), "matched": list(quality.MATCHED_VARIANTS),
            "mid": [quality._mid_keep_ratio([1.0, 0.9, 0.5, 0.1]), quality._mid_keep_ratio([1.0, 0.75, 0.25, 0.1]),
                    quality._mid_keep_ratio([1.0, 0.6, 0.2])],
            "agreement": agree}


@probe("quality")
def prefill_protocol() -> dict:
    """``prefill_sweep`` over two documents (the full cache, then every variant below 1.0) and the
    non-timing numbers of ``reprefill_speed`` on the last one."""
    from knorm_study import quality

    model, docs = tiny_llama(), _docs(36, seed=21)
    variant_list = quality.variants(["knorm", "high_norm", "random", "streaming"], SKIP, True)
    sweep = quality.prefill_sweep(model, docs, 24, variant_list, KEEP_RATIOS, SKIP)
    speed = quality.reprefill_speed(model, docs[-1][1], 24, 12, sweep)
    return {"rows": _columns(sweep.rows, ROW_COLUMNS + ("n_kept", "cache_bytes", "n_scored", "position_mode", "order")),
            "n_seconds": len(sweep.seconds),
            "configs": [[c.keep_ratio, c.policy, list(c.skip_layers)] for c in sweep.configs],
            "last_results": [r.ppl for r in sweep.last_results],
            "speed": {k: v for k, v in speed.items() if k not in ("sweep_s", "reprefill_s", "speedup")}}


ROW_COLUMNS = ("protocol", "corpus", "document", "variant", "policy", "keep_ratio", "skip_layers", "prune_after",
               "recent_window", "ppl", "next_token_acc", "kl", "top1_agree", "mean_kept_fraction", "ppl_ratio")
AGG_COLUMNS = ("protocol", "corpus", "variant", "keep_ratio", "n_docs", "ppl", "ppl_ci95", "ppl_min", "ppl_ratio",
               "ppl_ratio_max", "kl", "top1_agree_ci95", "next_token_acc")


def _column(values: list) -> Any:
    """A column in few numbers: numbers as [count, sum, sum weighted by 1-based row number] (NaN
    and None left out of the sums, counted apart); anything else as [value, run length] runs."""
    plain = _records(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in plain):
        nums = [(i + 1, v) for i, v in enumerate(plain) if v is not None]
        return [len(plain), len(plain) - len(nums), math.fsum(v for _, v in nums), math.fsum(i * v for i, v in nums)]
    runs: list[list] = []
    for v in plain:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def _columns(df: Any, columns: tuple[str, ...]) -> dict[str, Any]:
    """The named columns a frame has (``_column``), and the names of all its columns."""
    return {"columns": sorted(df.columns), **{c: _column(df[c].tolist()) for c in columns if c in df.columns}}


@probe("quality")
def streaming_protocol() -> dict:
    """``streaming_rows`` and ``run_streaming`` (the schedules) over two documents, then the
    notebook's analysis of them: ``curves``, ``aggregates``, ``thresholds`` and its Markdown,
    ``schedule_curves``, ``matched_memory`` and its Markdown."""
    import pandas as pd

    from knorm_study import quality

    model, docs = tiny_llama(), _docs(24, seed=31)
    stream_variants = quality.variants(["knorm", "random", "streaming", "h2o"], SKIP, True)
    stream_df, seconds = quality.streaming_rows(model, docs, stream_variants, KEEP_RATIOS, SKIP)
    schedules = quality.schedule_variants([0.5, 0.25], [8], 4, SKIP)
    schedule_df, schedule_seconds = quality.run_streaming(model, docs, schedules)
    df, curve_rows = quality.curves([stream_df], {"streaming": stream_variants})
    agg, pooled = quality.aggregates(curve_rows)
    thresholds = quality.thresholds(curve_rows, quality.variant_order(stream_variants))
    matched_rows, lines = quality.schedule_curves(df, schedule_df, quality.MATCHED_VARIANTS)
    matched = quality.matched_memory(matched_rows, [*quality.MATCHED_VARIANTS, *dict(schedules)], [0.3, 0.45, 0.52, 0.99])
    return {"stream_rows": _columns(stream_df, ROW_COLUMNS), "schedule_rows": _columns(schedule_df, ROW_COLUMNS),
            "n_seconds": [len(seconds), len(schedule_seconds)], "rows": _columns(df, ROW_COLUMNS),
            "curve_rows": _columns(curve_rows, ROW_COLUMNS), "aggregate": _columns(agg, AGG_COLUMNS),
            "pooled": _columns(pooled, AGG_COLUMNS), "thresholds": _records(thresholds),
            "thresholds_md": quality.thresholds_markdown(_records(thresholds)),
            "matched_rows": _columns(pd.DataFrame(matched_rows), ROW_COLUMNS),
            "lines": _records(lines), "matched": _records(matched), "matched_md": quality.matched_memory_markdown(matched)}


# ---- synthetic rows: the analysis and the prose on every branch ----

# PPL increase over the full cache per (variant, keep_ratio): knorm passes 1 % down to 0.75; all
# layers fails at once within 1 %; high_norm fails everything; random dips back under the line
# at 0.25 (a lucky dip that must not count); snapkv passes 5 % down to 0.1.
RISE = {"knorm": [0.002, 0.008, 0.03, 0.07, 0.2], "knorm (all layers)": [0.02, 0.04, 0.09, 0.2, 0.5],
        "high_norm": [0.06, 0.1, 0.2, 0.4, 0.9], "random": [0.004, 0.02, 0.045, 0.004, 0.3],
        "snapkv": [0.001, 0.003, 0.009, 0.03, 0.045], "streaming": [0.003, 0.012, 0.04, 0.11, 0.25],
        "h2o": [0.001, 0.006, 0.02, 0.06, 0.12]}
COMPRESSED = [0.9, 0.75, 0.5, 0.25, 0.1]
# mean kept fraction per schedule keep_ratio: bursts keep more than their keep_ratio, the window a little more
SCHEDULE_FRACTION = {"knorm burst P=16": {0.5: 0.62, 0.25: 0.41, 0.1: 0.33},
                     "knorm + recent 8": {0.5: 0.53, 0.25: 0.28, 0.1: 0.13}}
SCHEDULE_RISE = {"knorm burst P=16": {0.5: 0.01, 0.25: 0.05, 0.1: 0.08},
                 "knorm + recent 8": {0.5: 0.02, 0.25: 0.06, 0.1: 0.15}}


def _synthetic(*args: Any) -> tuple[dict, dict]:
    """``_synthetic_json``'s record and outputs (fresh copies)."""
    return json.loads(_synthetic_json(*args))


@functools.cache
def _synthetic_json(n_per_corpus: int, policies: tuple[str, ...], streaming_policies: tuple[str, ...], all_layers: bool,
                    keep_ratios: tuple[float, ...], speedup: float, schedules: bool, seed: int) -> str:
    """A 04 record from synthetic per-document rows run through the notebook's analysis, and the
    analysis' intermediate outputs."""
    import pandas as pd

    from knorm_study import quality

    rng = random.Random(seed)
    policies, streaming_policies, keep_ratios = list(policies), list(streaming_policies), list(keep_ratios)
    by_proto = {"prefill": quality.variants(policies, SKIP, all_layers),
                "streaming": quality.variants(streaming_policies, SKIP, all_layers)}
    frames, documents = [], {}
    for proto, vs in by_proto.items():
        rows = []
        docs = [(corpus, f"{proto[0]}{corpus}{i}") for corpus in ("wiki", "news") for i in range(n_per_corpus)]
        documents[proto] = [{"corpus": c, "title": t} for c, t in docs]
        for j, (corpus, doc) in enumerate(docs):
            full = 8.0 + 3.0 * j + rng.random()
            rows.append({"protocol": proto, "corpus": corpus, "document": doc, "variant": "full cache", "keep_ratio": 1.0,
                         "ppl": full, "next_token_acc": 0.3 + 0.01 * j, "kl": 0.0, "top1_agree": 1.0,
                         "mean_kept_fraction": 1.0})
            for label, _, _ in vs:
                for r in [k for k in keep_ratios if k < 1.0]:
                    rise = (RISE[label][COMPRESSED.index(r)] * (1 + 0.3 * (rng.random() - 0.5))
                            + 0.004 * (rng.random() - 0.5))
                    rows.append({"protocol": proto, "corpus": corpus, "document": doc, "variant": label, "keep_ratio": r,
                                 "ppl": full * (1 + rise), "next_token_acc": 0.3 - rise / 4, "kl": rise / 2 + 0.001 * j,
                                 "top1_agree": 1 - rise, "mean_kept_fraction": r + 0.01 * rng.random()})
        frames.append(pd.DataFrame(rows))
    df, curve_rows = quality.curves(frames, by_proto)
    agg, pooled = quality.aggregates(curve_rows)
    order = quality.variant_order(*by_proto.values())
    thresholds = quality.thresholds(curve_rows, order)
    out = {"rows": _columns(df, ROW_COLUMNS), "curve_rows": _columns(curve_rows, ROW_COLUMNS),
           "aggregate": _columns(agg, AGG_COLUMNS),
           "pooled": _columns(pooled, AGG_COLUMNS), "order": order, "thresholds": _records(thresholds),
           "thresholds_md": quality.thresholds_markdown(_records(thresholds))}
    matched = []
    if schedules:
        schedule_list = quality.schedule_variants([0.5, 0.25, 0.1], [16], 8, SKIP)
        srows = []
        for corpus, doc in [(d["corpus"], d["title"]) for d in documents["streaming"]]:
            full = float(df[(df.variant == "full cache") & (df.document == doc)].ppl.iloc[0])
            for label, kw in schedule_list:
                rise = SCHEDULE_RISE[label][kw["keep_ratio"]] * (1 + 0.5 * (rng.random() - 0.5))
                srows.append({"protocol": "streaming", "corpus": corpus, "document": doc, "variant": label,
                              "keep_ratio": kw["keep_ratio"], "ppl": full * (1 + rise),
                              "mean_kept_fraction": SCHEDULE_FRACTION[label][kw["keep_ratio"]] + 0.01 * rng.random()})
        matched_rows, lines = quality.schedule_curves(df, pd.DataFrame(srows), quality.MATCHED_VARIANTS)
        matched = quality.matched_memory(matched_rows, [*quality.MATCHED_VARIANTS, *dict(schedule_list)], [0.3, 0.45, 0.6])
        out.update(lines=_records(lines), matched=_records(matched), matched_md=quality.matched_memory_markdown(matched),
                   matched_rows=_columns(pd.DataFrame(matched_rows), ROW_COLUMNS))
    r_mid = quality._mid_keep_ratio(keep_ratios)
    out["paired"] = {proto: _records(quality.paired_comparisons(_records(df), proto, r_mid)) for proto in by_proto}
    record = {"parameters": {"policies": policies, "streaming_policies": streaming_policies, "skip_layers": SKIP,
                             "knorm_all_layers": all_layers, "keep_ratios": keep_ratios,
                             "sizes": {"context_len": 1024, "continuation_len": 256, "stream_tokens": 1024}},
              "results": {"prefill_documents": documents["prefill"], "stream_documents": documents["streaming"],
                          "rows": _records(df), "aggregate": _records(agg), "pooled": _records(pooled),
                          "thresholds": _records(thresholds), "matched_memory": _records(matched),
                          "sweep_speed": {"n_configs": 8, "document": "Some article", "sweep_s": 12.5,
                                          "reprefill_s": 12.5 * speedup, "speedup": speedup, "token_ceiling": 3.25,
                                          "max_abs_nll_diff": 2.5e-7}}}
    return json.dumps(_records([record, out]))


BIG = (3, ("knorm", "high_norm", "random", "snapkv"), ("knorm", "random", "streaming", "h2o"), True,
       (1.0, 0.9, 0.75, 0.5, 0.25, 0.1), 3.4, True, 41)


@probe("quality")
def synthetic_analysis() -> dict:
    """The analysis on six documents per protocol (paired differences resolved or not, thresholds
    passing, failing and dipping, schedules at matched memory, some outside their range)."""
    return _synthetic(*BIG)[1]
    return out


@probe("quality")
def findings_text() -> dict:
    """``findings`` and ``headline`` (with ``schedules_text``) of two synthetic 04 records: six
    documents per protocol with schedules and a speedup; two documents (too few to resolve),
    knorm absent from the streaming policies, no all-layers line, no 0.5 keep_ratio, no speedup,
    no schedules."""
    from knorm_study import quality

    big = _synthetic(*BIG)[0]
    small, out = _synthetic(1, ("random", "knorm", "snapkv"), ("random", "h2o"), False, (1.0, 0.75, 0.25, 0.1), 0.8,
                            False, 43)
    return {"findings": quality.findings(big), "headline": quality.headline(big),
            "schedules_text": quality.schedules_text(big), "small_findings": quality.findings(small),
            "small_headline": quality.headline(small), "small_thresholds": out["thresholds"],
            "small_paired": out["paired"]}


@probe("quality")
def threshold_rules() -> dict:
    """``keep_ratio_thresholds`` on hand-made rows: a lucky dip below the line after a failure,
    a ratio exactly on the line, every ratio passing, the largest compressed one failing, two
    ``by`` columns and other tolerances."""
    from knorm_study import quality

    def rows(group: str, rel: dict[float, float], docs: int = 2) -> list[dict]:
        return [{"g": group, "h": "x", "document": f"d{d}", "keep_ratio": k, "ppl": (10.0 + d) * (v + 0.002 * d * (k < 1))}
                for d in range(docs) for k, v in {1.0: 1.0, **rel}.items()]

    data = (rows("dip", {0.9: 1.005, 0.5: 1.03, 0.25: 1.004, 0.1: 1.2})
            + rows("edge", {0.9: 1.0, 0.5: 1.05, 0.25: 1.07}, docs=1)
            + rows("all", {0.75: 1.001, 0.5: 1.002, 0.1: 1.003})
            + rows("none", {0.9: 1.2, 0.5: 1.0}))
    t1 = quality.keep_ratio_thresholds(data, ["g"])
    t2 = quality.keep_ratio_thresholds(data, ["g", "h"], (0.0, 0.02, 0.1))
    assert (10.0 * 1.05) / 10.0 == 1 + 0.05   # "edge" at 0.5 lies exactly on the 5 % line
    return {"default": _records(t1), "two_by": _records(t2)}


@probe("quality")
def streaming_script_text() -> dict:
    """``streaming_findings`` / ``streaming_headline`` (REPORT.md and README's lines on
    scripts/streaming_numbers.py) from synthetic records laid out as that script writes them:
    the full cache first, then each policy at each keep_ratio; with knorm and without it."""
    from knorm_study import quality

    rng = random.Random(51)
    rise = {"knorm": 0.05, "random": 0.2, "high_norm": 0.6, "streaming": 0.04, "h2o": 0.03}
    rows = [{"document": "Doc", "policy": "none (full cache)", "keep_ratio": 1.0, "ppl": 12.345}]
    for policy, base in rise.items():
        for k in (0.9, 0.5, 0.25):
            rows.append({"document": "Doc", "policy": policy, "keep_ratio": k,
                         "ppl": 12.345 * (1 + base * (1 - k) * (1 + 0.2 * rng.random()) / 0.75)})
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (list(rise).index(r["policy"]), -r["keep_ratio"]))
    record = {"parameters": {"tokens": 2048}, "results": {"rows": rows}}
    no_knorm = {"parameters": {"tokens": 512},
                "results": {"rows": [rows[0]] + [r for r in rows[1:] if r["policy"] != "knorm" and r["keep_ratio"] != 0.9]}}
    return {"findings": quality.streaming_findings(record), "headline": quality.streaming_headline(record),
            "findings_no_knorm": quality.streaming_findings(no_knorm),
            "headline_no_knorm": quality.streaming_headline(no_knorm)}


def _layer_choice_rows(n_docs: int = 6) -> list[dict[str, Any]]:
    """Synthetic 04 rows of a hybrid QK-norm model: per protocol and document, the full cache and
    knorm, knorm_prenorm, random and high_norm on every layer and on global layers only, at keep_ratios
    0.5 and 0.25, with PPL ratios and KV bytes per layer type (global-only keeps more bytes)."""
    rng = random.Random(7)
    rows = []
    for proto in ("prefill", "streaming"):
        for d in range(n_docs):
            full = 10.0 + d
            local, glob = 900.0, 300.0
            rows.append({"protocol": proto, "document": f"d{d}", "variant": "full cache", "keep_ratio": 1.0,
                         "ppl": full, "ppl_ratio": 1.0, "cache_bytes": 1200,
                         "by_layer_type": {"sliding_attention": {"kv_bytes": local}, "full_attention": {"kv_bytes": glob}}})
            for k in (0.5, 0.25):
                for base, cost in (("knorm", 0.04), ("knorm_prenorm", 0.03), ("random", 0.09), ("high_norm", 0.2)):
                    for suffix, scale, kept_local in (("", 1.0, local * k), (" (global layers)", 0.3, local)):
                        ratio = 1 + cost * scale * (1 - k) * 4 + 0.004 * rng.random()
                        rows.append({"protocol": proto, "document": f"d{d}", "variant": base + suffix, "keep_ratio": k,
                                     "ppl": full * ratio, "ppl_ratio": ratio, "cache_bytes": int(1200 * k),
                                     "by_layer_type": {"sliding_attention": {"kv_bytes": kept_local},
                                                       "full_attention": {"kv_bytes": glob * k}}})
    return rows


@probe("quality")
def layer_choices() -> dict:
    """``variants`` with a model (a Llama: one choice, knorm_prenorm dropped; a hybrid Gemma 3: the
    global-only lines), ``kv_fraction``, ``ppl_ratio_at``, ``matched_kv_bytes`` (both protocols,
    and a reference whose points do not span) and ``layer_choice_text`` on synthetic rows."""
    from knorm_study import quality
    from knorm_study.probes import _models as m

    policies = ["knorm", "knorm_prenorm", "random", "streaming"]
    choice = ["knorm", "knorm_prenorm", "random"]
    rows = _layer_choice_rows()
    variant_list = [(label, p, s) for label, p, s in quality.variants(
        ["knorm", "knorm_prenorm", "random", "high_norm"], SKIP, False, m.tiny_gemma3_hybrid(), ["all", "global"],
        ["knorm", "knorm_prenorm", "random", "high_norm"])]
    record = {"parameters": {"keep_ratios": [1.0, 0.5, 0.25]},
              "results": {"rows": rows, "variants": {"prefill": variant_list, "streaming": variant_list}}}
    return {"llama": quality.variants(policies, SKIP, True, m.tiny_llama(), ["all", "global"], choice),
            "hybrid": quality.variants(policies, SKIP, True, m.tiny_gemma3_hybrid(), ["all", "global"], choice),
            "hybrid_global_first": quality.variants(policies, SKIP, False, m.tiny_gemma3_hybrid(), ["global", "all"], choice),
            "kv_fraction": [quality.kv_fraction(rows[1], rows[0]), quality.kv_fraction({"cache_bytes": 300}, {"cache_bytes": 1200})],
            "ppl_ratio_at": {f"{v}@{k}": quality.ppl_ratio_at(rows, "prefill", v, k)
                             for v in ("knorm", "knorm_prenorm (global layers)", "none") for k in (0.5, 0.25)},
            "matched": {proto: quality.matched_kv_bytes(rows, proto, "knorm (global layers)", "knorm")
                        for proto in ("prefill", "streaming")},
            "matched_reversed": quality.matched_kv_bytes(rows, "prefill", "knorm", "knorm (global layers)"),
            "text": quality.layer_choice_text(record),
            "text_without": quality.layer_choice_text({"parameters": {}, "results": {"rows": rows[:1], "variants": {
                "prefill": [("knorm", "knorm", [0, 1])]}}})}


@probe("quality")
def layer_choice_headline() -> dict:
    """``layer_choice_headline`` (README's lines on knorm_prenorm and the layer choices) on the
    synthetic hybrid rows, at keep_ratios 0.5 and 0.25, and on a record with neither."""
    from knorm_study import quality
    from knorm_study.probes import _models as m

    rows = _layer_choice_rows()
    variant_list = quality.variants(["knorm", "knorm_prenorm", "random", "high_norm"], SKIP, False, m.tiny_gemma3_hybrid(),
                                    ["all", "global"], ["knorm", "knorm_prenorm", "random", "high_norm"])
    record = {"identity": {"model_name": "org/hybrid"}, "parameters": {"keep_ratios": [1.0, 0.5, 0.25]},
              "results": {"rows": rows, "variants": {"prefill": variant_list, "streaming": variant_list}}}
    plain = {"identity": {}, "parameters": {}, "results": {"rows": rows[:1], "variants": {"prefill": [("knorm", "knorm", [0, 1])]}}}
    return {"at_05": quality.layer_choice_headline(record), "at_025": quality.layer_choice_headline(record, 0.25),
            "plain": quality.layer_choice_headline(plain)}


@probe("quality")
def baselines_headline() -> dict:
    """``baselines_headline`` (README's line on knorm against random and high_norm) on the synthetic
    hybrid rows at keep_ratios 0.5 and 0.25, and on a record with knorm alone."""
    from knorm_study import quality

    rows = _layer_choice_rows()
    record = {"identity": {"model_name": "org/hybrid"}, "results": {"rows": rows}}
    alone = {"identity": {}, "results": {"rows": [x for x in rows if x["variant"] in ("knorm", "full cache")]}}
    return {"at_05": quality.baselines_headline(record), "at_025": quality.baselines_headline(record, 0.25),
            "alone": quality.baselines_headline(alone)}
