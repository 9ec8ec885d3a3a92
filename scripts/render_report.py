"""Render REPORT.md and README's findings block from data/results (every number read, none typed).

Each notebook with recorded results of the chosen profile gets a section; README.md's block
between ``<!-- findings:start -->`` and ``<!-- findings:end -->`` is replaced by the headline.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from knorm_study import runtime  # noqa: E402

RESULTS = Path(os.environ.get("KNORM_RESULTS_DIR", ROOT / "data" / "results"))
DEFAULT_REPORTS = ROOT / "reports"   # other models' reports, one folder per model slug; README links these
REPORTS = Path(os.environ.get("KNORM_REPORTS_DIR", DEFAULT_REPORTS))


def load(notebook: str, profile: str, slug: str | None = None) -> dict | None:
    """A notebook's recorded results: the embedded model's, or (``slug``) another model's."""
    path = RESULTS / notebook / (slug or "") / f"{profile}.json"
    return json.loads(path.read_text()) if path.exists() else None


def figure_dir(res: dict) -> str:
    """Where the notebook's figures were saved for the report, relative to the project root."""
    slug = res.get("identity", {}).get("model_slug") or ""
    # a GPU record (profile "gpu-<card>") is published with the committed figures, under its model's slug
    profile = "full" if res["profile"].startswith("gpu-") else res["profile"]
    return str((runtime.report_figures_dir(profile) / slug / res["notebook"]).relative_to(ROOT))


def md_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def section_03(res: dict) -> tuple[str, str]:
    from knorm_study import position_order

    r = res["results"]
    sizes = res["parameters"]["sizes"]
    agg = r["aggregate"]
    ratios = sorted({a["keep_ratio"] for a in agg}, reverse=True)
    combos = [(m, o) for m in ("absolute", "cache_relative", "rerotated") for o in ("original", "by_norm")]
    get = lambda kr, m, o, k="ppl": next(a[k] for a in agg if a["keep_ratio"] == kr and a["position_mode"] == m
                                         and a["order"] == o)
    rows = [[kr] + [f"{get(kr, m, o):.2f} ± {get(kr, m, o, 'ppl_ci95'):.2f}" for m, o in combos] for kr in ratios]
    table = md_table(["keep_ratio"] + [f"{m} / {o}" for m, o in combos], rows)
    pol = r["policies"]
    policies = sorted({p["policy"] for p in pol})
    pget = lambda kr, p: next(a["ppl"] for a in pol if a["keep_ratio"] == kr and a["policy"] == p)
    ptable = md_table(["keep_ratio"] + policies, [[kr] + [pget(kr, p) for p in policies] for kr in ratios])
    ref = md_table(["article", "tokens", "full-model PPL"],
                   [[x["document"], x["tokens"], x["ppl"]] for x in r["reference_full_model_ppl"]])
    docs = ", ".join(f"{d['title']} ({d['corpus']})" for d in r["documents"])
    fig_dir = figure_dir(res)
    body = f"""## 03 · Position, order and perplexity

Prefill protocol: context {sizes['context_len']} tokens, continuation {sizes['continuation_len']} scored tokens, knorm
with skip_layers {res['parameters']['skip_layers']}, {len(r['documents'])} documents: {docs}.
Mean continuation perplexity ± 95 % interval over documents:

{table}

Eviction policies with true positions (mean PPL):

{ptable}

Full-model (uncompressed) perplexity of the longest wiki articles, for reference:

{ref}

{position_order.findings(res)}
![order x position mode]({fig_dir}/order_x_position_mode.png)
![policies]({fig_dir}/policies_ppl.png)
![plan C]({fig_dir}/plan_c_accuracy_kl.png)
![streaming]({fig_dir}/streaming_order_x_position_mode.png)
"""
    return body, position_order.headline(res)


def section_00(res: dict) -> tuple[str, str]:
    r = res["results"]
    s = r["summary"]
    body = f"""## 00 · Interactive explorer

Defaults: keep_ratio {s['keep_ratio']}, policy {s['policy']}, skip_layers {s['skip_layers']}, {s['position_mode']}
positions; context {r['context_len']} tokens, {s['n_scored']} scored. PPL {s['ppl']:.3f}, next-token accuracy
{s['next_token_acc']:.3f}, KL {s['kl']:.4f}; greedy continuation matches the full cache for
{r['agreement']['matching_prefix']} tokens. {_explorer_latency(r)}{_browser_latency(res)}
"""
    if not res.get("identity", {}).get("model_slug"):   # the screenshot is of the embedded model's explorer
        body += "\n![explorer](figures/explore.png)\n"
    return body, ""


def _browser_latency(res: dict) -> str:
    """The real-browser test's latencies, committed with its screenshot (embedded model only)."""
    path = RESULTS / "00_explore" / "browser.json"
    if res["identity"].get("model_slug") or not path.exists():
        return ""
    b = json.loads(path.read_text(encoding="utf-8"))
    s, own = b["slider_to_metrics_s"], b.get("own_text")
    return (f"\n\nIn the real browser (Chromium driving JupyterLab, the screenshot's run, {b['recorded_at'][:10]}): "
            f"slider → metrics on screen {s['median']:.3f} s median ({s['min']:.3f}–{s['max']:.3f} s, {s['n']} moves); "
            f"{b['metric_values_seen_during_drag']} different n_kept values shown during one drag; a new setting's "
            f"continuation arrived {b['continuation_arrival_s']:.1f} s after the move, the metrics at once"
            + (f"; a text of one's own ({own['context_tokens']} context tokens, {len(own['runs'])} pastes): from the "
               "click, its first grid point on screen after " + ", ".join(
                   f"{r['click_to_first_point_s']:.2f} s (prefill {r['prefill_s']:.2f} s, "
                   f"+{r['click_to_first_point_s'] - r['prefill_s']:.2f} s)" for r in own["runs"]) if own else "") + ".")


def _explorer_latency(r: dict) -> str:
    """00's two latencies in words: a slider move read from the grid, and a full recompute."""
    full = (f"a full recompute (re-compress, re-score, regenerate) took {min(r['update_seconds']):.2f}–"
            f"{max(r['update_seconds']):.2f} s")
    if not r.get("read_seconds"):
        return f"One slider update ({full.removeprefix('a full recompute ')}) in the headless run."
    from knorm_study.explore import Explorer

    reads = sorted(r["read_seconds"])
    grid = ", ".join(f"{p} {s:.1f} s" for p, s in r.get("grid_seconds_by_policy", {}).items())
    return (f"In the headless run a slider move read from the precomputed grid in {1e3 * reads[len(reads) // 2]:.0f} ms "
            f"(median of {len(reads)}, {1e3 * reads[0]:.0f}–{1e3 * reads[-1]:.0f} ms; redrawn from code for grid points, "
            f"without a browser's drawing), while {full}. Prefill {r.get('prefill_seconds', float('nan')):.2f} s"
            + (f", then the default setting's grid point in {r['first_point_seconds']:.2f} s" if "first_point_seconds" in r else "")
            + "; "
            f"filling the slider's grid of {len(Explorer.GRID)} keep_ratios took {grid or 'not recorded'}.")


def section_01(res: dict) -> tuple[str, str]:
    from knorm_study import norm_distributions

    fig_dir = figure_dir(res)
    body = f"""## 01 · Key-norm anatomy

{norm_distributions.findings(res)}
![violins]({fig_dir}/key_norm_violins.png)
![position]({fig_dir}/norm_vs_position.png)
![kinds]({fig_dir}/norm_by_token_kind.png)
"""
    return body, norm_distributions.headline(res)


def section_02(res: dict) -> tuple[str, str]:
    from knorm_study import attention

    lost = res["results"]["summary"]["fraction_lost"]
    ratios = res["parameters"]["keep_ratios"]
    pols = [*res["parameters"]["policies"], "oracle"]
    table = md_table(["keep_ratio"] + pols, [[r] + [lost.get(f"{p}@{r}", "") for p in pols] for r in ratios])
    fig_dir = figure_dir(res)
    body = f"""## 02 · Norm–attention correlation

Spearman ρ(key norm, causally normalised attention received) per layer and KV head, first token excluded.

{attention.findings(res)}
Fraction of the continuation's attention that falls on evicted context keys (layers ≥ 2):

{table}

![heatmap]({fig_dir}/spearman_heatmap.png)
![lost]({fig_dir}/attention_mass_lost.png)
"""
    return body, attention.headline(res)


def section_streaming(res: dict) -> tuple[str, str]:
    from knorm_study import quality

    r = res["results"]
    rows = r["rows"]
    full = rows[0]["ppl"]
    ratios = sorted({x["keep_ratio"] for x in rows[1:]}, reverse=True)
    pols = list(dict.fromkeys(x["policy"] for x in rows[1:]))
    get = lambda p, k: next(x for x in rows[1:] if x["policy"] == p and x["keep_ratio"] == k)
    table = md_table(["policy (engine)"] + [f"keep {k}" for k in ratios],
                     [[f"{p} ({get(p, ratios[0])['engine']})"] + [get(p, k)["ppl"] for k in ratios] for p in pols])
    body = f"""## Streaming protocol (scripts/streaming_numbers.py)

{r['document']}, first {res['parameters']['tokens']} tokens, skip_layers (0, 1), cache cut back after every token
(budget `n_kept(t+1, keep_ratio)`); full-cache PPL {full:.3f}:

{table}

{quality.streaming_findings(res)}"""
    return body, quality.streaming_headline(res)


def section_04(res: dict) -> tuple[str, str]:
    from knorm_study import quality

    r, p = res["results"], res["parameters"]
    sizes = p["sizes"]
    fig_dir = figure_dir(res)
    pooled = r["pooled"]
    ratios = sorted({x["keep_ratio"] for x in pooled}, reverse=True)
    tables = {}
    for proto in quality.PROTOCOLS:
        sub = [x for x in pooled if x["protocol"] == proto]
        variants = list(dict.fromkeys(x["variant"] for x in sub))
        cell = lambda v, k: next((f"{x['ppl_ratio'] - 1:+.1%}" + (f" ± {x['ppl_ratio_ci95']:.1%}" if x["ppl_ratio_ci95"] is not None else "")
                                  for x in sub if x["variant"] == v and x["keep_ratio"] == k), "")
        tables[proto] = md_table(["policy"] + [f"keep {k}" for k in ratios if k < 1],
                                 [[v] + [cell(v, k) for k in ratios if k < 1] for v in variants])
    docs = lambda key: ", ".join(f"{d['title']} ({d['corpus']})" for d in r[key])
    body = f"""## 04 · Quality against compression

Prefill protocol: {len(r['prefill_documents'])} documents ({docs('prefill_documents')}), context {sizes['context_len']}
tokens, {sizes['continuation_len']} scored tokens. Streaming protocol: {len(r['stream_documents'])} documents
({docs('stream_documents')}), {sizes['stream_tokens']} tokens, one-pass engine (H2O replayed per layer). Every variant
except "knorm (all layers)" leaves layers {p['skip_layers']} uncompressed. Perplexity change against each document's own
full cache, mean over documents of both corpora ± 95 % t-interval:

**Prefill protocol**

{tables['prefill']}

**Streaming protocol**

{tables['streaming']}

Smallest keep_ratio whose perplexity stays within 1 % / 5 % of the full cache (mean per-document ratio; every larger
keep_ratio must pass too; "—": even the largest compressed keep_ratio fails):

{quality.thresholds_markdown(r['thresholds'])}

{quality.findings(res)}
![PPL against keep_ratio]({fig_dir}/ppl_vs_keep_ratio.png)
![KL heat-strip]({fig_dir}/kl_heatstrip.png)
""" + (f"![Layer choices against KV bytes]({fig_dir}/layer_choice_vs_kv_bytes.png)\n" if quality.has_layer_choices(res) else "")
    if r.get("matched_memory"):
        body += f"""
**Streaming schedules at matched memory** (each line interpolated per document at the kept fraction, then paired
with per-token knorm on the same document):

{quality.matched_memory_markdown(r['matched_memory'])}

![Streaming schedules against the effective kept fraction]({fig_dir}/schedules_matched_memory.png)
"""
    return body, quality.headline(res)


def section_06(res: dict) -> tuple[str, str]:
    from knorm_study import speed

    r = res["results"]
    s = r["summary"]
    sizes = res["parameters"]["sizes"]
    H = sizes["headline_len"]
    fig_dir = figure_dir(res)
    kn = [d for d in r["decode"] if d["policy"] == "knorm" and d.get("cache", "in_place") == "in_place"]
    tt = {(x["context"], x["policy"], x["keep_ratio"]): x for x in r["ttft"]}
    ratios = sorted({d["keep_ratio"] for d in kn}, reverse=True)
    rows = []
    for kr in ratios:
        d = next(x for x in kn if x["context"] == H and x["keep_ratio"] == kr)
        t = tt[(H, "knorm", kr)]
        rows.append([kr, f"{t['ttft_median_s']:.3f} ({t['ttft_min_s']:.3f}–{t['ttft_max_s']:.3f})",
                     f"{d['tpot_median_s'] * 1e3:.1f} ({d['tpot_q25_s'] * 1e3:.1f}–{d['tpot_q75_s'] * 1e3:.1f})",
                     f"{d['decode_tokens_per_s']:.1f}", f"{d['kv_bytes'] / 1e6:.1f}", f"{d['decode_peak_increase_MB']:.0f}",
                     f"{d['predicted_tpot_s'] * 1e3:.1f}", f"{d['measured_over_model']:.2f}×"])
    head = md_table(["keep_ratio", "TTFT s (min–max)", "TPOT ms (IQR)", "decode tok/s", "KV MB", "decode memory +MB",
                     "model TPOT ms", "measured/model"], rows)
    lens = sorted({d["context"] for d in kn})
    tpot = md_table(["context"] + [f"keep {kr}" for kr in ratios],
                    [[n] + [f"{next(x for x in kn if x['context'] == n and x['keep_ratio'] == kr)['tpot_median_s'] * 1e3:.1f}"
                            for kr in ratios] for n in lens])
    share = lambda n: max(x["compress_share_of_ttft"] for x in r["ttft"] if x["context"] == n)
    pre = md_table(["context", "prefill s (median)", "compute-bound estimate s", "max compression share of TTFT",
                    "prefill memory +MB"],
                   [[x["context"], f"{x['prefill_median_s']:.3f}", f"{x['predicted_compute_s']:.3f}", f"{share(x['context']):.2%}",
                     f"{x['prefill_peak_increase_MB']:.0f}"] for x in r["prefill"]])
    trap = md_table(["context", "process", "baseline cold s", "keep 0.25 right after s", "fake change", "baseline warm s",
                     "keep 0.25 warm s", "warm change", "fake change, load in the clock"],
                    [[t["context"], t["process"], f"{t['cold_baseline_s']:.3f}", f"{t['compressed_after_cold_s']:.3f}",
                      f"{t['fake_change']:+.1%}", f"{t['warm_baseline_s']:.3f}", f"{t['warm_compressed_s']:.3f}",
                      f"{t['warm_change']:+.1%}", f"{t['fake_change_with_load']:+.1%}"] for t in r["trap"]])
    caches = md_table(["context", "keep_ratio", "TPOT ms, DynamicCache", "TPOT ms, in place", "speed-up",
                       "DynamicCache / its model", "in place / its model", "same tokens"],
                      [[c["context"], c["keep_ratio"], f"{c['tpot_dynamic_s'] * 1e3:.1f}", f"{c['tpot_in_place_s'] * 1e3:.1f}",
                        f"{c['speedup']:.2f}×", f"{c['dynamic_over_gemv_model']:.2f}×", f"{c['in_place_over_gemv_model']:.2f}×",
                        c["same_tokens"]] for c in s.get("cache_comparison", [])])
    timed_alone = all("predicted_attention_s" in d for d in kn)
    models = md_table(["context", "keep_ratio", "TPOT ms (median)", "(weights + KV) / bandwidth ms", "measured ÷ that",
                       "with measured terms ms", "measured ÷ that"]
                      + (["attention alone ms", "its KV GB/s", "with it in place of KV ms", "measured ÷ that"] if timed_alone else []),
                      [[d["context"], d["keep_ratio"], f"{d['tpot_median_s'] * 1e3:.2f}", f"{d['predicted_tpot_s'] * 1e3:.2f}",
                        f"{d['measured_over_model']:.2f}×", f"{d['predicted_gemv_s'] * 1e3:.2f}",
                        f"{d['tpot_median_s'] / d['predicted_gemv_s']:.2f}×"]
                       + ([f"{d['attention_s'] * 1e3:.2f}", f"{d['attention_bytes_per_s'] / 1e9:.1f}",
                           f"{d['predicted_attention_s'] * 1e3:.2f}", f"{d['tpot_median_s'] / d['predicted_attention_s']:.2f}×"]
                          if timed_alone else [])
                       for d in sorted(kn, key=lambda x: (x["context"], -x["keep_ratio"])) if d["keep_ratio"] in (1.0, 0.25)])
    ops = s.get("profile_ops") or []
    time_col = "self_device_s" if ops and "self_device_s" in ops[0] else "self_cpu_s"
    op_table = md_table(["operator", "calls", f"{'device' if time_col == 'self_device_s' else 'CPU'} time ms", "share of wall"],
                        [[f"`{o['op'][:60]}{'…' if len(o['op']) > 60 else ''}`", o["calls"], f"{o[time_col] * 1e3:.2f}", f"{o['share_of_wall']:.1%}"] for o in ops[:6]])
    probes = s["bandwidth_probes"]
    body = f"""## 06 · Speed and memory trade-offs

{s['model_label']}; {r['document']}. TTFT = prefill (+ first token) + compression, {sizes['n_repeats']} timed repeats after a
warm-up (contexts above 4,096 tokens: {sizes['n_long_repeats']}); TPOT = median of {sizes['n_decode_tokens']} timed greedy decode steps
on the compressed cache with true positions. At {H} tokens (knorm, skip_layers {res['parameters']['skip_layers']}):

{head}

TPOT (ms) by context length and keep_ratio:

{tpot}

Prefill and compression overhead (the foundation's bar: compression ≤ 2 % of TTFT at 4,096 tokens):

{pre}

This machine's rates: read {probes['read_bytes_per_s'] / 1e9:.1f} GB/s, copy {probes['copy_bytes_per_s'] / 1e9:.1f} GB/s,
matrix-vector {probes['gemv_bytes_per_s'] / 1e9:.1f} GB/s, matmul {s['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s; weights
{s['weight_bytes'] / 1e6:.0f} MB.

Measured TPOT (knorm, in-place decode cache) against the bandwidth model, (weights + kept KV) read once per token at the
fastest streaming read, and against the model with the measured terms (fixed per-step cost of {s['step_overhead_s'] * 1e3:.1f} ms,
weights at the matrix-vector rate, kept KV at the read bandwidth){", and with the step's attention timed alone in place of the KV term" if timed_alone else ""}:

{models}

Where a decode step's time goes: the top operators of {s.get('profile_context', '')}-token uncompressed decode steps on the
in-place cache ({'time on the card' if time_col == 'self_device_s' else 'CPU time'}):

{op_table}

The decode cache, before (transformers' `DynamicCache`) and after (in place), knorm; "its model" is the model with the
measured terms (fixed step cost, weights at the matrix-vector rate, the kept KV moved once in place, three times on
`DynamicCache`):

{caches}

{speed.findings(res)}
The TTFT trap (fresh process per row; baseline first, then keep_ratio 0.25, then both again warm):

{trap}

![TPOT and the bandwidth model]({fig_dir}/tpot_bandwidth_model.png)
![TTFT, KV bytes, memory]({fig_dir}/ttft_kv_memory.png)
![TTFT trap]({fig_dir}/ttft_trap.png)
"""
    h = s["headline"]
    lo = h["keep_ratio_low"]
    g = lambda key, kr: h[key][str(kr)] if str(kr) in h[key] else h[key][kr]
    ttft_change = g("ttft_s", lo) / g("ttft_s", 1.0) - 1
    ttft_text = "does not shorten TTFT" if abs(ttft_change) <= 0.05 else f"changes TTFT by {ttft_change:+.0%}"
    decode_text = ("it shortens decoding and shrinks the cache" if g("tpot_s", lo) < g("tpot_s", 1.0)
                   else "it shrinks the cache but did not shorten decoding here")
    headline = (f"- **Compression after prefill {ttft_text}; {decode_text}.** "
                f"At {H} tokens on {s['model_label']}: TTFT {g('ttft_s', 1.0):.2f} s → {g('ttft_s', lo):.2f} s at keep_ratio {lo}, "
                f"TPOT {g('tpot_s', 1.0) * 1e3:.0f} → {g('tpot_s', lo) * 1e3:.0f} ms, KV {g('kv_bytes', 1.0) / 1e6:.0f} → "
                f"{g('kv_bytes', lo) / 1e6:.0f} MB. Timing a cold baseline against the compressed run right after it shows a "
                f"{s['trap_fake_change_median']:+.0%} TTFT change ({s['trap_fake_change_with_load_median']:+.0%} with the model load in the baseline's clock); "
                f"warm against warm it is {s['trap_warm_change_median']:+.0%}.\n")
    return body, headline


def section_05(res: dict) -> tuple[str, str]:
    from knorm_study import passkey

    r = res["results"]
    p, sizes, s, sp = res["parameters"], res["parameters"]["sizes"], r["summary"], r["speed"]
    acc = r["accuracy"]
    ratios = sorted({a["keep_ratio"] for a in acc}, reverse=True)
    pols = list(dict.fromkeys(a["policy"] for a in acc))
    get = lambda c, pol, kr: next(a for a in acc if a["context"] == c and a["policy"] == pol and a["keep_ratio"] == kr)
    cell = lambda a: f"{a['accuracy']:.0%} [{a['lo']:.0%}–{a['hi']:.0%}]"
    tables = []
    for c in sizes["contexts"]:
        n = int(get(c, pols[0], 1.0)["n"])
        tables.append(f"Context {c} tokens ({n} samples):\n\n"
                      + md_table(["keep_ratio"] + pols, [[str(kr)] + [cell(get(c, pol, kr)) for pol in pols] for kr in ratios]))
    tables_md = "\n\n".join(tables)
    gen = r["generation_aggregate"]
    gratios = sorted({g["keep_ratio"] for g in gen}, reverse=True)
    gget = lambda pol, kr: next(g for g in gen if g["policy"] == pol and g["keep_ratio"] == kr)
    gtable = md_table(["policy"] + [f"prefix @ {kr}" for kr in gratios] + [f"agreement @ {kr}" for kr in gratios],
                      [[pol] + [f"{gget(pol, kr)['matching_prefix']:.1f}" for kr in gratios]
                       + [f"{gget(pol, kr)['token_agreement']:.0%}" for kr in gratios] for pol in pols])
    full = ", ".join(f"{a:.0%} at {c}" for c, a in s["uncompressed_accuracy_by_context"].items())
    fig_dir = figure_dir(res)
    per_ctx = ", ".join(f"{c} tokens: {n}" for c, n in s["samples_per_context"].items())
    body = f"""## 05 · Passkey retrieval and generation under compression

LongLoRA-style passkey (5-digit key in repeated filler, chat template), compression after prefill and
question-agnostic (the question and answer prefix are fed after compression, true positions); a sample is
retrieved iff greedy decoding reproduces every key digit (one teacher-forced forward). Policies compress the
same layers (skip_layers {p['skip_layers']}). Samples per context (depths × seeds): {per_ctx}.
Accuracy [Wilson 95 % interval]:

{tables_md}

Greedy generation on {sizes['n_gen_prompts']} wiki prompts of {sizes['gen_prompt_tokens']} tokens,
{sizes['gen_new_tokens']} new tokens: mean matching prefix and token agreement with the full cache:

{gtable}

{passkey.findings(res)}

![heatmaps]({fig_dir}/passkey_heatmaps.png)
![accuracy]({fig_dir}/accuracy_vs_keep_ratio.png)
![generation]({fig_dir}/generation_agreement.png)
""" + (f"![both protocols]({fig_dir}/protocols.png)\n" if r.get("protocol_claims") else "")
    r_min = min(ratios)
    testable = [int(c) for c, a in s["uncompressed_accuracy_by_context"].items() if a >= 0.8]
    at_min = "; ".join(f"{c} tokens: " + ", ".join(f"{pol} {get(c, pol, r_min)['accuracy']:.0%}" for pol in pols)
                       for c in testable)
    claims = r.get("protocol_claims") or []
    protocols = ("" if not claims else " Under both protocols at " + f"{sizes['protocol_context']} tokens, knorm at keep_ratio "
                 f"{claims[0]['keep_ratio']} ({claims[0]['n']} samples, Wilson 95 %): " + "; ".join(
                     f"{c['protocol']} {c['skip']} {c['accuracy']:.0%} [{c['lo']:.0%}–{c['hi']:.0%}] vs {c['uncompressed']:.0%} "
                     f"uncompressed, {c['verdict']}" for c in claims) + ".")
    headline = (f"- **Passkey retrieval ({runtime.model_label(res)}, compression after prefill, question-agnostic):** "
                f"uncompressed {full}. The paper's \"keys survive 90 % compression\" {r['summary']['claim_90pct']['verdict']} here"
                + (f" — at keep_ratio {r_min}, {at_min}" if testable else "")
                + "." + protocols
                + f" One prefill for all configurations is {sp['ratio']:.1f}× faster than re-prefilling, same metrics.\n")
    return body, headline


def section_06_gpu() -> str:
    """Notebook 06 run on a GPU (``<results>/06_speed_tradeoffs/<model slug>/gpu-<card>.json``), one
    section per record, rendered like the CPU section."""
    parts = []
    for path in sorted((RESULTS / "06_speed_tradeoffs").glob("*/gpu-*.json")):
        res = json.loads(path.read_text())
        body, _ = section_06(res)
        m = res["machine"]
        title = (f"## 06 on a GPU: {res['results']['summary']['model_label']}\n\nRecorded in "
                 f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` on {m.get('gpu', 'a GPU')}, torch "
                 f"{m['torch']}, transformers {m['transformers']}, {m['cpu_count']} CPU cores.\n")
        parts.append(body.replace("## 06 · Speed and memory trade-offs\n", title, 1))
    return "\n".join(parts)


def section_benchmarks() -> str:
    lines = []
    for path in sorted((RESULTS / "benchmarks").glob("*.json")):
        b = json.loads(path.read_text())
        lines.append(f"- `{path.stem}`: {b['what']} — `{json.dumps(b['numbers'], default=str)[:600]}`")
    return ("## Benchmarks (benchmarks/, last recorded run)\n\n" + "\n".join(lines) + "\n") if lines else ""


def section_kvpress_architectures() -> str:
    """kvpress's KnormPress on Gemma 3 and Qwen 3 (``knorm_study.kvpress_architectures``), if recorded."""
    from knorm_study import kvpress_architectures

    path = RESULTS / "benchmarks" / "kvpress_architectures.json"
    return kvpress_architectures.report_section(json.loads(path.read_text())) if path.exists() else ""


def section_07(res: dict) -> tuple[str, str]:
    from knorm_study import claims

    r, sizes = res["results"], res["parameters"]["sizes"]
    n_pre = len({x["document"] for x in r["prefill_rows"]})
    n_str = len({x["document"] for x in r["streaming_rows"]})
    lm = (f"prefill protocol on {n_pre} documents ({sizes['context_len']} + {sizes['continuation_len']} tokens), "
          f"streaming protocol on {n_str} documents ({sizes['stream_tokens']} tokens)" if sizes
          else "not measured (04 was not run for this model and profile)")
    body = f"""## 07 · The claims ledger

Each claim measured under the protocol it names; verdicts are computed from the numbers (holds / fails / not
resolved at this n; perplexity claims by a bootstrap over documents, passkey claims by Wilson intervals). The
language-modelling rows are notebook 04's: {lm}.
The others are read from notebooks 02, 03, 05 and 06.

{claims.ledger_markdown(r['ledger'])}
"""
    others = claims.other_ledgers(res, RESULTS)
    if others:
        body += ("\n### The ledger across models and profiles\n\nEach claim once, one column per recorded model and "
                 "profile (verdict, number, n), under the same rules:\n\n"
                 + claims.across_models([res, *others]).replace("\n  ", "\n").lstrip() + "\n")
    return body, claims.headline(res, others)


VERDICT_MATRIX = ROOT / "figures" / "verdict_matrix.png"   # README's top figure


def write_verdict_matrix(res: dict) -> Path:
    """The claims ledger of ``res`` (07, full profile) and of every other model and profile recorded
    under the same rules as one figure (``claims.plot_verdict_matrix``), written atomically to
    ``VERDICT_MATRIX``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from knorm_study import claims

    fig = claims.plot_verdict_matrix([res, *claims.other_ledgers(res, RESULTS)])
    tmp = VERDICT_MATRIX.with_name(VERDICT_MATRIX.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, VERDICT_MATRIX)
    return VERDICT_MATRIX


SECTIONS = {"07_paper_claims": section_07, "00_explore": section_00, "01_norm_distributions": section_01, "02_attention_correlation": section_02,
            "03_position_order_ppl": section_03, "04_quality_tradeoffs": section_04,
            "05_passkey_retrieval": section_05, "06_speed_tradeoffs": section_06, "streaming": section_streaming}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--model", default=None, metavar="SLUG",
                    help="render another model's results (the folder under <results>/<notebook>/) into "
                         "<reports dir>/<slug>/REPORT-<profile>.md; README.md's findings are left alone")
    ap.add_argument("--reports-dir", type=Path, default=REPORTS,
                    help="where other models' reports go (default reports/; README links them only there)")
    args = ap.parse_args(argv)
    bodies, headlines, machine, label = [], [], None, None
    for notebook, render in SECTIONS.items():
        res = load(notebook, args.profile, args.model)
        if res is None:
            continue
        machine = machine or res["machine"]
        label = label or runtime.model_label(res)
        body, headline = render(res)
        bodies.append(body)
        headlines.append(headline)
    for extra in ((section_06_gpu(), section_kvpress_architectures(), section_benchmarks()) if args.model is None else ()):
        if extra:
            bodies.append(extra)
    if not bodies:
        print(f"no results for profile {args.profile!r}" + (f" and model {args.model!r}" if args.model else "")
              + " yet; run `make report` (or the notebooks with that model)")
        return
    m = machine
    base = RESULTS.relative_to(ROOT) if RESULTS.is_relative_to(ROOT) else RESULTS
    where = f"{base}/*/{args.model + '/' if args.model else ''}{args.profile}.json"
    report = (f"# knorm-study report ({label}, {args.profile} profile)\n\nGenerated by `scripts/render_report.py` from "
              f"`{where}`; every number below is read from those files.\n\n"
              f"Machine: {m['platform']}, {m['cpu_count']} CPU cores, torch {m['torch']} ({m['torch_threads']} threads), "
              f"transformers {m['transformers']}, Python {m['python']}{', GPU ' + m['gpu'] if m.get('gpu') else ''}.\n\n"
              + "\n".join(bodies))
    target = (args.reports_dir / args.model / f"REPORT-{args.profile}.md" if args.model else
              ROOT / ("REPORT.md" if args.profile == "full" else f"build/REPORT-{args.profile}.md"))
    if target.parent.resolve() != ROOT:   # the figures' links are from the project's root: from the report's folder
        up = os.path.relpath(ROOT, target.parent)
        report = re.sub(r"(!\[[^\]]*\]\()(?![a-z]+:|/)", lambda m: f"{m.group(1)}{up}/", report)
    runtime.write_text_atomic(target, report)
    if args.profile == "full" and args.model is None:
        replace_block("findings", "".join(headlines) + other_models_headlines())
        ledger = load("07_paper_claims", "full")
        if ledger is not None:
            write_verdict_matrix(ledger)
    if args.reports_dir.resolve() == DEFAULT_REPORTS.resolve():
        replace_block("reports", reports_list())
    print(f"rendered {len(bodies)} section(s) for profile {args.profile!r} into "
          f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")


def other_models_headlines() -> str:
    """README's findings from the other embedded models' full-profile records (Gemma 3 270M): 04's
    KnormPress against random and high-norm; what only a QK-norm or hybrid model can show (02's
    link per layer type before and after QK-norm and knorm against random per layer type, 04's
    knorm_prenorm and layer choices); and the lines of 03's (position bug), 05's (passkey) and
    06's (speed) headlines that name the model, since the others would read as the default
    model's. Their whole reports are under reports/<slug>/."""
    import knorm_lib as kl
    from knorm_study import attention, quality

    out = []
    for short in kl.EMBEDDED_MODELS[1:]:
        rec02, rec04 = load("02_attention_correlation", "full", short), load("04_quality_tradeoffs", "full", short)
        out += [attention.qk_norm_headline(rec02) + attention.signal_by_type_headline(rec02) if rec02 else "",
                quality.baselines_headline(rec04) + quality.layer_choice_headline(rec04) if rec04 else ""]
        for notebook in ("03_position_order_ppl", "05_passkey_retrieval", "06_speed_tradeoffs"):
            rec = load(notebook, "full", short)
            lines = SECTIONS[notebook](rec)[1].splitlines(keepends=True) if rec else []
            out += [line for line in lines if runtime.model_label(rec) in line]
    return "".join(out)


def reports_list() -> str:
    """README's list of the other models' reports under reports/, a line each."""
    lines = []
    for path in sorted(DEFAULT_REPORTS.glob("*/REPORT-*.md")):
        title = path.read_text(encoding="utf-8").splitlines()[0].removeprefix("# knorm-study report ")
        lines.append(f"- [{path.parent.name}, {path.stem.removeprefix('REPORT-')} profile]"
                     f"({path.relative_to(ROOT)}): {title}\n")
    return "".join(lines) or "- none yet: `make report MODEL=<hub id or local path>` adds one\n"


def replace_block(name: str, content: str) -> None:
    """Replace README.md's text between ``<!-- <name>:start -->`` and ``<!-- <name>:end -->``."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"<!-- {name}:start -->\n{content}<!-- {name}:end -->"
    new, n = re.subn(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", lambda _: block, text, flags=re.S)
    if n and new != text:
        runtime.write_text_atomic(readme, new)


if __name__ == "__main__":
    main()
