"""The claims ledger: verdict rules, the rows it reads from other notebooks, missing results."""

from __future__ import annotations

import json
import math

import pytest

from helpers import ROOT
from knorm_study import claims, intervals


def _boot(diffs):
    return intervals.paired_bootstrap(diffs)


def test_within_tolerance_needs_the_whole_interval():
    """holds: the interval of the mean log PPL increase lies within log(1.05); fails: wholly beyond;
    too few documents or an interval across the line: not resolved."""
    assert claims.within_tolerance(_boot([0.01, 0.02, 0.015, 0.01, 0.02])) == "holds"
    assert claims.within_tolerance(_boot([0.3, 0.4, 0.35, 0.5, 0.45])) == "fails"
    assert claims.within_tolerance(_boot([0.0, 0.1, 0.02, 0.09, 0.05])) == "not resolved"
    assert claims.within_tolerance(_boot([0.3, 0.4])) == "not resolved"   # n = 2: nothing resolves


def test_positive_is_a_signed_paired_verdict():
    assert claims.positive(_boot([1.0, 2.0, 1.5, 1.2, 0.8])) == "holds"
    assert claims.positive(_boot([-1.0, -2.0, -1.5, -1.2, -0.8])) == "fails"
    assert claims.positive(_boot([-1.0, 2.0, -1.5, 1.2, 0.8])) == "not resolved"


def _own(n_docs: int, burst_ppl: float):
    prefill, streaming = [], []
    for i in range(n_docs):
        doc = f"d{i}"
        for variant, ppl in (("full cache", 10.0), ("knorm", 10.2), ("random", 12.0), ("high_norm", 30.0)):
            prefill.append({"document": doc, "variant": variant, "ppl": ppl + 0.01 * i})
        for variant, ppl, kept in (("full cache", 10.0, 1.0), ("knorm per token", 20.0, 0.5),
                                   ("knorm burst P=256", burst_ppl, 0.4)):
            streaming.append({"document": doc, "variant": variant, "ppl": ppl * (1 + 0.01 * i),
                              "mean_kept_fraction": kept})
    return {"prefill": prefill, "streaming": streaming, "keep_ratio": 0.5, "prune_after": 256, "skip_layers": [0, 1],
            "sizes": {"context_len": 1024, "continuation_len": 256, "stream_tokens": 1024}}


def test_ledger_from_constructed_rows_and_missing_records():
    """The perplexity claims follow the paired numbers; a notebook with no results gives a
    "not measured" row naming it, never a verdict."""
    rows = claims.ledger(_own(6, burst_ppl=10.2), {k: None for k in claims.SOURCES})
    row = lambda start: next(r for r in rows if r["claim"].startswith(start))
    lm = [r for r in rows if r["claim"].startswith("Evicting 50%")]
    assert [r["verdict"] for r in lm] == ["holds", "holds", "fails"]   # burst +2 %, prefill +2 %, per token +100 %
    assert all(r["n"] == 6 for r in lm)
    assert row("Keeping the high-norm keys")["verdict"] == "holds"
    per_token = row("Cutting the cache back")
    assert per_token["verdict"] == "holds" and "+9" in per_token["measured"]   # ~ +96 % over the burst
    missing = [r for r in rows if r["verdict"] == "not measured"]
    # 04's record itself is missing too: the QK-norm and layer-choice rows read it, not lm_rows
    assert {m["measured"].split()[1] for m in missing} == {"02_attention_correlation", "05_passkey_retrieval",
                                                         "03_position_order_ppl", "06_speed_tradeoffs",
                                                         "04_quality_tradeoffs"}
    few = claims.ledger(_own(2, burst_ppl=10.2), {k: None for k in claims.SOURCES})
    assert all(r["verdict"] in ("not resolved", "not measured") for r in few)
    assert "| **holds** |" in claims.ledger_markdown(rows)


def _record04():
    rows, schedule = [], []
    for doc in ("a", "b"):
        rows.append({"protocol": "prefill", "document": doc, "variant": "full cache", "keep_ratio": 1.0, "ppl": 10.0})
        rows.append({"protocol": "streaming", "document": doc, "variant": "full cache", "keep_ratio": 1.0, "ppl": 9.0})
        for r in (0.5, 0.25):
            for v in ("knorm", "random", "high_norm", "snapkv"):
                rows.append({"protocol": "prefill", "document": doc, "variant": v, "keep_ratio": r, "ppl": 11.0})
            for v in ("knorm", "h2o"):
                rows.append({"protocol": "streaming", "document": doc, "variant": v, "keep_ratio": r, "ppl": 12.0})
            for p in (16, 32):
                schedule.append({"protocol": "streaming", "document": doc, "variant": f"knorm burst P={p}",
                                 "keep_ratio": r, "ppl": 13.0, "prune_after": float(p)})
    return {"parameters": {"keep_ratios": [1.0, 0.5, 0.25], "schedule_keep_ratios": [0.5, 0.25], "skip_layers": [0, 1],
                           "sizes": {"prune_afters": [16, 32], "context_len": 64, "continuation_len": 16,
                                     "stream_tokens": 96}},
            "results": {"rows": rows, "schedule_rows": schedule}}


def test_lm_rows_are_04s_rows_at_the_chosen_setting():
    """The ledger's perplexity rows are exactly 04's rows at keep_ratio (and the chosen burst), relabelled;
    a setting 04 did not run is an error naming the parameter; no 04 record gives a "not measured" row."""
    own = claims.lm_rows(_record04(), 0.25, 32)
    assert [(x["document"], x["variant"]) for x in own["prefill"]] == [
        (d, v) for v in ("full cache", "knorm", "random", "high_norm") for d in ("a", "b")]
    assert all(x["keep_ratio"] == 0.25 for x in own["prefill"] + own["streaming"] if x["variant"] != "full cache")
    assert sorted({x["variant"] for x in own["streaming"]}) == ["full cache", "knorm burst P=32", "knorm per token"]
    assert own["prune_after"] == 32 and own["sizes"]["stream_tokens"] == 96
    assert claims.lm_rows(_record04(), 0.5)["prune_after"] == 16   # default: 04's first
    with pytest.raises(ValueError, match="keep_ratio"):
        claims.lm_rows(_record04(), 0.75)
    with pytest.raises(ValueError, match="prune_after"):
        claims.lm_rows(_record04(), 0.5, 64)
    missing = claims.ledger(None, {k: None for k in claims.SOURCES})
    assert "04_quality_tradeoffs" in missing[0]["measured"] and missing[0]["verdict"] == "not measured"


def test_headline_counts_the_verdicts():
    rows = claims.ledger(_own(6, burst_ppl=10.2), {k: None for k in claims.SOURCES})
    line = claims.headline({"results": {"ledger": rows}, "identity": {}})
    counts = {v: sum(r["verdict"] == v for r in rows) for v in claims.VERDICTS}
    assert f"{counts['holds']} hold, {counts['fails']} fail" in line and f"{counts['not measured']} not measured" in line
    assert math.isfinite(counts["holds"]) and line.startswith("- **Claims ledger")
    table = [x for x in line.splitlines() if x.startswith("  | ")]
    assert table[0] == "  | claim | protocol | number | n | verdict |" and len(table) == len(rows) + 1
    assert all(f"| **{r['verdict']}** |" in t for r, t in zip(rows, table[1:]))


def _record(slug, profile, rows, rules=None):
    from knorm_study import fingerprint

    rules = rules or fingerprint.compute(fingerprint.module_probes("claims"))
    return {"profile": profile, "identity": {"model_slug": slug, "model_name": slug and f"org/{slug}",
                                             "dtype": "torch.float32", "behaviour": rules},
            "results": {"ledger": rows}}


def test_the_ledger_across_models_shows_each_claim_once_with_a_column_each(tmp_path):
    """Two records' ledgers side by side: a claim that fails for one model and holds for the other
    reads so in one row; a claim only one record has reads "—" in the other's column."""
    small = claims.ledger(_own(6, burst_ppl=14.0), {k: None for k in claims.SOURCES})
    big = [dict(r, verdict="holds", measured="PPL +1.0%", n=20) if r["key"] == "lm.bursts" else r for r in small
           if r["key"] != "lm.per_token_vs_bursts"]
    assert [r["verdict"] for r in small if r["key"] == "lm.bursts"] == ["fails"]
    table = claims.across_models([_record(None, "full", small), _record("big", "paper", big)])
    lines = table.splitlines()
    assert lines[0] == "  | claim | protocol | SmolLM2-135M-Instruct · full | org/big · paper |"
    bursts = [x for x in lines if x.startswith("  | ") and "reference LM" in x]
    assert len(bursts) == 1 and "**fails**" in bursts[0].split("|")[3] and "**holds** PPL +1.0% (n = 20)" in bursts[0]
    only_small = [x for x in lines if x.startswith("  | Cutting the cache back")]
    assert len(only_small) == 1 and only_small[0].rstrip(" |").endswith("—")
    assert len({r["key"] for r in small}) == len(small)   # every row has its own key
    # other_ledgers: every 07 record but the one asked about
    for slug, profile, rows, rules in ((None, "full", small, None), ("big", "paper", big, None),
                                       ("old", "full", big, {"claims.other": {"rule": 1}})):
        path = tmp_path / "07_paper_claims" / (slug or "") / f"{profile}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_record(slug, profile, rows, rules)))
    others = claims.other_ledgers(_record(None, "full", small), tmp_path)
    assert [o["identity"]["model_slug"] for o in others] == ["big"]   # not itself, not another rule set's
    line = claims.headline(_record(None, "full", small), others)
    assert "| org/big · paper |" in line


def test_a_column_without_a_notebook_reads_not_measured_on_each_of_its_rows():
    """A ledger whose 05 and 03 were not run (the ``--ledger`` subset) has one placeholder row per
    notebook; side by side with a full ledger it marks each of that notebook's rows "not measured"
    instead of adding rows of its own, and lists no protocol for them."""
    passkey = {"parameters": {"sizes": {"protocol_context": 1024}}, "results": {"protocol_claims": [
        {"protocol": p, "skip": "skip (0, 1)", "keep_ratio": 0.1, "accuracy": 0.4, "lo": 0.26, "hi": 0.55,
         "uncompressed": 1.0, "n": 40, "verdict": "fails"} for p in ("reference", "question-agnostic")]}}
    full = claims.ledger(_own(6, burst_ppl=14.0), {**{k: None for k in claims.SOURCES}, "05": passkey})
    subset = claims.ledger(_own(20, burst_ppl=10.2), {k: None for k in claims.SOURCES})
    assert [r["key"] for r in subset if r["key"].startswith("passkey")] == ["passkey"]
    table = claims.across_models([_record(None, "full", full), _record(None, "paper", subset)])
    rows = [x for x in table.splitlines() if x.startswith("  | Passkey")]
    assert len(rows) == 2 and all("**fails**" in x and "**not measured**: run 05_passkey_retrieval" in x for x in rows)
    positions = [x for x in table.splitlines() if "03_position_order_ppl" in x]
    assert len(positions) == 1 and positions[0].count("**not measured**") == 2   # neither column ran 03
    assert "; —" not in table and not table.rstrip().endswith("—")


def test_passkey_rows_carry_the_recorded_verdicts():
    rec = {"parameters": {"sizes": {"protocol_context": 1024}}, "results": {"protocol_claims": [
        {"protocol": "reference", "skip": "skip (0, 1)", "keep_ratio": 0.1, "accuracy": 0.9, "lo": 0.77, "hi": 0.96,
         "uncompressed": 1.0, "n": 40, "verdict": "holds"},
        {"protocol": "question-agnostic", "skip": "skip (0, 1)", "keep_ratio": 0.1, "accuracy": 0.2, "lo": 0.1,
         "hi": 0.35, "uncompressed": 1.0, "n": 40, "verdict": "fails"}]}}
    rows = claims.passkey_claims(rec)
    assert [r["verdict"] for r in rows] == ["holds", "fails"] and all(r["n"] == 40 for r in rows)
    assert "reference, skip (0, 1), keep_ratio 0.1, 1024 tokens" == rows[0]["protocol"]


@pytest.mark.parametrize("warm_change, verdict", [(0.01, "fails"), (-0.9, "not resolved")])
def test_ttft_claim(warm_change, verdict):
    rec06 = {"results": {"trap": [{}, {}, {}], "summary": {"trap_warm_change_median": warm_change,
                                                          "trap_fake_change_with_load_median": -0.8}}}
    (row,) = [r for r in claims.writeup_claims(None, rec06) if "time to first token" in r["claim"]]
    assert row["verdict"] == verdict and row["n"] == 3


def test_attention_rows_pair_documents():
    """Per-document mean ρ over layers ≥ 2 (raw and position-controlled), bootstrapped; the loss
    area of knorm against sink + random paired by document."""
    spearman, areas = [], []
    for i in range(6):
        doc = f"d{i}"
        for layer in range(4):   # layers 0-1 do not count
            spearman.append({"document": doc, "layer": layer, "spearman": -0.3 if layer >= 2 else 0.9,
                             "spearman_position_controlled": 0.2 + 0.01 * i if layer >= 2 else -0.9})
        areas += [{"document": doc, "policy": "knorm", "area_above_oracle": 0.05},
                  {"document": doc, "policy": "sink_random", "area_above_oracle": 0.2 + 0.01 * i}]
    rows = claims.attention_claims({"results": {"spearman": spearman, "loss_areas": areas}})
    assert [r["verdict"] for r in rows] == ["holds", "fails", "holds"] and all(r["n"] == 6 for r in rows)
    assert "-0.300" in rows[0]["measured"]
    assert claims.negative(_boot([-0.3, -0.2, -0.25, -0.3, -0.2])) == "holds"


def test_02_headline_and_findings_state_the_ledger_verdict():
    """README's 02 line, 02's findings and the ledger judge "low norm, high attention" by one rule
    (per-document means bootstrapped over documents), so they cannot disagree."""
    from knorm_study import attention

    rec = json.loads((ROOT / "data" / "results" / "02_attention_correlation" / "full.json").read_text())
    verdict = claims.attention_claims(rec)[0]["verdict"]
    phrase = {"holds": "negative, as the paper says", "fails": "positive, against the paper",
              "not resolved": "not resolved"}[verdict]
    assert phrase in attention.headline(rec) and phrase in attention.findings(rec)
    few = {**rec, "results": {**rec["results"], "spearman": [x for x in rec["results"]["spearman"]
                                                             if x["document"] == rec["results"]["spearman"][0]["document"]]}}
    assert claims.attention_claims(few)[0]["verdict"] == "not resolved"
    assert "not resolved" in attention.headline(few)


def _qk_record04(prenorm_shift: float, random_shift: float, n_docs: int = 6):
    rows = []
    for d in range(n_docs):
        for proto in ("prefill", "streaming"):
            for variant, ppl in (("full cache", 10.0), ("knorm", 12.0), ("knorm_prenorm", 12.0 * (1 + prenorm_shift)),
                                 ("random", 12.0 * (1 + random_shift))):
                rows.append({"protocol": proto, "document": f"d{d}", "variant": variant,
                             "keep_ratio": 1.0 if variant == "full cache" else 0.5, "ppl": ppl * (1 + 0.01 * d)
                             + 0.001 * d * d})
    return {"parameters": {"skip_layers": [0, 1], "policies": ["knorm", "knorm_prenorm", "random"]},
            "results": {"rows": rows}}


def test_the_prenorm_claim_needs_knorm_and_random_both_beaten():
    """"keeps the signal the normalised key lost": holds when knorm_prenorm beats knorm and random
    (paired by document), fails when either beats it, is not resolved otherwise; a model without
    QK-norm (no knorm_prenorm rows) gets "not measured"."""
    verdicts = lambda rec: [r["verdict"] for r in claims.qk_norm_claims(None, rec, 0.5) if r["key"].startswith("qk_norm.prenorm.")]
    assert verdicts(_qk_record04(-0.1, 0.2)) == ["holds", "holds"]
    assert verdicts(_qk_record04(+0.1, 0.2)) == ["fails", "fails"]            # knorm better
    assert verdicts(_qk_record04(-0.1, -0.2)) == ["fails", "fails"]           # random better
    assert verdicts(_qk_record04(-0.1, 0.2, n_docs=2)) == ["not resolved", "not resolved"]
    plain = _qk_record04(-0.1, 0.2)
    plain["results"]["rows"] = [x for x in plain["results"]["rows"] if x["variant"] != "knorm_prenorm"]
    assert verdicts(plain) == ["not measured", "not measured"]


def test_the_verdict_matrix_is_the_ledgers_verdicts_aligned_by_row():
    """One row per claim key across the records (a placeholder fills the rows it stands for), one
    column per record, each cell that record's verdict ("not measured" where it has no such row);
    the figure has a labelled tick per row and column."""
    passkey = {"parameters": {"sizes": {"protocol_context": 1024}}, "results": {"protocol_claims": [
        {"protocol": "reference", "skip": "skip (0, 1)", "keep_ratio": 0.1, "accuracy": 0.4, "lo": 0.26, "hi": 0.55,
         "uncompressed": 1.0, "n": 40, "verdict": "fails"}]}}
    full = claims.ledger(_own(6, burst_ppl=14.0), {**{k: None for k in claims.SOURCES}, "05": passkey})
    other = [dict(r, verdict="holds") if r["key"] == "lm.bursts" else r for r in
             claims.ledger(_own(6, burst_ppl=10.2), {k: None for k in claims.SOURCES}) if r["key"] != "lm.per_token_vs_bursts"]
    names, columns, grid = claims.verdict_matrix([_record(None, "full", full), _record("big", "paper", other)])
    assert columns == ["SmolLM2-135M-Instruct · full", "org/big · paper"]
    row = dict(zip(names, grid))
    assert row[claims.SHORT_CLAIMS["lm.bursts"]] == ["fails", "holds"]
    assert row[claims.SHORT_CLAIMS["lm.per_token_vs_bursts"]] == ["holds", "not measured"]
    assert row["passkey survives 90 %: reference, skip (0, 1)"] == ["fails", "not measured"]
    assert len(names) == len(set(names)) == len(grid)
    fig = claims.plot_verdict_matrix([_record(None, "full", full), _record("big", "paper", other)])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names and len(ax.get_xticklabels()) == 2
    assert sorted(t.get_text() for t in ax.texts) == sorted(v for r in grid for v in r)
