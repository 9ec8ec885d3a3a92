"""Why KnormPress works (02_attention_correlation): low key norm <-> high attention received.

Two measurements, both read from the attention probabilities of one full forward: the attention
each key receives (``attention_received``, correlated with its norm in ``spearman_table``) and
the attention the continuation pays to context keys a policy would evict (``attention_mass_lost``,
``attention_lost``). ``summarize`` collects the recorded summary; ``findings`` / ``headline`` turn
a recorded result into the prose of the notebook and of REPORT.md / README.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

import knorm_lib as kl
from knorm_study.norm_distributions import key_norms


@kl.register_policy("sink_random")
def sink_random_score(kv: kl.LayerKV, opts: kl.PolicyOptions) -> torch.Tensor:
    """A control for the attention sink: the first ``n_sink`` tokens kept, the rest at random
    (seeded, as ``random``). Against knorm it separates the norm signal from keeping the sink."""
    scores = kl.random_score(kv, opts)
    return torch.where(kv.positions < opts.n_sink, torch.full_like(scores, 2.0), scores)


def check_sizes(sizes: dict[str, Any]) -> None:
    """The notebook's sizes against each other, before any heavy work: ``context_len`` leaves at
    least two of the ``n_tokens`` to score."""
    kl._check_context_len(sizes["context_len"], sizes["n_tokens"])


def _per_kv_head_attention(model: Any, ids: torch.Tensor,
                           reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One forward over ``ids`` (no cache); per layer, ``reduce(probabilities (B, H_q, q, k))``
    averaged over the query heads of each KV head: float32 ``(layers, H_kv, ...)``."""
    n_kv = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // n_kv
    per_layer: dict[int, torch.Tensor] = {}

    def record(layer_idx: int, probs: torch.Tensor) -> None:
        per_layer[layer_idx] = kl._per_kv_head(reduce(probs), n_kv)[0].float() / groups

    with kl.recording_attention(record):
        model(input_ids=ids, use_cache=False)
    return torch.stack([per_layer[i] for i in sorted(per_layer)])


@torch.inference_mode()
def attention_received(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives, float32, ``(layers, H_kv, positions)``.

    Causal normalisation: key ``j`` is visible to the ``n - j`` queries ``j..n-1`` only, so a plain
    sum favours early keys merely because more queries see them; the sum is divided by ``n - j``
    (the mean over the queries that can see the key). Query heads sharing a KV head are averaged."""
    ids = kl._check_ids(input_ids).to(model.device)
    seen_by = torch.arange(ids.shape[1], 0, -1, device=ids.device, dtype=torch.float32)
    return _per_kv_head_attention(model, ids, lambda probs: probs.sum(2)) / seen_by


@torch.inference_mode()
def future_attention(model: Any, input_ids: torch.Tensor, context_len: int) -> tuple[torch.Tensor, kl.KVCache]:
    """Mean attention that the continuation's queries (positions ``context_len..n-1``) pay to each
    context key, ``(layers, H_kv, context_len)`` float32 (query heads of a group averaged), and the
    context's cache (the keys a policy would score after prefilling the context)."""
    future, pre = _future_attention(model, input_ids, context_len)
    return future, pre.cache


@torch.inference_mode()
def _future_attention(model: Any, input_ids: torch.Tensor, context_len: int,
                      capture_hidden: bool = False) -> tuple[torch.Tensor, kl.Prefill]:
    """``future_attention`` with the context's whole prefill (with ``capture_hidden``, each layer's
    inputs, for the policies that score them)."""
    ids = kl._check_ids(input_ids).to(model.device)
    kl._check_context_len(context_len, ids.shape[1])
    future = _per_kv_head_attention(model, ids, lambda probs: probs[:, :, context_len:, :context_len].mean(2))
    return future, kl.prefill(model, ids[:, :context_len], capture_hidden=capture_hidden)


def attention_mass_lost(model: Any, input_ids: torch.Tensor, context_len: int, keep_ratios: Sequence[float],
                        policies: Sequence[str] = ("knorm", "random", "high_norm"),
                        options: kl.PolicyOptions = kl.PolicyOptions()) -> list[dict[str, Any]]:
    """Fraction of the continuation queries' attention that falls on context keys a policy evicts,
    per layer, KV head, policy and keep_ratio. ``"oracle"`` evicts the least-attended keys (by the
    same future attention): the smallest loss any policy evicting that many keys can reach."""
    future, pre = _future_attention(model, input_ids, context_len, any(kl.needs_layer_inputs(p) for p in policies))
    rows = []
    for policy in [*policies, "oracle"]:
        scores = ([f[None] for f in future] if policy == "oracle"
                  else kl.policy_scores(pre.cache, policy, options, layer_inputs=pre.layer_inputs))
        for keep_ratio in keep_ratios:
            n_kept = kl.n_kept_for(context_len, keep_ratio)
            for layer, (layer_scores, attn) in enumerate(zip(scores, future)):
                positions = torch.arange(attn.shape[-1], device=attn.device).expand_as(attn)
                kept = torch.zeros_like(attn, dtype=torch.bool).scatter_(
                    -1, kl.keep_indices(layer_scores[0], positions, n_kept), True)
                lost = (attn * ~kept).sum(-1)
                for head in range(attn.shape[0]):
                    rows.append({"policy": policy, "keep_ratio": keep_ratio, "layer": layer, "kv_head": head,
                                 "mass_lost": lost[head].item(), "mass_on_context": attn[head].sum().item()})
    return rows


def _partial_spearman(x: Any, y: Any) -> float:
    """Spearman ρ of ``x`` and ``y`` with their (rank) dependence on position removed:
    ``(r_xy - r_xp r_yp) / sqrt((1 - r_xp²)(1 - r_yp²))``, ``p`` the positions in order."""
    import numpy as np
    from scipy import stats

    r = stats.spearmanr(np.stack([x, y, np.arange(len(x))]), axis=1).statistic
    r_xy, r_xp, r_yp = r[0, 1], r[0, 2], r[1, 2]
    return float((r_xy - r_xp * r_yp) / math.sqrt((1 - r_xp ** 2) * (1 - r_yp ** 2)))


def spearman_table(model: Any, docs: Sequence[tuple[str, kl.TokenizedDoc]]) -> Any:
    """Per ``(corpus, document)``, layer and KV head: Spearman ρ between key norm and (causally
    normalised) attention received, first token excluded (``spearman``) and included
    (``spearman_with_sink``); the same with position partialled out (``spearman_position_controlled``:
    both norm and attention can drift with position, which alone would correlate them); the first
    token's attention, and the fraction of keys with a lower norm than it. The last 10 % of
    positions are dropped: few queries see them to average over. On a model with QK-norm the same
    two correlations of the key *before* its normalisation (``k_proj``'s output, the norm
    ``knorm_prenorm`` scores): ``spearman_prenorm`` and ``spearman_prenorm_position_controlled``."""
    import pandas as pd
    from scipy import stats

    prenorm = kl.has_qk_norm(model)
    rows = []
    for corpus, doc in docs:
        pre = kl.prefill(model, doc.input_ids, capture_hidden=prenorm)
        norms = key_norms(pre.cache).cpu()  # (layers, H_kv, n)
        before = (-torch.stack([s[0].float() for s in kl.policy_scores(pre.cache, "knorm_prenorm",
                                                                      layer_inputs=pre.layer_inputs)]).cpu()
                  if prenorm else None)
        del pre
        received = attention_received(model, doc.input_ids).cpu()  # (layers, H_kv, n), causal mean
        stop = int(0.9 * norms.shape[-1])
        for layer in range(norms.shape[0]):
            for head in range(norms.shape[1]):
                k, a = norms[layer, head, :stop], received[layer, head, :stop]
                row = {"corpus": corpus, "document": doc.title, "layer": layer, "kv_head": head,
                       "spearman": stats.spearmanr(k[1:].numpy(), a[1:].numpy()).statistic,
                       "spearman_position_controlled": _partial_spearman(k[1:].numpy(), a[1:].numpy()),
                       "spearman_with_sink": stats.spearmanr(k, a).statistic,
                       "sink_attention": float(a[0]),
                       "sink_norm_rank": float((k < k[0]).float().mean())}
                if before is not None:
                    b = before[layer, head, :stop]
                    row["spearman_prenorm"] = stats.spearmanr(b[1:].numpy(), a[1:].numpy()).statistic
                    row["spearman_prenorm_position_controlled"] = _partial_spearman(b[1:].numpy(), a[1:].numpy())
                rows.append(row)
    return pd.DataFrame(rows)


def attention_lost(model: Any, docs: Sequence[tuple[str, kl.TokenizedDoc]], context_len: int,
                   keep_ratios: Sequence[float], policies: Sequence[str]) -> tuple[Any, Any]:
    """``attention_mass_lost`` for every document, as a DataFrame with ``fraction_lost`` (of the
    attention on the context), and the curve the notebook records: per policy and keep_ratio, the
    mean over layers ≥ 2 and heads, then mean and 95 % interval over documents."""
    import pandas as pd

    from knorm_study import intervals

    lost = pd.DataFrame([{"corpus": corpus, "document": doc.title, **r} for corpus, doc in docs
                         for r in attention_mass_lost(model, doc.input_ids, context_len, keep_ratios, policies)])
    lost["fraction_lost"] = lost.mass_lost / lost.mass_on_context
    per_doc = lost[lost.layer >= 2].groupby(["policy", "keep_ratio", "document"]).fraction_lost.mean().reset_index()
    return lost, intervals.aggregate(per_doc.to_dict("records"), ["policy", "keep_ratio"], ["fraction_lost"])


def layer_types(model: Any) -> list[str]:
    """Each layer's attention type, in order: ``sliding_attention`` (a local, sliding-window layer)
    or ``full_attention`` (global); what the notebook records once (``layer_types``) for the
    per-type summaries."""
    return [kl._layer_type(model, i) for i in range(kl._n_layers(model))]


def loss_areas(lost: Any, layers: Sequence[int] | None = None) -> Any:
    """ALR-style attention loss (the paper's ``compare_norm_and_attention`` compares the attention
    dropped in norm order with the attention dropped in attention order): per document and policy,
    the area between the policy's and the oracle's curve of attention lost (layers ≥ 2, mean over
    heads) against the evicted fraction 1 - keep_ratio, trapezoids over the measured keep_ratios.
    0 means the policy evicts as well as the oracle could; rows as a DataFrame. ``layers``: only
    those (of layers ≥ 2; ``loss_areas_by_type``)."""
    import numpy as np
    import pandas as pd

    chosen = (lost.layer >= 2) & (lost.layer.isin(list(layers)) if layers is not None else True)
    per_doc = lost[chosen].groupby(["document", "policy", "keep_ratio"]).fraction_lost.mean()
    rows = []
    for doc, by_policy in per_doc.groupby(level="document"):
        oracle = by_policy.xs((doc, "oracle")).sort_index()
        evicted = 1 - oracle.index.to_numpy()
        order = np.argsort(evicted)
        for policy in sorted(set(by_policy.index.get_level_values("policy")) - {"oracle"}):
            gap = by_policy.xs((doc, policy)).sort_index().to_numpy() - oracle.to_numpy()
            area = float(np.sum(np.diff(evicted[order]) * (gap[order][1:] + gap[order][:-1]) / 2))
            rows.append({"document": doc, "policy": policy, "area_above_oracle": area})
    return pd.DataFrame(rows)


def loss_areas_by_type(lost: Any, types: Sequence[str]) -> Any:
    """``loss_areas`` within each layer type (layers ≥ 2; ``types``: ``layer_types(model)``), with a
    ``layer_type`` column: on a hybrid model the global and the sliding-window layers apart; on
    others one type, the same numbers as ``loss_areas``."""
    import pandas as pd

    return pd.concat([loss_areas(lost, [i for i, x in enumerate(types) if x == t]).assign(layer_type=t)
                      for t in sorted(set(types))], ignore_index=True)


def summarize(corr: Any, lost_curve: Any, areas: Any) -> dict[str, Any]:
    """The recorded summary: mean ρ per layer, in layers 0-1 and ≥ 2, the share of negative cells
    in layers ≥ 2 (and with position partialled out), the sink's attention, the attention lost per
    ``policy@keep_ratio`` and each policy's mean loss area above the oracle (``loss_areas``)."""
    per_layer = corr.groupby("layer").spearman.mean()
    curve = lost_curve.set_index(["policy", "keep_ratio"]).fraction_lost
    return {
        "spearman_mean_by_layer": per_layer.to_dict(),
        "spearman_mean_layers_0_1": float(per_layer.loc[:1].mean()),
        "spearman_mean_layers_2plus": float(per_layer.loc[2:].mean()),
        "fraction_heads_negative_layers_2plus": float((corr[corr.layer >= 2].spearman < 0).mean()),
        "spearman_position_controlled_mean_layers_2plus": float(corr[corr.layer >= 2].spearman_position_controlled.mean()),
        "loss_area_above_oracle": areas.groupby("policy").area_above_oracle.mean().to_dict(),
        "sink_attention_mean": float(corr.sink_attention.mean()),
        "fraction_lost": {f"{p}@{r}": float(v) for (p, r), v in curve.items()},
    }


def _mid_keep_ratio(keep_ratios: Sequence[float]) -> float:
    return 0.5 if 0.5 in keep_ratios else sorted(keep_ratios)[len(keep_ratios) // 2]


def _document_means(spearman_rows: Sequence[dict[str, Any]], field: str,
                    layers: Callable[[int], bool]) -> dict[str, float]:
    """Per document, the mean of ``field`` over the heads of the layers ``layers`` accepts (NaN
    cells, from a constant row, left out)."""
    per_doc: dict[str, list[float]] = {}
    for x in spearman_rows:
        if layers(x["layer"]) and field in x and x[field] == x[field]:
            per_doc.setdefault(x["document"], []).append(x[field])
    return {doc: sum(v) / len(v) for doc, v in per_doc.items()}


def _of_type(rows: Sequence[dict[str, Any]], layer_type: str | None,
             types: Sequence[str] | None) -> list[dict[str, Any]]:
    """The rows of ``layer_type``'s layers (``types``: per layer, as recorded); all without one."""
    return [r for r in rows if layer_type is None or types is None or types[r["layer"]] == layer_type]


def spearman_by_document(spearman_rows: Sequence[dict[str, Any]], field: str = "spearman",
                         min_layer: int = 2, layer_type: str | None = None,
                         types: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The paper's claim, "low norm, high attention", as the ledger and the findings test it: per
    document, the mean of ``field`` over the heads of layers ``min_layer`` and up (of ``layer_type``
    only, if given, by the per-layer ``types``), bootstrapped over documents (``intervals.paired_bootstrap``;
    ``intervals.negative`` gives the verdict). None without rows."""
    from knorm_study import intervals

    means = _document_means(_of_type(spearman_rows, layer_type, types), field, lambda layer: layer >= min_layer)
    return intervals.paired_bootstrap(list(means.values())) if means else None


def field_difference(spearman_rows: Sequence[dict[str, Any]], field: str, minus: str, layer_type: str | None = None,
                     types: Sequence[str] | None = None, min_layer: int = 2) -> dict[str, Any] | None:
    """Per document, the mean of ``field`` minus the mean of ``minus`` (layers ``min_layer`` and up,
    of ``layer_type`` if given), bootstrapped over documents: e.g. the pre-norm key's ρ minus the
    cached key's (negative: the pre-norm norm tracks attention more closely). None without both."""
    from knorm_study import intervals

    rows = _of_type(spearman_rows, layer_type, types)
    a, b = (_document_means(rows, f, lambda layer: layer >= min_layer) for f in (field, minus))
    return intervals.paired_by_unit(a, b) if set(a) & set(b) else None


def area_difference(area_rows: Sequence[dict[str, Any]], policy: str, minus: str,
                    layer_type: str | None = None) -> dict[str, Any] | None:
    """Per document, ``policy``'s attention-loss area above the oracle minus ``minus``'s (within
    ``layer_type`` where the rows carry one), bootstrapped over documents; None without both."""
    from knorm_study import intervals

    rows = [r for r in area_rows if layer_type is None or r.get("layer_type") == layer_type]
    a, b = ({r["document"]: r["area_above_oracle"] for r in rows if r["policy"] == p} for p in (policy, minus))
    return intervals.paired_by_unit(a, b) if set(a) & set(b) else None


def _types_in(types: Sequence[str]) -> list[str]:
    """The layer types present, global first."""
    return sorted(set(types), key=lambda t: t != "full_attention")


def early_minus_late(spearman_rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The paper's reason for ``skip_layers=(0, 1)`` (a weaker norm-attention link in the first
    layers): per document, mean ρ in layers 0-1 minus mean ρ in layers 2 and up, bootstrapped over
    documents; positive means the first layers are less negative. None without both."""
    from knorm_study import intervals

    early = _document_means(spearman_rows, "spearman", lambda layer: layer < 2)
    late = _document_means(spearman_rows, "spearman", lambda layer: layer >= 2)
    docs = sorted(set(early) & set(late))
    return intervals.paired_bootstrap([early[d] - late[d] for d in docs]) if docs else None


def _interval_text(b: dict[str, Any]) -> str:
    from knorm_study import intervals

    return f"[{b['lo']:+.3f}, {b['hi']:+.3f}], " if intervals.enough(b) else "(too few documents for an interval), "


def _correlation_text(record: dict[str, Any]) -> tuple[str, str]:
    """``(phrase, numbers)`` for the low-norm/high-attention claim in layers 2 and up: the phrase
    puts into words the verdict ``intervals.negative`` decides (adding "weak token by token" when
    |mean ρ| < 0.3 even though the sign is resolved), the numbers give the per-document mean ρ, its
    interval and n."""
    from knorm_study import intervals

    b = spearman_by_document(record["results"]["spearman"])
    if b is None:
        return "not measured", ""
    verdict = intervals.negative(b)
    phrase = {"holds": "negative, as the paper says", "fails": "positive, against the paper",
              "not resolved": "not resolved (the interval includes 0 or there are too few documents)"}[verdict]
    if verdict != "not resolved" and abs(b["mean"]) < 0.3:
        phrase += ", but weak token by token"
    return phrase, f"mean ρ {b['mean']:+.3f} {_interval_text(b)}n = {b['n']} documents"


def _early_layers_text(record: dict[str, Any]) -> str:
    """The first-layers comparison as a sentence: measured as ``early_minus_late``."""
    from knorm_study import intervals

    s, d = record["results"]["summary"], early_minus_late(record["results"]["spearman"])
    means = (f"In layers 0–1 the mean ρ is {s['spearman_mean_layers_0_1']:.2f}, in layers ≥ 2 "
             f"{s['spearman_mean_layers_2plus']:.2f}")
    if d is None:
        return means + "; the per-document difference was not measured."
    verdict = intervals.positive(d)
    what = {"holds": "The link is weaker in the first layers, the paper's reason for the default `skip_layers=(0, 1)`.",
            "fails": "The link is stronger in the first layers, against the paper's reason for `skip_layers=(0, 1)`.",
            "not resolved": "Not resolved: a weaker link in the first layers (the paper's reason for "
                            "`skip_layers=(0, 1)`) is not shown at this n."}[verdict]
    return (f"{means}; per document, layers 0–1 minus layers ≥ 2: {d['mean']:+.3f} {_interval_text(d)}"
            f"n = {d['n']} documents. {what}")


TYPE_NAMES = {"full_attention": "global (full attention)", "sliding_attention": "local (sliding window)"}


def _ci(b: dict[str, Any] | None) -> str:
    from knorm_study import intervals

    if b is None:
        return "not measured"
    return f"{b['mean']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}]" if intervals.enough(b) else f"{b['mean']:+.3f} (n too small)"


def _layers_of(types: Sequence[str], layer_type: str) -> list[int]:
    return [i for i, t in enumerate(types) if t == layer_type and i >= 2]


def by_layer_type_text(record: dict[str, Any]) -> str:
    """The per-layer-type table (layers ≥ 2): per-document mean ρ of the cached key's norm with
    the attention received, with position partialled out, the same for the key before QK-norm where
    measured, and each policy's attention-loss area above the oracle, with bootstrap intervals over
    the n documents; then the pre-norm comparison in words. Empty for records without layer types."""
    from knorm_study import intervals

    r = record["results"]
    rows, areas, types = r["spearman"], r.get("loss_areas_by_type"), r.get("layer_types")
    if not areas or not rows or not types:
        return ""
    prenorm = "spearman_prenorm" in rows[0]
    policies = [p for p in ("knorm", "knorm_prenorm", "random", "high_norm") if any(a["policy"] == p for a in areas)]
    cols = ["layer type", "layers (≥ 2)", "ρ cached key", "ρ cached, position out"]
    cols += ["ρ key before QK-norm", "ρ before, position out", "before − cached"] if prenorm else []
    cols += [f"loss area: {p}" for p in policies]
    n = len({x["document"] for x in rows})
    lines = [f"- **Per layer type** (layers ≥ 2; per-document means with bootstrap 95 % intervals, n = {n} documents; "
             "loss area = attention lost above the oracle's, integrated over the evicted fraction):", "",
             "  | " + " | ".join(cols) + " |", "  |" + "---|" * len(cols)]
    for t in _types_in(types):
        cells = [TYPE_NAMES.get(t, t), ", ".join(map(str, _layers_of(types, t))),
                 _ci(spearman_by_document(rows, "spearman", layer_type=t, types=types)),
                 _ci(spearman_by_document(rows, "spearman_position_controlled", layer_type=t, types=types))]
        if prenorm:
            cells += [_ci(spearman_by_document(rows, "spearman_prenorm", layer_type=t, types=types)),
                      _ci(spearman_by_document(rows, "spearman_prenorm_position_controlled", layer_type=t, types=types)),
                      _ci(field_difference(rows, "spearman_prenorm", "spearman", t, types))]
        for pol in policies:
            mean = [a["area_above_oracle"] for a in areas if a["policy"] == pol and a.get("layer_type") == t]
            b = intervals.paired_bootstrap(mean) if mean else None
            cells.append(_ci(b).replace("+", "") if b else "—")
        lines.append("  | " + " | ".join(cells) + " |")
    if prenorm:
        lines += ["", "  " + prenorm_text(record)]
    return "\n".join(lines) + "\n"


def prenorm_text(record: dict[str, Any]) -> str:
    """Whether the key before QK-norm carries the norm–attention signal better than the cached
    key, per layer type, in words decided by the intervals: ρ(before) − ρ(cached) per document
    (negative: a stronger low-norm ↔ high-attention link) and knorm_prenorm's loss area minus
    knorm's (negative: it evicts less of the attention)."""
    from knorm_study import intervals

    r = record["results"]
    rows, areas, types = r["spearman"], r.get("loss_areas_by_type") or [], r.get("layer_types") or []
    parts = []
    for t in _types_in(types):
        d = field_difference(rows, "spearman_prenorm", "spearman", t, types)
        a = area_difference(areas, "knorm_prenorm", "knorm", t)
        if d is None:
            continue
        link = {"holds": "the key before QK-norm tracks attention more closely",
                "fails": "the cached key tracks attention more closely", "not resolved": "not resolved"}[intervals.negative(d)]
        text = f"{TYPE_NAMES.get(t, t)} layers: ρ(before) − ρ(cached) {_ci(d)}, n = {d['n']} ({link})"
        if a is not None:
            loss = {"holds": "evicting by the key before QK-norm loses less attention",
                    "fails": "it loses more attention", "not resolved": "not resolved"}[intervals.negative(a)]
            text += f"; loss area, knorm_prenorm − knorm, {_ci(a)} ({loss})"
        parts.append(text)
    return ("**The key before QK-norm**, per document (negative: closer to attention, less attention lost): "
            + "; ".join(parts) + ".") if parts else ""


def signal_by_type_headline(record: dict[str, Any]) -> str:
    """README's line from 02 on a hybrid model (empty with one layer type): per layer type, does
    evicting by the cached key's norm lose less attention than random eviction? knorm's
    attention-loss area minus random's, per document, bootstrapped, in words decided by the
    interval."""
    from knorm_study import intervals, runtime

    r = record["results"]
    areas, types = r.get("loss_areas_by_type") or [], r.get("layer_types") or []
    parts = []
    for t in _types_in(types) if len(set(types)) > 1 else []:
        a = area_difference(areas, "knorm", "random", t)
        if a is not None:
            verdict = {"holds": "knorm loses less", "fails": "knorm loses more",
                       "not resolved": "no difference resolved"}[intervals.negative(a)]
            parts.append(f"{TYPE_NAMES.get(t, t)} layers {_ci(a)}, n = {a['n']} ({verdict})")
    return (f"- **Does the cached key's norm beat random eviction on each layer type? ({runtime.model_label(record)}, "
            "layers ≥ 2; attention-loss area above the oracle, knorm minus random, paired by document, 95 % "
            "interval; negative: knorm loses less attention):** " + "; ".join(parts) + ".\n") if parts else ""


def findings(record: dict[str, Any]) -> str:
    """What the numbers say (Markdown), from a recorded result of 02_attention_correlation (the
    whole JSON record): the notebook's last cell and REPORT.md's section both print this."""
    s = record["results"]["summary"]
    mid = _mid_keep_ratio(record["parameters"]["keep_ratios"])
    lost = lambda p: s["fraction_lost"].get(f"{p}@{mid}", math.nan)
    phrase, numbers = _correlation_text(record)
    return f"""- **Low norm ↔ high attention, layers ≥ 2:** {phrase}: per-document {numbers}
  (bootstrap over documents; {s['fraction_heads_negative_layers_2plus']:.0%} of (document, layer, head) cells negative).
  {_early_layers_text(record)}
- **With position partialled out** (norm and attention both drift with position), mean ρ in layers ≥ 2 is
  {s['spearman_position_controlled_mean_layers_2plus']:.2f}.
- **The attention sink** (first token) receives on average {s['sink_attention_mean']:.3f} of each query's attention.
- **Attention lost at keep_ratio {mid}** (layers ≥ 2): knorm {lost('knorm'):.3f},
  random {lost('random'):.3f}, high_norm {lost('high_norm'):.3f},
  oracle {lost('oracle'):.3f} (the least any policy evicting as many keys can lose).
- **Attention-loss area above the oracle** (ALR-style, over evicted fractions 0 to {1 - min(record['parameters']['keep_ratios']):g};
  0 = as good as the oracle): {", ".join(f"{p} {a:.3f}" for p, a in s['loss_area_above_oracle'].items())}.
  `sink_random` keeps the first tokens and evicts the rest at random, `streaming` keeps the first tokens
  and the most recent: the gap between them and knorm is what the key norm adds beyond keeping the sink.
""" + by_layer_type_text(record)


def qk_norm_headline(record: dict[str, Any]) -> str:
    """README's line from 02 on a QK-norm model (empty elsewhere): the norm–attention link per
    layer type for the cached key and the key before QK-norm (``prenorm_text``)."""
    from knorm_study import runtime

    r = record["results"]
    if not r["spearman"] or "spearman_prenorm" not in r["spearman"][0] or not r.get("layer_types"):
        return ""
    types = r["layer_types"]
    parts = [f"{TYPE_NAMES.get(t, t)}: cached key {_ci(spearman_by_document(r['spearman'], 'spearman', layer_type=t, types=types))}, "
             f"before QK-norm {_ci(spearman_by_document(r['spearman'], 'spearman_prenorm', layer_type=t, types=types))}"
             for t in _types_in(types)]
    n = len({x["document"] for x in r["spearman"]})
    return (f"- **The norm–attention link under QK-norm ({runtime.model_label(record)}, layers ≥ 2, per-document mean "
            f"Spearman ρ with its 95 % interval, n = {n}):** " + "; ".join(parts) + ". " + prenorm_text(record) + "\n")


def headline(record: dict[str, Any]) -> str:
    """README's one-line finding from 02_attention_correlation."""
    s = record["results"]["summary"]
    mid = _mid_keep_ratio(record["parameters"]["keep_ratios"])
    lost = lambda p: s["fraction_lost"].get(f"{p}@{mid}", math.nan)
    phrase, numbers = _correlation_text(record)
    knorm_helps = lost("knorm") < lost("random")
    return (f"- **Low norm ↔ high attention (layers ≥ 2) is {phrase}:** Spearman ρ between key norm and attention "
            f"received, first token excluded, per-document {numbers}. "
            f"{'What KnormPress needs still holds' if knorm_helps else 'Evicting by norm does not beat random here'}: "
            f"evicting by norm at keep_ratio {mid} loses {lost('knorm'):.1%} of "
            f"the continuation's attention (random {lost('random'):.1%}, oracle {lost('oracle'):.1%})"
            + (", consistent with the attention sink having a low key norm (notebook 01).\n" if knorm_helps else ".\n"))
