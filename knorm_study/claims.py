"""The claims ledger (07_paper_claims): one row per claim of the paper, of the write-up this study
starts from and of the study itself, each measured under the protocol it names, with the number,
its interval and n, and a verdict computed from them: "holds", "fails" or "not resolved" (at this n).

Every row is read from the recorded results of notebooks 02 to 06 for the same model and profile.
The language-modelling claims (``lm_rows``: 04's documents and configurations) compare per
document: each document's log perplexity against its own full cache, or two policies on the same
document, with a bootstrap over documents (``intervals.paired_bootstrap``; fewer than
``intervals.MIN_BOOTSTRAP_UNITS`` documents resolve nothing)."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import knorm_lib as kl
from knorm_study import attention, intervals, runtime
from knorm_study.intervals import enough, negative, positive

VERDICTS = ("holds", "fails", "not resolved", "not measured")
PPL_TOLERANCE = 0.05   # "barely moves perplexity": the mean increase stays within 5 %
MEMORY_MATCH = 0.02    # two schedules keep "no more memory" when their kept fractions differ by less
SOURCES = {"02": "02_attention_correlation", "03": "03_position_order_ppl", "04": "04_quality_tradeoffs",
           "05": "05_passkey_retrieval", "06": "06_speed_tradeoffs"}


# ---- the language-modelling rows, from 04's record ----

def lm_rows(rec04: dict[str, Any], keep_ratio: float, prune_after: int | None = None) -> dict[str, Any]:
    """The rows the language-modelling claims rest on, taken from 04's recorded results (so the
    ledger and 04 can never disagree): prefill, the full cache and knorm, random and high_norm at
    ``keep_ratio``; streaming, the full cache, knorm cut back after every token and knorm in the
    reference code's bursts (``prune_after``: one of 04's, default its first), at ``keep_ratio``."""
    p, r = rec04["parameters"], rec04["results"]
    sizes = p["sizes"]
    prune_after = sizes["prune_afters"][0] if prune_after is None else prune_after
    kl._require(keep_ratio in p["keep_ratios"] and keep_ratio in p["schedule_keep_ratios"], "keep_ratio", keep_ratio,
                f"one of 04's keep_ratios {p['keep_ratios']} that its schedules also run ({p['schedule_keep_ratios']})")
    kl._require(prune_after in sizes["prune_afters"], "prune_after", prune_after, f"one of 04's {sizes['prune_afters']}")

    def take(rows: Sequence[dict[str, Any]], protocol: str, variant: str, label: str | None = None) -> list[dict]:
        return [{**x, "variant": label or variant} for x in rows if x["protocol"] == protocol
                and x["variant"] == variant and (variant == "full cache" or x["keep_ratio"] == keep_ratio)]

    prefill = [x for v in ("full cache", "knorm", "random", "high_norm") for x in take(r["rows"], "prefill", v)]
    streaming = (take(r["rows"], "streaming", "full cache") + take(r["rows"], "streaming", "knorm", "knorm per token")
                 + take(r["schedule_rows"], "streaming", f"knorm burst P={prune_after}"))
    return {"prefill": prefill, "streaming": streaming, "keep_ratio": keep_ratio, "prune_after": prune_after,
            "skip_layers": p["skip_layers"], "sizes": sizes}


# ---- verdict rules ----

def _log_ppl(rows: Sequence[dict[str, Any]], variant: str) -> dict[str, float]:
    return {x["document"]: math.log(x["ppl"]) for x in rows if x["variant"] == variant}


def _paired(rows: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Per document, log PPL of ``a`` minus ``b`` (``b`` usually the full cache), bootstrapped."""
    return intervals.paired_by_unit(_log_ppl(rows, a), _log_ppl(rows, b))


def within_tolerance(b: dict[str, Any], tolerance: float = PPL_TOLERANCE) -> str:
    """For "compression barely moves perplexity": holds when the whole interval of the mean log
    PPL increase lies within ``log(1 + tolerance)``, fails when it lies wholly beyond it."""
    limit = math.log1p(tolerance)
    if not enough(b):
        return "not resolved"
    return "holds" if b["hi"] <= limit else "fails" if b["lo"] > limit else "not resolved"


def _pct(b: dict[str, Any]) -> str:
    """A bootstrapped mean log ratio as a percentage change with its interval."""
    if b["n"] == 0:
        return "not measured"
    interval = (f" [{math.expm1(b['lo']):+.1%}, {math.expm1(b['hi']):+.1%}]" if enough(b)
                else " (too few documents for an interval)")
    return f"{math.expm1(b['mean']):+.1%}{interval}"


def _row(key: str, claim: str, source: str, protocol: str, measured: str, n: int | str, verdict: str) -> dict[str, Any]:
    """One ledger row; ``key`` names the claim and protocol whatever the sizes, so the same row of
    two models' or profiles' ledgers can sit side by side (``across_models``)."""
    return {"key": key, "claim": claim, "source": source, "protocol": protocol, "measured": measured, "n": n,
            "verdict": verdict}


# ---- the ledger ----

def load_records(profile: str, slug: str | None) -> dict[str, dict[str, Any] | None]:
    """The recorded results the ledger reads, by notebook number (``None`` where a notebook has not
    been run for this model and profile)."""
    out = {}
    for key, notebook in SOURCES.items():
        path = runtime.results_path(notebook, profile, slug)
        out[key] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    return out


def _missing(key: str, claim: str, source: str, notebook: str) -> dict[str, Any]:
    """A "not measured" row standing for every row whose key starts with ``key`` + "." (the rows
    ``notebook`` would give), so another model's or profile's ledger can mark each of them."""
    return _row(key, claim, source, "—", f"run {notebook} first (same model and profile)", 0, "not measured")


def lm_claims(own: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The language-modelling claims from ``lm_rows`` (``None``: 04 has not been run)."""
    if own is None:
        return [_missing("lm", "Evicting KV cache entries by key norm barely moves perplexity", "paper (abstract)",
                         SOURCES["04"])]
    p, s, sizes = own["prefill"], own["streaming"], own["sizes"]
    r, burst = own["keep_ratio"], f"knorm burst P={own['prune_after']}"
    frac = lambda variant: next(x["mean_kept_fraction"] for x in s if x["variant"] == variant)
    claim = f"Evicting {1 - r:.0%} of the KV cache by key norm barely moves perplexity (≤ +{PPL_TOLERANCE:.0%})"
    rows = []
    for key, protocol, rows_, variant, kept in (
            ("lm.bursts", f"reference LM (bursts: prune_after {own['prune_after']}, keep_ratio {r}, skip {tuple(own['skip_layers'])}), "
             f"{sizes['stream_tokens']} tokens (the reference code's default: prune_after 1000 on 2,000–3,000 tokens)",
             s, burst, frac(burst)),
            ("lm.prefill", f"prefill, kvpress's (keep_ratio {r}, skip {tuple(own['skip_layers'])}), {sizes['context_len']} + "
             f"{sizes['continuation_len']} tokens", p, "knorm", r),
            ("lm.per_token", f"streaming, cut back every token (keep_ratio {r}), {sizes['stream_tokens']} tokens", s,
             "knorm per token", frac("knorm per token"))):
        b = _paired(rows_, variant, "full cache")
        rows.append(_row(key, claim, "paper (abstract)", protocol,
                         f"PPL {_pct(b)} vs full cache; effective kept fraction {kept:.2f}", b["n"], within_tolerance(b)))
    b = _paired(p, "high_norm", "random")
    rows.append(_row("lm.high_norm_vs_random", "Keeping the high-norm keys is worse than random", "paper (ablation)",
                     f"prefill, keep_ratio {r}", f"PPL high_norm vs random {_pct(b)}", b["n"], positive(b)))
    b = _paired(s, "knorm per token", burst)
    worse_with_more = frac("knorm per token") >= frac(burst) - MEMORY_MATCH
    rows.append(_row("lm.per_token_vs_bursts",
                     "Cutting the cache back after every token hurts KnormPress more than the reference code's "
                     f"bursts, at no more memory (kept fractions within {MEMORY_MATCH})",
                     "this study (04's streaming protocol)",
                     f"streaming, keep_ratio {r}: per token (kept {frac('knorm per token'):.3f}) vs bursts "
                     f"P={own['prune_after']} (kept {frac(burst):.3f})",
                     f"PPL per token vs burst {_pct(b)}", b["n"], positive(b) if worse_with_more else "not resolved"))
    return rows


def attention_claims(rec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The norm–attention link (02), bootstrapped over documents: per document, the mean Spearman
    correlation of key norm and attention received over the heads of layers 2 and up (raw, and
    with position partialled out); and the ALR-style loss area of knorm against keeping the sink
    plus random tokens."""
    claim, src = "Keys with a low norm receive high attention (layers 2 and up)", "paper (motivation)"
    if rec is None:
        return [_missing("attention", claim, src, SOURCES["02"])]
    r = rec["results"]
    rows = []
    for field, protocol in (("spearman", "Spearman per head, attention from all later queries (not the paper's ALR)"),
                            ("spearman_position_controlled", "the same with position partialled out")):
        b = attention.spearman_by_document(r["spearman"], field)
        if b is None:
            continue
        rows.append(_row(f"attention.{field}", claim, src, protocol, f"mean ρ {b['mean']:+.3f}"
                         + (f" [{b['lo']:+.3f}, {b['hi']:+.3f}]" if enough(b) else " (too few documents for an interval)"),
                         b["n"], negative(b)))
    areas: dict[str, dict[str, float]] = {}
    for x in r.get("loss_areas", []):
        areas.setdefault(x["policy"], {})[x["document"]] = x["area_above_oracle"]
    if "knorm" in areas and "sink_random" in areas:
        b = intervals.paired_by_unit(areas["sink_random"], areas["knorm"])
        mean = lambda p: sum(areas[p].values()) / len(areas[p])
        rows.append(_row("attention.beyond_sink",
                         "The key norm carries signal beyond the attention sink: evicting by norm loses less "
                         "attention than keeping the sink and evicting at random", "paper (motivation)",
                         "attention lost by the continuation's queries, area above the oracle over evicted fractions "
                         "(ALR-style), layers 2 and up",
                         f"area knorm {mean('knorm'):.3f}, sink + random {mean('sink_random'):.3f}"
                         + (f", sink + recent {mean('streaming'):.3f}" if "streaming" in areas else "")
                         + f"; difference {b['mean']:+.3f}"
                         + (f" [{b['lo']:+.3f}, {b['hi']:+.3f}]" if enough(b) else ""), b["n"],
                         positive(b)))
    return rows


def qk_norm_claims(rec02: dict[str, Any] | None, rec04: dict[str, Any] | None, keep_ratio: float) -> list[dict[str, Any]]:
    """The claims only a model with QK-norm can test (02 records the key before QK-norm there:
    ``spearman_prenorm``; 04 runs ``knorm_prenorm``): that evicting by the cached key's norm still
    loses less attention than random eviction (02's loss areas, paired by document), and that the
    key's norm before QK-norm keeps the signal the normalised key lost (04: knorm_prenorm against
    knorm and against random, per protocol, paired by document in log perplexity)."""
    from knorm_study import quality

    rows = []
    claim = "The key norm carries the signal under QK-norm: evicting by it loses less attention than random eviction"
    src, no_qk = "this study (QK-norm models)", "no QK-norm in this model: the claim does not apply"
    if rec02 is None:
        rows.append(_missing("qk_norm.signal", claim, src, SOURCES["02"]))
    else:
        r = rec02["results"]
        qk = bool(r["spearman"]) and "spearman_prenorm" in r["spearman"][0]
        b = attention.area_difference(r.get("loss_areas", []), "random", "knorm") if qk else None
        rows.append(_row("qk_norm.signal", claim, src, "attention lost by the continuation's queries, area above the oracle "
                         "(ALR-style), layers 2 and up", no_qk if not qk else "not measured" if b is None else
                         f"area random − knorm {b['mean']:+.3f}" + (f" [{b['lo']:+.3f}, {b['hi']:+.3f}]" if enough(b) else ""),
                         0 if b is None else b["n"], "not measured" if b is None else positive(b)))
    claim = "On QK-norm models the key's norm before the normalisation keeps the signal the normalised key lost"
    if rec04 is None:
        return rows + [_missing("qk_norm.prenorm", claim, src, SOURCES["04"])]
    for protocol in quality.PROTOCOLS:
        at = [x for x in rec04["results"]["rows"] if x["protocol"] == protocol and x["keep_ratio"] == keep_ratio]
        ratios = {v: _log_ppl(at, v) for v in ("knorm_prenorm", "knorm", "random")}   # same documents: log PPL pairs
        key = f"qk_norm.prenorm.{protocol}"
        where = f"{protocol}, keep_ratio {keep_ratio}, every layer outside skip {tuple(rec04['parameters']['skip_layers'])}"
        if not ratios["knorm_prenorm"]:
            rows.append(_row(key, claim, src, where, no_qk if "knorm_prenorm" in rec04["parameters"].get("policies", [])
                             else "knorm_prenorm not run", 0, "not measured"))
            continue
        vs_knorm = intervals.paired_by_unit(ratios["knorm_prenorm"], ratios["knorm"])
        vs_random = intervals.paired_by_unit(ratios["knorm_prenorm"], ratios["random"])
        better = lambda b: negative(b) == "holds"
        worse = lambda b: positive(b) == "holds"
        verdict = ("holds" if better(vs_knorm) and better(vs_random) else
                   "fails" if worse(vs_knorm) or worse(vs_random) else "not resolved")
        rows.append(_row(key, claim, src, where, f"PPL knorm_prenorm vs knorm {_pct(vs_knorm)}, vs random {_pct(vs_random)}",
                         vs_knorm["n"], verdict))
    return rows


def layer_choice_claims(rec04: dict[str, Any] | None) -> list[dict[str, Any]]:
    """On a model with sliding-window layers: compressing only the global layers (kvpress's rule for
    Gemma 3) against every layer (the paper's), KnormPress, at matched KV bytes (04's rows,
    ``quality.matched_kv_bytes``, at the lowest keep_ratio of global-only that every-layer's points
    reach), per protocol."""
    from knorm_study import quality

    claim = ("Compressing only the global layers loses less than compressing every layer, at matched KV bytes "
             "(KnormPress)")
    src = "this study (sliding-window models)"
    if rec04 is None:
        return [_missing("layers.global_only", claim, src, SOURCES["04"])]
    rows = []
    label = f"knorm ({quality.CHOICE_LABELS['global']})"
    for protocol in quality.PROTOCOLS:
        key = f"layers.global_only.{protocol}"
        matched = [m for m in quality.matched_kv_bytes(rec04["results"]["rows"], protocol, label, "knorm") if m["n"]]
        if not matched:
            ran = any(x["variant"] == label for x in rec04["results"]["rows"])
            rows.append(_row(key, claim, src, protocol, "no matched KV bytes" if ran else
                             "no sliding-window layers in this model: the claim does not apply", 0, "not measured"))
            continue
        m = matched[-1]
        rows.append(_row(key, claim, src, f"{protocol}, global only at keep_ratio {m['keep_ratio']:g} against every layer "
                         f"at the same KV bytes ({m['kv_fraction']:.2f} of the full cache's)",
                         f"PPL global only vs every layer {_pct(m)}", m["n"], negative(m)))
    return rows


def passkey_claims(rec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The paper's passkey claim under both protocols, as 05 recorded it (Wilson intervals)."""
    claim = "Passkey retrieval survives 90 % compression"
    if rec is None or not rec["results"].get("protocol_claims"):
        return [_missing("passkey", claim, "paper (abstract)", SOURCES["05"])]
    ctx = rec["parameters"]["sizes"]["protocol_context"]
    return [_row(f"passkey.{c['protocol']}.{c['skip']}", claim, "paper (abstract)",
                 f"{c['protocol']}, {c['skip']}, keep_ratio {c['keep_ratio']}, {ctx} tokens",
                 f"{c['accuracy']:.0%} [{c['lo']:.0%}, {c['hi']:.0%}] vs {c['uncompressed']:.0%} uncompressed", c["n"],
                 {"holds": "holds", "fails": "fails"}.get(c["verdict"], "not resolved"))
            for c in rec["results"]["protocol_claims"]]


def writeup_claims(rec03: dict[str, Any] | None, rec06: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The write-up's claims: exact invariants from 03 (they hold or not on every document) and
    06's cold-versus-warm timing."""
    src = "write-up (shared/seed)"
    rows = []
    if rec03 is None:
        rows.append(_missing("writeup.positions", "The perplexity jump comes from storing the cache in norm order", src,
                             SOURCES["03"]))
    else:
        inv, n = rec03["results"]["invariants"], len(rec03["results"]["documents"])
        rows += [
            _row("writeup.positions.plan_b", "Perplexity without compression (Plan B) reports what compression does", src,
                 "prefill, every keep_ratio",
                 "the same number at every keep_ratio" if inv["plan_b_constant_across_keep_ratios"] else "it varies",
                 n, "fails" if inv["plan_b_constant_across_keep_ratios"] else "not resolved"),
            _row("writeup.positions.norm_order", "The perplexity jump comes from storing the cache in norm order", src,
                 "prefill, true positions",
                 f"norm order changes PPL by at most {inv['order_max_rel_diff_absolute']:.0e} (relative)", n,
                 "fails" if inv["order_max_rel_diff_absolute"] <= 1e-5 else "not resolved"),
            _row("writeup.positions.numbering", "The jump comes from numbering new tokens from the compressed length (BACKGROUND's diagnosis)",
                 "this study", "prefill, cache_relative vs absolute positions",
                 f"PPL × {inv['cache_relative_min_inflation_when_evicting']:.2f} to "
                 f"× {inv['cache_relative_max_inflation_when_evicting']:.2f} whenever tokens are evicted; × 1 at keep 1.0",
                 n, "holds" if inv["cache_relative_min_inflation_when_evicting"] > 1
                 and inv["cache_relative_equals_absolute_at_keep_1"] == 0 else "fails")]
    claim = "Compressing the cache cuts time to first token by 95 %"
    if rec06 is None:
        rows.append(_missing("writeup.ttft", claim, src, SOURCES["06"]))
    else:
        s = rec06["results"]["summary"]
        n = len(rec06["results"]["trap"])
        rows.append(_row("writeup.ttft", claim, src, "TTFT, compressed vs full, both warm (06)",
                         f"warm vs warm {s['trap_warm_change_median']:+.0%} (median); a cold baseline alone gives "
                         f"{s['trap_fake_change_with_load_median']:+.0%} with the model load in its clock",
                         n, "fails" if s["trap_warm_change_median"] > -0.5 else "not resolved"))
    return rows


def ledger(own: dict[str, Any] | None, records: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Every claim's row: the language-modelling claims (``lm_rows``), then the others."""
    keep_ratio = own["keep_ratio"] if own else 0.5
    return (lm_claims(own) + attention_claims(records["02"]) + qk_norm_claims(records["02"], records["04"], keep_ratio)
            + layer_choice_claims(records["04"]) + passkey_claims(records["05"])
            + writeup_claims(records["03"], records["06"]))


def ledger_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| claim | source | protocol | measured | n | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['source']} | {r['protocol']} | {r['measured']} | {r['n']} | **{r['verdict']}** |"
              for r in rows]
    return "\n".join(lines)


def headline(record: dict[str, Any], others: Sequence[dict[str, Any]] = ()) -> str:
    """README's ledger: the count of each verdict, then a table, a row per claim (claim · protocol ·
    number · n · verdict); with ``others`` (other models' or profiles' 07 records), one column per
    record instead (``across_models``)."""
    rows = record["results"]["ledger"]
    count = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    lead = (f"- **Claims ledger ({runtime.model_label(record)}, {record.get('profile', '?')} profile, {len(rows)} rows):** "
            f"{count['holds']} hold, {count['fails']} fail, {count['not resolved']} not resolved at their n"
            + (f", {count['not measured']} not measured" if count["not measured"] else "") + ".\n\n")
    if others:
        return lead + across_models([record, *others]) + "\n\n"
    lines = ["  | claim | protocol | number | n | verdict |", "  |---|---|---|---|---|"]
    lines += [f"  | {r['claim']} | {r['protocol']} | {r['measured']} | {r['n']} | **{r['verdict']}** |" for r in rows]
    return lead + "\n".join(lines) + "\n\n"


def column_label(record: dict[str, Any]) -> str:
    """A ledger column's name: the model, its dtype when not float32, and the profile."""
    dtype = str(record.get("identity", {}).get("dtype", "torch.float32")).removeprefix("torch.")
    return f"{runtime.model_label(record)}{'' if dtype == 'float32' else ', ' + dtype} · {record.get('profile', '?')}"


def _aligned(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, dict[str, Any]]]]:
    """The row keys of several 07 records in order (the first record's, then any others) and, per
    record, its rows by key; a record's "not measured" placeholder (``_missing``: key "passkey")
    fills the rows it stands for ("passkey.reference.skip (0, 1)", ...) instead of being a row."""
    order: list[str] = []
    cells: list[dict[str, dict[str, Any]]] = []
    for rec in records:
        by_key = {r["key"]: r for r in rec["results"]["ledger"] if "key" in r}
        order += [k for k in by_key if k not in order]
        cells.append(by_key)
    order = [k for k in order if not any(o.startswith(k + ".") for o in order)]
    for c in cells:
        for k in [k for k in order if k not in c]:
            stand_in = next((p for p in c if k.startswith(p + ".") and c[p]["verdict"] == "not measured"), None)
            if stand_in:
                c[k] = c[stand_in]
    return order, cells


def across_models(records: Sequence[dict[str, Any]]) -> str:
    """The ledgers of several 07 records side by side (Markdown): each claim once (by its row key, in
    the first record's order, then any others), one column per record with its verdict, number and
    n, and under the table each column's protocol sizes, so a claim that fails at one scale and
    holds at another shows at a glance."""
    order, cells = _aligned(records)
    measured = lambda k: [c[k] for c in cells if k in c and c[k]["verdict"] != "not measured"]
    first = lambda k: (measured(k) or [c[k] for c in cells if k in c])[0]
    header = ["claim", "protocol", *(column_label(r) for r in records)]
    lines = ["  | " + " | ".join(header) + " |", "  |" + "---|" * len(header)]
    for k in order:
        row = first(k)
        lines.append(f"  | {row['claim']} | {_protocol_name(k, row)} | " + " | ".join(
            "—" if k not in c else f"**not measured**: {c[k]['measured']}" if c[k]["verdict"] == "not measured"
            else f"**{c[k]['verdict']}** {c[k]['measured']} (n = {c[k]['n']})" for c in cells) + " |")
    sizes = [f"  - {column_label(r)}: " + "; ".join(dict.fromkeys(x["protocol"] for x in r["results"]["ledger"]
                                                                 if x["verdict"] != "not measured"))
             for r in records]
    return "\n".join(lines) + "\n\n  Protocols as measured, per column:\n\n" + "\n".join(sizes)


def _protocol_name(key: str, row: dict[str, Any]) -> str:
    """A row's protocol without its sizes (they differ by column; listed under the table)."""
    return (", ".join(key.split(".", 2)[1:]) if key.startswith("passkey.")
            else row["protocol"].split(",")[0].split("(")[0].strip())


# the verdict matrix's row names, by row key (a key not here: the claim's first words)
SHORT_CLAIMS = {
    "lm.bursts": "PPL within 5 % at 50 % eviction: bursts (reference LM)",
    "lm.prefill": "PPL within 5 % at 50 % eviction: prefill",
    "lm.per_token": "PPL within 5 % at 50 % eviction: streaming, per token",
    "lm.high_norm_vs_random": "high-norm eviction worse than random",
    "lm.per_token_vs_bursts": "per-token cutting hurts more than bursts",
    "attention.spearman": "low norm ↔ high attention",
    "attention.spearman_position_controlled": "low norm ↔ high attention, position out",
    "attention.beyond_sink": "norm signal beyond the attention sink",
    "qk_norm.signal": "QK-norm: key norm still beats random (attention)",
    "qk_norm.prenorm.prefill": "QK-norm: key before the norm does better, prefill",
    "qk_norm.prenorm.streaming": "QK-norm: key before the norm does better, streaming",
    "layers.global_only.prefill": "windows: global layers only lose less, prefill",
    "layers.global_only.streaming": "windows: global layers only lose less, streaming",
    "writeup.positions.plan_b": "write-up: PPL without compression measures it",
    "writeup.positions.norm_order": "write-up: the jump comes from norm order",
    "writeup.positions.numbering": "the jump comes from position numbering",
    "writeup.ttft": "write-up: compression cuts TTFT by 95 %",
}
VERDICT_COLOURS = {"holds": "#4c9a5b", "fails": "#c8553d", "not resolved": "#e6c229", "not measured": "#f2f2f2"}


def verdict_matrix(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], list[list[str]]]:
    """The ledgers of several 07 records as a grid: row names (``SHORT_CLAIMS``; passkey rows by
    protocol and skip), column names (``column_label``) and per row, per column, the verdict
    ("not measured" where a column has no such row)."""
    order, cells = _aligned(records)

    def name(k: str) -> str:
        if k in SHORT_CLAIMS:
            return SHORT_CLAIMS[k]
        if k.startswith("passkey."):
            return f"passkey survives 90 %: {', '.join(k.split('.', 2)[1:])}"
        return " ".join(next(c[k] for c in cells if k in c)["claim"].split()[:8])

    names = [name(k) for k in order]
    grid = [[c[k]["verdict"] if k in c else "not measured" for c in cells] for k in order]
    return names, [column_label(r) for r in records], grid


def plot_verdict_matrix(records: Sequence[dict[str, Any]]) -> Any:
    """``verdict_matrix`` as a matplotlib figure: claims down, model · profile across, each cell
    coloured by its verdict (holds / fails / not resolved / not measured) and labelled."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names, columns, grid = verdict_matrix(records)
    codes = [[VERDICTS.index(v) for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(4.5 + 1.6 * len(columns), 1.2 + 0.34 * len(names)))
    ax.imshow(codes, cmap=ListedColormap([VERDICT_COLOURS[v] for v in VERDICTS]), vmin=0, vmax=len(VERDICTS) - 1,
              aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v in ("holds", "fails") else "black")
    ax.set_xticks(range(len(columns)), [c.replace(" · ", "\n") for c in columns], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, len(columns))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(names))], minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    fig.legend(handles=[Patch(color=VERDICT_COLOURS[v], label=v) for v in VERDICTS], loc="lower center",
               ncols=len(VERDICTS), fontsize=8, frameon=False)
    ax.set_title("Claims ledger: verdict per model and profile (computed from the recorded numbers)", fontsize=9, pad=28)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def other_ledgers(record: dict[str, Any], results_dir: Any = None) -> list[dict[str, Any]]:
    """Every other 07 record under ``results_dir`` (default ``runtime.RESULTS_DIR``) whose verdicts
    were computed by this module's rules (this module's probes in its behavioural identity are
    today's, ``fingerprint``): the embedded model's other profiles and every other model's
    (``<notebook>/<slug>/<profile>.json``)."""
    from pathlib import Path

    from knorm_study import fingerprint

    rules = fingerprint.module_probes("claims")
    base = Path(results_dir or runtime.RESULTS_DIR) / "07_paper_claims"
    out = []
    for path in sorted([*base.glob("*.json"), *base.glob("*/*.json")]):
        rec = json.loads(path.read_text(encoding="utf-8"))
        identity = rec.get("identity", {})
        same = (identity.get("model_slug") == record.get("identity", {}).get("model_slug")
                and rec.get("profile") == record.get("profile"))
        if not same and not fingerprint.probes_moved(identity.get("behaviour"), rules):
            out.append(rec)
    return out
