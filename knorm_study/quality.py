"""Quality trade-offs (04_quality_tradeoffs, 05): how far keep_ratio can go, and generation agreement.

04's steps: ``variants`` (one line per policy in every table and figure), ``prefill_sweep`` (one
prefill per document, every configuration) timed against re-prefilling by ``reprefill_speed``,
``streaming_rows`` (``run_streaming``), ``curves`` (each configuration against its own document's full cache),
``aggregates`` and ``thresholds``. ``findings`` / ``headline`` turn a recorded result into the prose
of the notebook and of REPORT.md / README.md; ``streaming_findings`` / ``streaming_headline`` do
the same for scripts/streaming_numbers.py's streaming-protocol results.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import knorm_lib as kl
from knorm_study import intervals

METRICS: tuple[str, ...] = ("ppl", "next_token_acc", "kl", "top1_agree")
PROTOCOLS: tuple[str, ...] = ("prefill", "streaming")
TOLERANCES: tuple[float, ...] = (0.01, 0.05)   # the PPL increases the thresholds are measured at

Variant = tuple[str, str, tuple[int, ...]]   # (label, policy, skip_layers)


def keep_ratio_thresholds(rows: Sequence[dict[str, Any]], by: Sequence[str], tolerances: Sequence[float] = (0.01, 0.05),
                          metric: str = "ppl") -> Any:
    """Per ``by`` group: the smallest keep_ratio whose ``metric`` stays within each tolerance of the
    full cache (keep_ratio 1.0), where "within" means the mean over documents of
    ``metric / metric at 1.0`` is at most ``1 + tolerance`` at that keep_ratio *and at every larger
    one measured* (so a lucky dip below the line does not count). ``None`` where even the largest
    compressed keep_ratio fails. Rows need ``document``, ``keep_ratio`` and ``metric``; each group
    needs its own keep_ratio 1.0 rows."""
    import pandas as pd

    df = pd.DataFrame(rows)
    missing = {"document", "keep_ratio", metric, *by} - set(df.columns)
    if missing:
        raise ValueError(f"rows: missing column(s) {sorted(missing)}")
    for tol in tolerances:
        kl._require(isinstance(tol, numbers.Real) and tol >= 0, "tolerances", tolerances, "non-negative numbers")
    out = []
    for key, group in df.groupby(list(by), sort=False):
        full = group[group.keep_ratio == 1.0].set_index("document")[metric]
        if full.empty:
            raise ValueError(f"rows: group {key} has no keep_ratio 1.0 rows to compare with")
        rel = (group.assign(rel=group[metric] / group.document.map(full))
               .groupby("keep_ratio").rel.mean().sort_index(ascending=False))
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for tol in tolerances:
            smallest = None
            for keep_ratio, ratio in rel.items():
                if ratio > 1 + tol:
                    break
                smallest = keep_ratio
            row[f"within_{tol:g}"] = None if smallest == 1.0 else smallest
        out.append(row)
    return pd.DataFrame(out)


def generation_agreement(generated: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Matching-prefix length and per-position token agreement of two greedy generations."""
    n = min(len(generated), len(reference))
    same = (generated[:n] == reference[:n])
    mismatch = (~same).nonzero()
    prefix = int(mismatch[0]) if len(mismatch) else n
    return {"matching_prefix": prefix, "token_agreement": same.float().mean().item() if n else float("nan")}


def check_keep_ratios(keep_ratios: Sequence[float]) -> None:
    """04's keep_ratios must include 1.0: the full cache every ratio and threshold is measured against."""
    kl._require(1.0 in keep_ratios, "keep_ratios", keep_ratios,
                "a list that includes 1.0 (the full cache every threshold is measured against)")


CHOICE_LABELS = {"all": "every layer type", "global": "global layers"}   # a layer choice's label suffix


def variants(policies: Sequence[str], skip_layers: Sequence[int], knorm_all_layers: bool, model: Any = None,
             compress_layers: Sequence[str] = ("all",), layer_choice_policies: Sequence[str] = ()) -> list[Variant]:
    """``(label, policy, skip_layers)`` per policy, all leaving ``skip_layers`` uncompressed, and
    second, if ``knorm_all_layers``, "knorm (all layers)" compressing every layer.

    With ``model``: only the policies it can tell apart (``kl.applicable_policies``), and on a model
    with sliding windows the layer choices (``kl.layers_to_skip``'s ``compress``): every variant
    compresses what ``compress_layers[0]`` names; each of ``layer_choice_policies`` also runs under
    the other choices, labelled by ``CHOICE_LABELS`` ("knorm (global layers)"). Without windows every choice is the
    same layers, so only the first runs."""
    for choice in compress_layers:
        kl._check_choice("compress_layers", choice, kl.LAYER_SCOPES)
    if model is not None:
        policies = kl.applicable_policies(model, policies)
    first = kl.layers_to_skip(model, skip_layers, compress_layers[0]) if model is not None else tuple(skip_layers)
    out = [(p, p, tuple(first)) for p in policies]
    if knorm_all_layers:
        out.insert(1, ("knorm (all layers)", "knorm", ()))
    if model is not None and kl.sliding_layers(model):
        out += [(f"{p} ({CHOICE_LABELS[choice]})", p, kl.layers_to_skip(model, skip_layers, choice))
                for choice in compress_layers[1:] for p in policies if p in layer_choice_policies]
    return out


def variant_order(*groups: Sequence[Variant]) -> list[str]:
    """Every label once, in order of first appearance: the legend and table order."""
    return list(dict.fromkeys(label for group in groups for label, _, _ in group))


@dataclass
class PrefillSweep:
    """The prefill protocol's sweeps: one row per document and configuration, and what the
    re-prefill timing needs (the configurations, the last document's results and sweep time)."""
    rows: Any                          # pandas DataFrame
    seconds: list[float]               # one sweep time per document
    configs: list[kl.EvalConfig]       # the full cache first, then every variant × keep_ratio < 1
    last_results: list[kl.EvalResult]  # the last document's results, in ``configs`` order


def prefill_sweep(model: Any, docs: Sequence[tuple[str, kl.TokenizedDoc]], context_len: int,
                  variant_list: Sequence[Variant], keep_ratios: Sequence[float],
                  skip_layers: Sequence[int]) -> PrefillSweep:
    """One ``kl.sweep`` per ``(corpus, document)``: the full cache (knorm at 1.0 with
    ``skip_layers``), then every variant at every keep_ratio below 1; each sweep timed."""
    import pandas as pd

    compressed = [r for r in keep_ratios if r < 1.0]
    configs = [kl.EvalConfig(1.0, "knorm", tuple(skip_layers))]
    configs += [kl.EvalConfig(r, policy, s) for _, policy, s in variant_list for r in compressed]
    labels = ["full cache"] + [label for label, _, _ in variant_list for _ in compressed]
    rows, seconds, results = [], [], []
    for corpus, doc in docs:
        t0 = time.perf_counter()
        results = kl.sweep(model, doc.input_ids, context_len, configs, progress=True)
        seconds.append(time.perf_counter() - t0)
        rows += [{"protocol": "prefill", "corpus": corpus, "document": doc.title, "variant": label, **res.summary()}
                 for label, res in zip(labels, results)]
    return PrefillSweep(pd.DataFrame(rows), seconds, configs, results)


def reprefill_speed(model: Any, doc: kl.TokenizedDoc, context_len: int, continuation_len: int,
                    sweep: PrefillSweep, n_timed: int = 8, tolerance: float = 1e-4) -> dict[str, Any]:
    """On ``doc`` (the sweep's last document), the full cache and ``n_timed`` compressed
    configurations spread evenly over the sweep's, timed back to back in this warm process: one
    ``kl.sweep`` (one prefill), then a re-prefill per configuration. Both must reproduce the sweep's
    metrics within ``tolerance`` (else ``AssertionError``). Forward-token ceiling: ``(n + 1)(C + T)``
    re-prefilled against ``C + (n + 1) T`` shared."""
    C, T = context_len, continuation_len
    compressed = list(zip(sweep.configs[1:], sweep.last_results[1:]))
    timed = [compressed[round(i * (len(compressed) - 1) / max(n_timed - 1, 1))]
             for i in range(min(n_timed, len(compressed)))]
    configs, expected = [c for c, _ in timed], [r for _, r in timed]
    t0 = time.perf_counter()
    shared = kl.sweep(model, doc.input_ids, C, [sweep.configs[0], *configs])[1:]
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference_logits = kl.continuation_logits(model, kl.prefill(model, doc.input_ids[:, :C]).cache,
                                              doc.input_ids[:, C:-1])
    separate = [kl.sweep(model, doc.input_ids, C, [cfg], reference_logits=reference_logits)[0] for cfg in configs]
    separate_s = time.perf_counter() - t0
    pairs = [*zip(expected, shared), *zip(expected, separate)]
    max_nll_diff = max(float((a.nll - b.nll).abs().max()) for a, b in pairs)
    max_kl_diff = max(float((a.kl - b.kl).abs().max()) for a, b in pairs)
    n_cfg = len(configs)
    tokens_separate, tokens_shared = (n_cfg + 1) * (C + T), C + (n_cfg + 1) * T
    if max_nll_diff > tolerance or max_kl_diff > tolerance:
        raise AssertionError(f"sweep and re-prefill disagree: NLL {max_nll_diff:.2e}, KL {max_kl_diff:.2e}")
    return {"n_configs": n_cfg, "document": doc.title, "sweep_s": sweep_s, "reprefill_s": separate_s,
            "speedup": separate_s / sweep_s, "forward_tokens_sweep": tokens_shared,
            "forward_tokens_reprefill": tokens_separate, "token_ceiling": tokens_separate / tokens_shared,
            "max_abs_nll_diff": max_nll_diff, "max_abs_kl_diff": max_kl_diff}


def streaming_rows(model: Any, docs: Sequence[tuple[str, kl.TokenizedDoc]], variant_list: Sequence[Variant],
                   keep_ratios: Sequence[float], skip_layers: Sequence[int]) -> tuple[Any, list[float]]:
    """The full cache (knorm at 1.0 with ``skip_layers``), then every variant at every keep_ratio
    below 1, per document (``run_streaming``)."""
    compressed = [r for r in keep_ratios if r < 1.0]
    labelled = [("full cache", dict(policy="knorm", keep_ratio=1.0, skip_layers=tuple(skip_layers)))]
    labelled += [(label, dict(policy=p, keep_ratio=r, skip_layers=s)) for label, p, s in variant_list for r in compressed]
    return run_streaming(model, docs, labelled)


def run_streaming(model: Any, docs: Sequence[tuple[str, kl.TokenizedDoc]],
                  labelled: Sequence[tuple[str, dict[str, Any]]]) -> tuple[Any, list[float]]:
    """One ``kl.streaming_sweep`` of the ``(label, streaming_ppl keywords)`` configurations per
    document: a DataFrame with a row per document and configuration (``variant``: its label; with
    ``mean_kept_fraction``), and the seconds per document."""
    import pandas as pd

    rows, seconds = [], []
    for corpus, doc in docs:
        t0 = time.perf_counter()
        results = kl.streaming_sweep(model, doc.input_ids, [cfg for _, cfg in labelled], progress=True)
        seconds.append(time.perf_counter() - t0)
        rows += [{"protocol": "streaming", "corpus": corpus, "document": doc.title, "variant": label, **res.summary()}
                 for (label, _), res in zip(labelled, results)]
    return pd.DataFrame(rows), seconds


# The streaming protocol's schedules. ``streaming_rows`` cuts every compressed layer back after
# each token (the study's schedule); the paper's code (``l2compress``) cuts a layer back in bursts
# once it holds ``prune_after`` entries, and a recent window keeps the newest tokens whatever
# their norm. The schedules keep different amounts at one keep_ratio, so they are compared at
# matched effective kept fraction (``mean_kept_fraction``: tokens a compressed layer holds / tokens
# seen, averaged over steps), never at equal keep_ratio.
def schedule_variants(keep_ratios: Sequence[float], prune_afters: Sequence[int], recent_window: int,
                      skip_layers: Sequence[int]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, streaming_ppl keywords)``: knorm with the reference code's bursts for each
    ``prune_after``, and knorm keeping the ``recent_window`` newest tokens (none if 0), at every
    keep_ratio; all leave ``skip_layers`` uncompressed."""
    skip = tuple(skip_layers)
    out = [(f"knorm burst P={p}", dict(policy="knorm", keep_ratio=r, prune_after=p, skip_layers=skip))
           for p in prune_afters for r in keep_ratios]
    if recent_window:
        out += [(f"knorm + recent {recent_window}", dict(policy="knorm", keep_ratio=r, recent_window=recent_window,
                                                         skip_layers=skip)) for r in keep_ratios]
    return out


MATCHED_VARIANTS = ("knorm", "streaming", "h2o")   # per-token rows shown beside the schedules


def schedule_curves(stream_rows: Any, schedule_rows: Any, variants: Sequence[str]) -> tuple[list[dict], Any]:
    """The per-token streaming rows of ``variants`` (and the full cache) with the schedule rows, as
    records for ``matched_memory``; and per line and keep_ratio, the kept fraction and the geometric
    mean, min and max over documents of PPL / the document's full-cache PPL (for the figure)."""
    import pandas as pd

    per_token = stream_rows[(stream_rows.protocol == "streaming")
                            & stream_rows.variant.isin([*variants, "full cache"])]
    rows = pd.concat([per_token, schedule_rows], ignore_index=True)
    full = rows[rows.variant == "full cache"].set_index("document").ppl
    rows = rows.assign(log_ratio=[math.log(p / full[d]) for p, d in zip(rows.ppl, rows.document)])
    line = rows[rows.variant != "full cache"].groupby(["variant", "keep_ratio"], sort=False).agg(
        kept_fraction=("mean_kept_fraction", "mean"), log_ratio=("log_ratio", "mean"),
        log_min=("log_ratio", "min"), log_max=("log_ratio", "max"), n_docs=("document", "nunique")).reset_index()
    for col, name in (("log_ratio", "ppl_ratio"), ("log_min", "ppl_ratio_min"), ("log_max", "ppl_ratio_max")):
        line[name] = line.pop(col).map(math.exp)
    return rows.drop(columns="log_ratio").to_dict("records"), line


def matched_memory(rows: Sequence[dict[str, Any]], variants: Sequence[str], fractions: Sequence[float],
                   reference: str = "knorm") -> list[dict[str, Any]]:
    """Each variant at each effective kept fraction ``f`` in ``fractions``: per document, the log
    of PPL / the document's full-cache PPL, interpolated linearly in the kept fraction between the
    variant's two measured points around ``f`` (outside its measured range: ``n`` 0, not
    measured); the geometric mean over documents as a PPL ratio, and the paired per-document
    difference to ``reference`` in log PPL with its bootstrap interval (positive: the variant is worse)."""
    import numpy as np

    full = {x["document"]: x["ppl"] for x in rows if x["variant"] == "full cache"}
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for x in rows:
        if x["variant"] in variants and x["document"] in full:
            points.setdefault((x["variant"], x["document"]), []).append(
                (x["mean_kept_fraction"], math.log(x["ppl"] / full[x["document"]])))
    at: dict[tuple[str, float], dict[str, float]] = {}
    for (variant, doc), pts in points.items():
        xs, ys = zip(*sorted(pts))
        for f in fractions:
            if xs[0] <= f <= xs[-1]:
                at.setdefault((variant, f), {})[doc] = float(np.interp(f, xs, ys))
    out = []
    for variant in variants:
        for f in fractions:
            by_doc, ref = at.get((variant, f), {}), at.get((reference, f), {})
            row = {"variant": variant, "kept_fraction": f, "n": len(by_doc),
                   "ppl_ratio": math.exp(sum(by_doc.values()) / len(by_doc)) if by_doc else math.nan}
            d = intervals.paired_by_unit(by_doc, ref)
            if variant != reference and d["n"]:
                row.update({f"vs_{reference}_{k}": d[k] for k in ("mean", "lo", "hi", "resolved")})
            out.append(row)
    return out


def matched_memory_markdown(rows: Sequence[dict[str, Any]], reference: str = "knorm") -> str:
    """``matched_memory``'s rows as a Markdown table."""
    lines = [f"| policy / schedule | kept fraction | n docs | PPL / full cache | log PPL − {reference}'s [95 % bootstrap] |",
             "|---|---|---|---|---|"]
    for r in rows:
        diff = ("—" if f"vs_{reference}_mean" not in r else
                f"{r[f'vs_{reference}_mean']:+.3f} [{r[f'vs_{reference}_lo']:+.3f}, {r[f'vs_{reference}_hi']:+.3f}]"
                + ("" if r[f"vs_{reference}_resolved"] else " not resolved"))
        ratio = "outside the measured range" if r["n"] == 0 else f"{r['ppl_ratio']:.3f}"
        lines.append(f"| {r['variant']} | {r['kept_fraction']:g} | {r['n']} | {ratio} | {diff} |")
    return "\n".join(lines)


def curves(frames: Sequence[Any], variants_by_protocol: dict[str, Sequence[Variant]]) -> tuple[Any, Any]:
    """All rows (``frames`` concatenated) with ``ppl_ratio``, each configuration's PPL over its own
    document's full cache (documents differ in difficulty); and the curves: the compressed rows
    plus each protocol's full-cache rows once per variant (keep_ratio 1.0 belongs to every line)."""
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    full_ppl = df[df.variant == "full cache"].set_index(["protocol", "document"]).ppl
    df["ppl_ratio"] = df.ppl / [full_ppl[(p, d)] for p, d in zip(df.protocol, df.document)]
    full_rows = df[df.variant == "full cache"]
    return df, pd.concat([df[df.variant != "full cache"]] + [
        full_rows[full_rows.protocol == proto].assign(variant=label)
        for proto, vs in variants_by_protocol.items() for label, _, _ in vs], ignore_index=True)


def aggregates(curve_rows: Any) -> tuple[Any, Any]:
    """Mean and 95 % interval over documents per protocol × corpus × variant × keep_ratio, and the
    same pooled over corpora."""
    records, metrics = curve_rows.to_dict("records"), [*METRICS, "ppl_ratio"]
    return (intervals.aggregate(records, ["protocol", "corpus", "variant", "keep_ratio"], metrics),
            intervals.aggregate(records, ["protocol", "variant", "keep_ratio"], metrics))


def thresholds(curve_rows: Any, order: Sequence[str]) -> Any:
    """``keep_ratio_thresholds`` per protocol and variant at ``TOLERANCES``, in ``order``."""
    import pandas as pd

    out = keep_ratio_thresholds(curve_rows.to_dict("records"), ["protocol", "variant"], TOLERANCES)
    out["variant"] = pd.Categorical(out.variant, order)
    out = out.sort_values(["protocol", "variant"]).reset_index(drop=True)
    out["variant"] = out.variant.astype(str)
    return out


def _ratio_text(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:g}"


def thresholds_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The thresholds (records of ``thresholds``) as a Markdown table; "—": even the largest
    compressed keep_ratio fails."""
    head = "| protocol | policy | " + " | ".join(("smallest keep_ratio " if i == 0 else "") + f"within {t * 100:g} %"
                                                  for i, t in enumerate(TOLERANCES)) + " |"
    lines = [head, "|---|---|" + "---|" * len(TOLERANCES)]
    lines += [f"| {r['protocol']} | {r['variant']} | " + " | ".join(_ratio_text(r[f"within_{t:g}"]) for t in TOLERANCES)
              + " |" for r in rows]
    return "\n".join(lines)


def _mid_keep_ratio(keep_ratios: Sequence[float]) -> float:
    return 0.5 if 0.5 in keep_ratios else sorted(keep_ratios)[len(keep_ratios) // 2]


def _recorded_variants(record: dict[str, Any]) -> dict[str, list[Variant]]:
    """The variants per protocol: as recorded (04 records them: they depend on the model), else
    rebuilt from the parameters (records made before)."""
    if "variants" in record["results"]:
        return {proto: [tuple(v[:2]) + (tuple(v[2]),) for v in vs] for proto, vs in record["results"]["variants"].items()}
    p = record["parameters"]
    return {"prefill": variants(p["policies"], p["skip_layers"], p["knorm_all_layers"]),
            "streaming": variants(p["streaming_policies"], p["skip_layers"], p["knorm_all_layers"])}


def paired_comparisons(rows: Sequence[dict[str, Any]], protocol: str, keep_ratio: float,
                       reference: str = "knorm") -> list[dict[str, Any]]:
    """``reference`` against every other variant of ``protocol`` at ``keep_ratio``, paired by
    document: the difference in log perplexity (mean NLL, nats per scored token; negative means
    ``reference`` is better) with its bootstrap interval over the documents both were run on."""
    log_ppl: dict[str, dict[str, float]] = {}
    for x in rows:
        if x["protocol"] == protocol and x["keep_ratio"] == keep_ratio:
            log_ppl.setdefault(x["variant"], {})[x["document"]] = math.log(x["ppl"])
    ref = log_ppl.get(reference, {})
    out = []
    for variant, by_doc in log_ppl.items():
        d = intervals.paired_by_unit(ref, by_doc)
        if variant != reference and d["n"]:
            out.append({"variant": variant, **d})
    return out


def _comparison_text(comparisons: Sequence[dict[str, Any]], reference: str) -> str:
    few = [c for c in comparisons if c["n"] < intervals.MIN_BOOTSTRAP_UNITS]
    verdict = lambda c: ("" if c in few else " (not resolved)" if not c["resolved"] else
                         f" ({reference} better)" if c["mean"] < 0 else f" ({c['variant']} better)")
    text = "; ".join(f"{c['variant']} {c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]{verdict(c)}" for c in comparisons)
    if few:
        text += (f" — too few documents (n = {min(c['n'] for c in few)}; at least {intervals.MIN_BOOTSTRAP_UNITS} needed)"
                 f" to call {'any of these' if len(few) == len(comparisons) else 'those without a verdict'} resolved")
    return text


def findings(record: dict[str, Any]) -> str:
    """What the numbers say (Markdown), from a recorded result of 04_quality_tradeoffs (the whole
    JSON record): the notebook's last cell and REPORT.md's section both print this."""
    r, p = record["results"], record["parameters"]
    sizes, speed = p["sizes"], r["sweep_speed"]
    by_proto = _recorded_variants(record)
    labels = {proto: [label for label, _, _ in vs] for proto, vs in by_proto.items()}

    def rel(proto: str, label: str, k: float) -> float:
        """Mean over documents of PPL / full-cache PPL, minus 1."""
        x = next((x["ppl_ratio"] for x in r["pooled"]
                  if x["protocol"] == proto and x["variant"] == label and x["keep_ratio"] == k), None)
        return math.nan if x is None else float(x) - 1

    def full_ppl(proto: str) -> str:
        return ", ".join(f"{x['corpus']} {x['ppl']:.2f}" for x in r["aggregate"]
                         if x["protocol"] == proto and x["variant"] == "knorm" and x["keep_ratio"] == 1.0)

    r_mid, r_lo = _mid_keep_ratio(p["keep_ratios"]), min(p["keep_ratios"])
    best = {proto: min((rel(proto, label, r_mid), label) for label in ls) for proto, ls in labels.items()}
    changes = lambda proto, k, fmt: ", ".join(f"{label} {rel(proto, label, k):{fmt}}" for label in labels[proto])
    lines = [f"**Prefill protocol** ({len(r['prefill_documents'])} documents, {sizes['context_len']} + "
             f"{sizes['continuation_len']} tokens): the full cache gives perplexity {full_ppl('prefill')} (mean per "
             f"corpus). Perplexity change at keep_ratio {r_mid} (mean over documents of the ratio to their full cache): "
             f"the lowest mean is {best['prefill'][1]}'s ({best['prefill'][0]:+.1%}); {changes('prefill', r_mid, '+.1%')}.",
             f"**Streaming protocol** ({len(r['stream_documents'])} documents, {sizes['stream_tokens']} tokens): full "
             f"cache {full_ppl('streaming')}; at keep_ratio {r_mid} the lowest mean is {best['streaming'][1]}'s "
             f"({best['streaming'][0]:+.1%}); {changes('streaming', r_mid, '+.1%')}."]
    ranks = {proto: 1 + sorted(rel(proto, label, r_mid) for label in ls).index(rel(proto, "knorm", r_mid))
             for proto, ls in labels.items() if "knorm" in ls}
    if ranks:
        lines.append("By mean, KnormPress ranks " + " and ".join(
            f"{ranks[proto]} of {len(labels[proto])} in the {proto} protocol" for proto in labels if proto in ranks)
            + f" at keep_ratio {r_mid}. Paired by document, KnormPress minus each policy in log perplexity (nats per "
            "scored token, negative: KnormPress better; 95 % bootstrap interval over the documents, "
            + " and ".join(f"n = {len(r[f'{proto}_documents' if proto == 'prefill' else 'stream_documents'])} "
                           f"{proto}" for proto in labels if proto in ranks) + "): "
            + " ".join(f"{proto}: {_comparison_text(paired_comparisons(r['rows'], proto, r_mid), 'knorm')}."
                       for proto in labels if proto in ranks)
            )
    if p["knorm_all_layers"]:
        lines.append("Compressing layers 0 and 1 too costs KnormPress " + "; ".join(
            f"{rel(proto, 'knorm (all layers)', r_mid) - rel(proto, 'knorm', r_mid):+.1%} of perplexity ({proto}, "
            f"keep_ratio {r_mid})" for proto in PROTOCOLS) + ".")
    lines.append(f"At keep_ratio {r_lo}: " + "; ".join(f"{proto}: {changes(proto, r_lo, '+.0%')}" for proto in labels)
                 + ".")
    lines.append(f"**One prefill, many configurations**: the full cache and {speed['n_configs']} compressed "
                 f"configurations of {speed['document']} took {speed['sweep_s']:.1f} s with one prefill and "
                 f"{speed['reprefill_s']:.1f} s re-prefilling each, a **{speed['speedup']:.2f}×** "
                 f"{'speedup' if speed['speedup'] > 1 else 'ratio (no speedup)'} (forward-token ceiling "
                 f"{speed['token_ceiling']:.2f}×), with identical metrics (largest NLL difference "
                 f"{speed['max_abs_nll_diff']:.1e}).")
    if r.get("matched_memory"):
        lines.append(schedules_text(record))
    choices = layer_choice_text(record)
    if choices:
        lines.append(choices)
    return "\n\n".join(lines) + "\n"


def _log_ratios(rows: Sequence[dict[str, Any]], protocol: str, variant: str) -> dict[float, dict[str, float]]:
    """Per keep_ratio and document: log(PPL / that document's full-cache PPL) of ``variant``."""
    out: dict[float, dict[str, float]] = {}
    for x in rows:
        if x["protocol"] == protocol and x["variant"] == variant:
            out.setdefault(x["keep_ratio"], {})[x["document"]] = math.log(x["ppl_ratio"])
    return out


def ppl_ratio_at(rows: Sequence[dict[str, Any]], protocol: str, variant: str, keep_ratio: float) -> dict[str, Any] | None:
    """PPL over the full cache's at ``keep_ratio``: the geometric mean over documents with its
    bootstrap interval (of the mean log ratio), n; None where not run."""
    by_doc = _log_ratios(rows, protocol, variant).get(keep_ratio)
    if not by_doc:
        return None
    b = intervals.paired_bootstrap(list(by_doc.values()))
    return {**b, "ratio": math.exp(b["mean"]), "ratio_lo": math.exp(b["lo"]), "ratio_hi": math.exp(b["hi"])}


def kv_fraction(row: dict[str, Any], full: dict[str, Any]) -> float:
    """KV bytes the next query can read over the full cache's, all layer types (``by_layer_type``,
    a windowed model's rows), else the cache bytes over the full cache's."""
    if "by_layer_type" in row:
        return sum(t["kv_bytes"] for t in row["by_layer_type"].values()) / sum(
            t["kv_bytes"] for t in full["by_layer_type"].values())
    return row["cache_bytes"] / full["cache_bytes"]


def matched_kv_bytes(rows: Sequence[dict[str, Any]], protocol: str, variant: str, reference: str) -> list[dict[str, Any]]:
    """``variant`` against ``reference`` at matched KV bytes: per document and keep_ratio of
    ``variant``, its log PPL ratio minus ``reference``'s interpolated (linearly, between its own two
    measured points around it; the full cache is the point 1.0) at the same fraction of the full
    cache's KV bytes (``kv_fraction``), bootstrapped over documents per keep_ratio (negative:
    ``variant`` loses less at that memory). Only fractions ``reference``'s points span."""
    import numpy as np

    mine = [x for x in rows if x["protocol"] == protocol]
    if not any(x["variant"] == variant for x in mine):
        return []
    full = {x["document"]: x for x in mine if x["variant"] == "full cache"}
    points: dict[str, list[tuple[float, float]]] = {d: [(1.0, 0.0)] for d in full}
    for x in mine:
        if x["variant"] == reference and x["document"] in full:
            points[x["document"]].append((kv_fraction(x, full[x["document"]]), math.log(x["ppl_ratio"])))
    per_ratio: dict[float, tuple[list[float], list[float]]] = {}
    for x in mine:
        if x["variant"] != variant or x["document"] not in full:
            continue
        f = kv_fraction(x, full[x["document"]])
        pts = sorted(points[x["document"]])
        if len(pts) < 2 or not pts[0][0] <= f <= pts[-1][0]:
            continue
        xs, ys = zip(*pts)
        diffs, fracs = per_ratio.setdefault(x["keep_ratio"], ([], []))
        diffs.append(math.log(x["ppl_ratio"]) - float(np.interp(f, xs, ys)))
        fracs.append(f)
    return [{"keep_ratio": k, "kv_fraction": sum(fr) / len(fr), **intervals.paired_bootstrap(d)}
            for k, (d, fr) in sorted(per_ratio.items(), reverse=True)]


def kv_curves(rows: Any) -> Any:
    """Per protocol, variant and keep_ratio: the mean fraction of the full cache's KV bytes the next
    query can read (``kv_fraction``) and the geometric-mean PPL ratio over documents, for plotting
    the layer choices against memory (a DataFrame)."""
    import pandas as pd

    records = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    full = {(x["protocol"], x["document"]): x for x in records if x["variant"] == "full cache"}
    out = [{"protocol": x["protocol"], "variant": x["variant"], "keep_ratio": x["keep_ratio"],
            "kv_fraction": kv_fraction(x, full[(x["protocol"], x["document"])]), "log_ratio": math.log(x["ppl_ratio"])}
           for x in records if x["variant"] != "full cache" and (x["protocol"], x["document"]) in full]
    df = pd.DataFrame(out).groupby(["protocol", "variant", "keep_ratio"], as_index=False)[["kv_fraction", "log_ratio"]].mean()
    df["ppl_ratio"] = df.log_ratio.map(math.exp)
    return df.drop(columns="log_ratio")


def _ratio_cell(b: dict[str, Any] | None) -> str:
    if b is None:
        return "—"
    return (f"{b['ratio']:.3f} [{b['ratio_lo']:.3f}, {b['ratio_hi']:.3f}]" if intervals.enough(b)
            else f"{b['ratio']:.3f} (n = {b['n']})")


def _verdict(b: dict[str, Any], better: str, worse: str) -> str:
    if not intervals.enough(b) or not b["resolved"]:
        return "not resolved"
    return better if b["mean"] < 0 else worse


def has_layer_choices(record: dict[str, Any]) -> bool:
    """04's record compares the layer choices: some variant compresses the global layers only."""
    suffix = f"({CHOICE_LABELS['global']})"
    return any(label.endswith(suffix) for vs in _recorded_variants(record).values() for label, _, _ in vs)


def layer_choice_text(record: dict[str, Any]) -> str:
    """04 on a hybrid or QK-norm model (Markdown; empty elsewhere): the PPL ratio to the full cache
    of knorm, knorm_prenorm, random and high_norm per protocol and layer choice at keep_ratios 0.5
    and the lowest, with intervals; knorm_prenorm against knorm and random, paired by document; and
    global layers only against every layer at matched KV bytes."""
    r = record["results"]
    by_proto = _recorded_variants(record)
    labels = {proto: [label for label, _, _ in vs] for proto, vs in by_proto.items()}
    choice = CHOICE_LABELS["global"]
    has_choice = has_layer_choices(record)
    has_prenorm = any("knorm_prenorm" in ls for ls in labels.values())
    if not (has_choice or has_prenorm):
        return ""
    ratios = sorted({x["keep_ratio"] for x in r["rows"] if x["keep_ratio"] < 1.0}, reverse=True)
    shown = [k for k in (0.5, min(ratios)) if k in ratios] if ratios else []
    policies = [p for p in ("knorm_prenorm", "knorm", "random", "high_norm") if any(p in ls for ls in labels.values())]
    header = ["protocol", "layers compressed", "keep_ratio", *policies]
    lines = ["**PPL over the full cache's** (geometric mean over documents, bootstrap 95 % interval; "
             "\"all\" = every layer outside skip_layers, the paper's rule; \"global\" = full-attention layers only, "
             "kvpress's rule for Gemma 3):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for proto in PROTOCOLS:
        for layers, suffix in (("all", ""), ("global", f" ({choice})")):
            if not any(f"{p}{suffix}" in labels.get(proto, []) for p in policies):
                continue
            for k in shown:
                cells = [_ratio_cell(ppl_ratio_at(r["rows"], proto, f"{p}{suffix}", k)) for p in policies]
                lines.append(f"| {proto} | {layers} | {k:g} | " + " | ".join(cells) + " |")
    out = ["\n".join(lines)]
    if has_prenorm:
        parts = []
        for proto in PROTOCOLS:
            for suffix in ("", f" ({choice})"):
                for k in shown:
                    a = f"knorm_prenorm{suffix}"
                    lr = _log_ratios(r["rows"], proto, a).get(k, {})
                    if not lr:
                        continue
                    vs = {ref: intervals.paired_by_unit(lr, _log_ratios(r["rows"], proto, f"{ref}{suffix}").get(k, {}))
                          for ref in ("knorm", "random")}
                    parts.append(f"{proto}, {'global layers' if suffix else 'all layers'}, keep_ratio {k:g}: " + ", ".join(
                        f"vs {ref} {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] "
                        f"({_verdict(d, 'knorm_prenorm better', f'{ref} better')})" for ref, d in vs.items() if d["n"]))
        out.append("**KnormPress before QK-norm** (`knorm_prenorm`), paired by document, difference in log perplexity "
                   "(negative: knorm_prenorm better; bootstrap 95 % interval): " + "; ".join(parts) + ".")
    if has_choice:
        parts = []
        for proto in PROTOCOLS:
            for p in ("knorm", "knorm_prenorm"):
                for m in matched_kv_bytes(r["rows"], proto, f"{p} ({choice})", p):
                    if m["n"] and m["keep_ratio"] in shown:
                        parts.append(f"{proto}, {p}, global at keep_ratio {m['keep_ratio']:g} (KV bytes {m['kv_fraction']:.2f} "
                                     f"of the full cache's): {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}] "
                                     f"({_verdict(m, 'global only loses less', 'all layers lose less')})")
        out.append("**Global layers only against all layers at matched KV bytes** (KV bytes the next query can read, "
                   "every layer type; log PPL ratio of global-only minus all-layers interpolated at the same bytes, "
                   "paired by document, bootstrap 95 % interval; only where the all-layers points span that memory): "
                   + ("; ".join(parts) if parts else "no matched point: the two choices' memory ranges do not overlap")
                   + ".")
    return "\n\n".join(out)


def layer_choice_headline(record: dict[str, Any], keep_ratio: float = 0.5) -> str:
    """README's lines from 04 on a QK-norm or hybrid model (empty elsewhere): per protocol, the PPL
    ratio to the full cache at ``keep_ratio`` of knorm_prenorm, knorm, random and high_norm (every
    layer outside skip_layers) with intervals and n, knorm_prenorm against knorm paired by document;
    and global layers only against every layer at matched KV bytes (KnormPress)."""
    from knorm_study import runtime

    r, model = record["results"], runtime.model_label(record)
    labels = {label for vs in _recorded_variants(record).values() for label, _, _ in vs}
    lines = []
    if "knorm_prenorm" in labels:
        parts = []
        for proto in PROTOCOLS:
            cells = [f"{p} {_ratio_cell(ppl_ratio_at(r['rows'], proto, p, keep_ratio))}"
                     for p in ("knorm_prenorm", "knorm", "random", "high_norm")]
            by = {v: _log_ratios(r["rows"], proto, v).get(keep_ratio, {}) for v in ("knorm_prenorm", "knorm")}
            d = intervals.paired_by_unit(by["knorm_prenorm"], by["knorm"])
            if not d["n"]:
                continue
            verdict = _verdict(d, "knorm_prenorm better", "knorm better")
            parts.append(f"{proto} ({', '.join(cells)}; knorm_prenorm − knorm in log PPL {d['mean']:+.3f} "
                         f"[{d['lo']:+.3f}, {d['hi']:+.3f}], n = {d['n']}: {verdict})")
        lines.append(f"- **KnormPress scored before QK-norm ({model}, keep_ratio {keep_ratio}), PPL over the "
                     "full cache (geometric mean, 95 % interval):** " + "; ".join(parts) + ".\n")
    if has_layer_choices(record):
        parts = []
        for proto in PROTOCOLS:
            matched = [m for m in matched_kv_bytes(r["rows"], proto, f"knorm ({CHOICE_LABELS['global']})", "knorm") if m["n"]]
            if matched:
                m = matched[-1]
                parts.append(f"{proto}: global only at keep_ratio {m['keep_ratio']:g} ({m['kv_fraction']:.2f} of the full "
                             f"cache's KV bytes) minus every layer at the same bytes, log PPL {m['mean']:+.3f} "
                             f"[{m['lo']:+.3f}, {m['hi']:+.3f}], n = {m['n']}: "
                             f"{_verdict(m, 'global only loses less', 'every layer loses less')}")
        lines.append(f"- **Which layers to compress on a hybrid model ({model}, KnormPress):** "
                     + ("; ".join(parts) if parts else "the two rules' memory ranges do not overlap") + ".\n")
    return "".join(lines)


def baselines_headline(record: dict[str, Any], keep_ratio: float = 0.5) -> str:
    """README's line from another model's 04: does KnormPress beat random and high-norm eviction?
    Per protocol, knorm minus each in log perplexity at ``keep_ratio``, paired by document, with
    the interval, n and the verdict (empty when neither was run beside knorm)."""
    from knorm_study import runtime

    parts = []
    for proto in PROTOCOLS:
        found = {c["variant"]: c for c in paired_comparisons(record["results"]["rows"], proto, keep_ratio)
                 if c["variant"] in ("random", "high_norm")}
        cells = [f"{v} {c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] "
                 f"({_verdict(c, 'knorm better', f'{v} better')}, n = {c['n']})" for v, c in sorted(found.items())]
        if cells:
            parts.append(f"{proto}: " + ", ".join(cells))
    if not parts:
        return ""
    return (f"- **Does KnormPress beat random and high-norm eviction? ({runtime.model_label(record)}, keep_ratio "
            f"{keep_ratio}, every layer outside skip_layers; knorm minus each in log PPL, paired by document, "
            "95 % interval; negative: knorm better):** " + "; ".join(parts) + ".\n")


def _schedule_verdict(row: dict[str, Any]) -> str:
    if "vs_knorm_mean" not in row:
        return ""
    if not row["vs_knorm_resolved"]:
        return " (not resolved)"
    return " (worse than per-token knorm)" if row["vs_knorm_mean"] > 0 else " (better than per-token knorm)"


def schedules_text(record: dict[str, Any]) -> str:
    """The streaming schedules at matched effective kept fraction (Markdown), from 04's record."""
    r, sizes = record["results"], record["parameters"]["sizes"]
    n_docs = len(r["stream_documents"])
    per_fraction = {}
    for x in r["matched_memory"]:
        per_fraction.setdefault(x["kept_fraction"], []).append(x)
    parts = [f"at {f:g}: " + ", ".join(
        f"{x['variant']} {'not measured' if x['n'] == 0 else format(x['ppl_ratio'], '.2f') + '×'}{_schedule_verdict(x)}"
        for x in xs) for f, xs in sorted(per_fraction.items())]
    return (f"**Streaming schedules at matched memory** ({n_docs} documents of {sizes['stream_tokens']} tokens; "
            "effective kept fraction = tokens a compressed layer holds / tokens seen, averaged over steps). "
            "Perplexity over the full cache's (geometric mean over documents), \"knorm\" being the per-token "
            "schedule, \"burst P\" the reference code's (`l2compress`: a layer holding P entries is cut to "
            "ceil(keep_ratio × P)): " + "; ".join(parts) + ". Paired per-document differences in log perplexity "
            f"to per-token knorm with bootstrap intervals are in the table (at least "
            f"{intervals.MIN_BOOTSTRAP_UNITS} documents are needed to call one resolved).")


def headline(record: dict[str, Any]) -> str:
    """README's one-line finding from 04_quality_tradeoffs."""
    r = record["results"]
    speed = r["sweep_speed"]["speedup"]
    within = lambda proto: "; ".join(f"{x['variant']} {_ratio_text(x['within_0.05'])}"
                                     for x in r["thresholds"] if x["protocol"] == proto)
    return (f"- **How far each policy compresses with perplexity within 5 % of the full cache** (smallest keep_ratio): "
            f"prefill protocol: {within('prefill')}. Streaming protocol: {within('streaming')}. "
            + (f"One prefill for every configuration is {speed:.1f}× faster than re-prefilling" if speed > 1 else
               f"One prefill for every configuration is not faster than re-prefilling here ({speed:.2f}×)")
            + ", with identical metrics.\n" + (_schedules_headline(r) if r.get("matched_memory") else ""))


def _schedules_headline(r: dict[str, Any]) -> str:
    """README's line on the streaming schedules, at the matched kept fraction most of them reach."""
    by_fraction: dict[float, list[dict[str, Any]]] = {}
    for x in r["matched_memory"]:
        by_fraction.setdefault(x["kept_fraction"], []).append(x)
    f, rows = max(by_fraction.items(), key=lambda kv: (sum(1 for x in kv[1] if x["n"]), -kv[0]))
    at, missing = [x for x in rows if x["n"]], [x["variant"] for x in rows if not x["n"]]
    resolved = [x for x in at if x.get("vs_knorm_resolved")]
    return (f"- **Streaming schedules at matched memory (effective kept fraction {f:g}, "
            f"{len(r['stream_documents'])} documents):** PPL / full cache " + ", ".join(
                f"{x['variant']} {x['ppl_ratio']:.2f}×" for x in at)
            + (f" ({', '.join(missing)}: not at this fraction)" if missing else "") + ". "
            + (f"Resolved against per-token knorm: {', '.join(x['variant'] + _schedule_verdict(x) for x in resolved)}."
               if resolved else "No difference to per-token knorm is resolved at this number of documents.") + "\n")


def _streaming_table(record: dict[str, Any]) -> tuple[float, list[float], dict[str, dict[float, dict[str, Any]]]]:
    """streaming_numbers.py's rows: the full-cache PPL, the keep_ratios (descending) and the rows
    per policy and keep_ratio."""
    rows = record["results"]["rows"]
    by_policy: dict[str, dict[float, dict[str, Any]]] = {}
    for x in rows[1:]:
        by_policy.setdefault(x["policy"], {})[x["keep_ratio"]] = x
    return rows[0]["ppl"], sorted({x["keep_ratio"] for x in rows[1:]}, reverse=True), by_policy


def streaming_findings(record: dict[str, Any]) -> str:
    """What scripts/streaming_numbers.py's results say (Markdown), for REPORT.md: the best policy
    at each keep_ratio and where KnormPress ranks."""
    full, ratios, by_policy = _streaming_table(record)
    parts = []
    for k in ratios:
        ranked = sorted((x[k]["ppl"], policy) for policy, x in by_policy.items() if k in x)
        knorm = [policy for _, policy in ranked].index("knorm") + 1 if "knorm" in by_policy else None
        parts.append(f"at keep_ratio {k} the lowest PPL is {ranked[0][1]}'s ({ranked[0][0]:.2f}, "
                     f"{ranked[0][0] / full - 1:+.1%} over the full cache)"
                     + (f", KnormPress ranks {knorm} of {len(ranked)}" if knorm else ""))
    return "Streaming perplexity against the full cache's " + f"{full:.2f}: " + "; ".join(parts) + ".\n"


def streaming_headline(record: dict[str, Any]) -> str:
    """README's one-line finding from scripts/streaming_numbers.py."""
    full, ratios, by_policy = _streaming_table(record)
    tokens = record["parameters"]["tokens"]
    fmt = lambda policy: "/".join(f"{by_policy[policy][k]['ppl']:.1f}" for k in ratios if k in by_policy[policy])
    return (f"- **Streaming protocol (cache cut back after every token, {tokens} tokens, full cache {full:.2f}), PPL at "
            f"keep_ratio {'/'.join(str(k) for k in ratios)}:** " + "; ".join(f"{p} {fmt(p)}" for p in by_policy) + ".\n")
