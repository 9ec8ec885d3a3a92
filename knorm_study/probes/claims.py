"""Probes of knorm_study/claims.py (see knorm_study/fingerprint.py): the ledger's rows, numbers and
verdicts from synthetic records of 02 to 06 shaped like the recorded ones, built so that the
verdicts sit near their rules' thresholds (the PPL tolerance, the memory match, the norm-order and
TTFT bars) and the row selection (variants, keep_ratios, bursts) matters; then the Markdown views
(ledger, README headline, several models side by side)."""

from __future__ import annotations

import copy
import math

from knorm_study.fingerprint import probe

_DOCS = [f"doc {c}" for c in "ABCDEF"]


def _ppl(base: float, log_ratio: float) -> float:
    return base * math.exp(log_ratio)


def _rec04() -> dict:
    """04's record: prefill rows (full cache; knorm, random, high_norm and variants the ledger must
    not take, at several keep_ratios), streaming rows with kept fractions, schedule rows (bursts at
    two prune_afters, a recent window)."""
    rows, schedule = [], []
    for d, doc in enumerate(_DOCS):
        base = 12.0 + 3.1 * d
        wobble = ((d * 5) % 7 - 3) / 1000
        rows.append({"protocol": "prefill", "variant": "full cache", "keep_ratio": 1.0, "document": doc, "ppl": base})
        for r, shift in ((0.5, 0.0), (0.25, 0.06), (0.75, -0.02)):
            for variant, log_ratio in (("knorm", 0.040 + shift + wobble), ("random", 0.15 + shift + 2 * wobble),
                                       ("high_norm", 0.55 + shift - wobble), ("knorm (all layers)", 0.3), ("snapkv", 0.01)):
                rows.append({"protocol": "prefill", "variant": variant, "keep_ratio": r, "document": doc,
                             "ppl": _ppl(base, log_ratio)})
        if d >= 5:
            continue   # the streaming protocol: 5 documents
        sbase = 20.0 + 1.7 * d
        rows.append({"protocol": "streaming", "variant": "full cache", "keep_ratio": 1.0, "document": doc, "ppl": sbase,
                     "mean_kept_fraction": None})
        for r, kept in ((0.5, 0.491), (0.25, 0.243)):
            rows.append({"protocol": "streaming", "variant": "knorm", "keep_ratio": r, "document": doc,
                         "ppl": _ppl(sbase, 0.048 + (r == 0.25) * 0.1 + 3 * wobble), "mean_kept_fraction": kept})
            for p, off, frac in ((16, 0.07, 0.505), (32, 0.03, 0.52)):
                schedule.append({"protocol": "streaming", "variant": f"knorm burst P={p}", "keep_ratio": r, "document": doc,
                                 "ppl": _ppl(sbase, off + (r == 0.25) * 0.1 - wobble), "mean_kept_fraction": frac * 2 * r})
            schedule.append({"protocol": "streaming", "variant": "knorm + recent 8", "keep_ratio": r, "document": doc,
                             "ppl": _ppl(sbase, 0.01), "mean_kept_fraction": r})
    # a document only compressed rows have (no full cache): never paired
    rows.append({"protocol": "prefill", "variant": "knorm", "keep_ratio": 0.5, "document": "doc Z", "ppl": 99.0})
    return {"parameters": {"keep_ratios": [1.0, 0.75, 0.5, 0.25], "schedule_keep_ratios": [0.5, 0.25], "skip_layers": [0, 1],
                           "sizes": {"context_len": 64, "continuation_len": 16, "stream_tokens": 96,
                                     "prune_afters": [16, 32]}},
            "results": {"rows": rows, "schedule_rows": schedule}}


def _rec02(n_docs: int = 6, areas: bool = True) -> dict:
    spearman = []
    for d, doc in enumerate(_DOCS[:n_docs]):
        for layer in range(4):
            for head in range(2):
                rho = (0.3 if layer < 2 else -0.08) + 0.01 * ((d * 3 + head * 5 + layer) % 7 - 3)
                spearman.append({"document": doc, "layer": layer, "kv_head": head, "spearman": rho,
                                 "spearman_position_controlled": float("nan") if (d, layer, head) == (1, 2, 0)
                                 else rho - 0.05 - 0.004 * d})
    loss = []
    for d, doc in enumerate(_DOCS[:n_docs] if areas else []):
        loss += [{"document": doc, "policy": "knorm", "area_above_oracle": 0.05 + 0.004 * d},
                 {"document": doc, "policy": "sink_random", "area_above_oracle": 0.16 - 0.003 * d * d % 5},
                 {"document": doc, "policy": "streaming", "area_above_oracle": 0.17 + 0.001 * d},
                 {"document": doc, "policy": "high_norm", "area_above_oracle": 0.7}]
    return {"results": {"spearman": spearman, "loss_areas": loss}}


def _rec05() -> dict:
    claims = [{"protocol": proto, "skip": skip, "keep_ratio": 0.1, "uncompressed": 1.0, "accuracy": acc, "lo": lo, "hi": hi,
               "n": 40, "margin": 0.1, "verdict": verdict}
              for proto, skip, acc, lo, hi, verdict in (
                  ("question-agnostic", "skip (0, 1)", 0.4, 0.263, 0.554, "fails"),
                  ("reference", "skip (0, 1)", 0.95, 0.835, 0.986, "holds"),
                  ("reference", "skip (0, 1, 12)", 0.85, 0.71, 0.93, "inconclusive"))]
    return {"parameters": {"sizes": {"protocol_context": 1024}}, "results": {"protocol_claims": claims}}


def _rec03(order_diff: float = 4.8e-7, min_inflation: float = 1.2774, at_keep_1: float = 0.0) -> dict:
    return {"results": {"documents": ["a", "b", "c", "d"], "invariants": {
        "plan_b_constant_across_keep_ratios": True, "order_max_rel_diff_absolute": order_diff,
        "cache_relative_min_inflation_when_evicting": min_inflation, "cache_relative_max_inflation_when_evicting": 11.61,
        "cache_relative_equals_absolute_at_keep_1": at_keep_1}}}


def _rec06(warm: float = -0.45) -> dict:
    return {"results": {"trap": [{}, {}, {}], "summary": {"trap_warm_change_median": warm,
                                                          "trap_fake_change_with_load_median": -0.742}}}


def _records() -> dict:
    return {"02": _rec02(), "03": _rec03(), "04": _rec04(), "05": _rec05(), "06": _rec06()}


def _outcome(fn):
    try:
        return fn()
    except ValueError as err:
        return f"raises {type(err).__name__}"


@probe("claims")
def lm_rows_and_claims() -> dict:
    """``lm_rows`` (which rows it takes at keep_ratio 0.5 and 0.25, the default and another
    prune_after, rejected choices) and ``lm_claims`` on them: measured text, n and verdict per
    row; ``within_tolerance`` at and around its limit."""
    from knorm_study import claims

    rec = _rec04()
    own = claims.lm_rows(rec, 0.5)
    own_25 = claims.lm_rows(rec, 0.25, 32)
    pick = lambda o: {k: sorted((x["protocol"], x["variant"], x["keep_ratio"], x["document"]) for x in o[k])
                      for k in ("prefill", "streaming")}
    limit = math.log1p(claims.PPL_TOLERANCE)
    bounds = {"hi at limit": (0.01, limit), "hi above": (0.01, limit + 1e-6), "lo at limit": (limit, 0.2),
              "lo above": (limit + 1e-6, 0.2), "below": (-0.1, 0.01), "straddle": (0.03, 0.07)}
    tol = {f"{k}, n {n}": claims.within_tolerance({"n": n, "lo": lo, "hi": hi, "mean": (lo + hi) / 2})
           for n in (4, 5) for k, (lo, hi) in bounds.items()}
    return {"rows_05": pick(own), "meta_05": {k: own[k] for k in ("keep_ratio", "prune_after", "skip_layers", "sizes")},
            "rows_025_p32": pick(own_25), "prune_after_025": own_25["prune_after"],
            "claims_05": claims.lm_claims(own), "claims_025_p32": claims.lm_claims(own_25),
            "claims_missing": claims.lm_claims(None),
            "rejected": [_outcome(lambda: claims.lm_rows(rec, 0.75) and "accepted"),
                         _outcome(lambda: claims.lm_rows(rec, 0.5, 64) and "accepted")],
            "within_tolerance": tol, "constants": [claims.PPL_TOLERANCE, claims.MEMORY_MATCH, list(claims.VERDICTS)]}


@probe("claims")
def other_claims() -> dict:
    """``attention_claims`` (six documents with loss areas, three documents without, none),
    ``passkey_claims`` (three protocol rows, none), ``writeup_claims`` at both sides of the
    norm-order, inflation and TTFT bars, and missing records."""
    from knorm_study import claims

    return {
        "attention": claims.attention_claims(_rec02()),
        "attention_3_docs_no_areas": claims.attention_claims(_rec02(3, areas=False)),
        "attention_missing": claims.attention_claims(None),
        "passkey": claims.passkey_claims(_rec05()),
        "passkey_empty": claims.passkey_claims({"parameters": {}, "results": {"protocol_claims": []}}),
        "writeup": claims.writeup_claims(_rec03(), _rec06()),
        "writeup_other_side": claims.writeup_claims(_rec03(2e-5, 0.98, 0.0), _rec06(-0.6)),
        "writeup_at_bars": claims.writeup_claims(_rec03(1e-5, 1.0, 1e-7), _rec06(-0.5)),
        "writeup_missing": claims.writeup_claims(None, None),
    }


@probe("claims")
def ledger_views() -> dict:
    """``ledger`` from all the records and from none, ``ledger_markdown``, ``headline`` (one
    record; with others, as ``across_models``: placeholders filling the rows they stand for,
    columns labelled by model, dtype and profile)."""
    from knorm_study import claims

    records = _records()
    own = claims.lm_rows(records["04"], 0.5)
    full = claims.ledger(own, records)
    empty = claims.ledger(None, {k: None for k in claims.SOURCES})
    partial_records = {**records, "05": None, "03": None}
    partial = claims.ledger(claims.lm_rows(records["04"], 0.25), partial_records)
    rec = {"profile": "full", "identity": {"model_slug": None, "dtype": "torch.float32"}, "results": {"ledger": full}}
    other = {"profile": "paper", "identity": {"model_slug": "org--m", "model_name": "org/m", "dtype": "torch.bfloat16"},
             "results": {"ledger": partial}}
    nothing = {"identity": {"model_slug": "x", "model_name": "/models/x"}, "results": {"ledger": copy.deepcopy(empty)}}
    return {"ledger": full, "ledger_empty": empty, "markdown": claims.ledger_markdown(full),
            "headline": claims.headline(rec), "headline_others": claims.headline(rec, [other, nothing]),
            "across_reversed": claims.across_models([nothing, other, rec]),
            "column_labels": [claims.column_label(r) for r in (rec, other, nothing)],
            "verdict_matrix": claims.verdict_matrix([rec, other, nothing]),
            "sources": claims.SOURCES}


@probe("claims")
def qk_norm_and_layer_choice_claims() -> dict:
    """``qk_norm_claims`` and ``layer_choice_claims``: on synthetic records of a hybrid QK-norm
    model (02 with pre-norm columns and loss areas, 04's rows with knorm_prenorm and global-only
    lines), on records without them (a Llama's), and missing."""
    from knorm_study import claims
    from knorm_study.probes.quality import _layer_choice_rows

    rec02 = _rec02()
    qk02 = copy.deepcopy(rec02)
    for x in qk02["results"]["spearman"]:
        x["spearman_prenorm"] = x["spearman"] - 0.05
    qk02["results"]["loss_areas"] += [{**x, "policy": "random", "area_above_oracle": x["area_above_oracle"] + 0.1 + 0.01 * i}
                                      for i, x in enumerate(qk02["results"]["loss_areas"]) if x["policy"] == "knorm"]
    rows = _layer_choice_rows()
    rec04 = {"parameters": {"skip_layers": [0, 1], "policies": ["knorm", "knorm_prenorm"]}, "results": {"rows": rows}}
    plain04 = {"parameters": {"skip_layers": [0, 1], "policies": ["knorm"]},
               "results": {"rows": [x for x in rows if "global" not in x["variant"] and x["variant"] != "knorm_prenorm"]}}
    random_better = copy.deepcopy(rec04)
    for x in random_better["results"]["rows"]:
        if x["variant"] == "random":
            x["ppl"] *= 0.8
    return {"qk": claims.qk_norm_claims(qk02, rec04, 0.5), "qk_025": claims.qk_norm_claims(qk02, rec04, 0.25),
            "qk_random_better": claims.qk_norm_claims(qk02, random_better, 0.5),
            "plain": claims.qk_norm_claims(rec02, plain04, 0.5), "missing": claims.qk_norm_claims(None, None, 0.5),
            "layers": claims.layer_choice_claims(rec04), "layers_plain": claims.layer_choice_claims(plain04),
            "layers_missing": claims.layer_choice_claims(None)}
