"""Key-norm distributions (01_norm_distributions): which tokens have low key norms.

The analysis works on one long table (``norm_table``: a row per document, layer, KV head and
position); each function below is one step of the notebook, ``summarize`` collects the recorded
summary and ``findings`` / ``headline`` turn a recorded result into the prose of the notebook and
of REPORT.md / README.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

import knorm_lib as kl

TOKEN_KINDS: tuple[str, ...] = ("first", "newline", "punctuation", "stop_word", "other")


STOP_WORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being
it its this that these those he she they we you i his her their our your not no so than then there here which who
whom what when where why how all any each also has have had do does did will would can could may might""".split())


def token_kinds(tokenizer: Any, input_ids: torch.Tensor) -> list[str]:
    """A kind per token, for grouping norms: ``first`` (the attention sink; these sequences carry no
    BOS), ``newline``, ``punctuation``, ``stop_word`` (short English function words), ``other``."""
    kinds = []
    for i, token_id in enumerate(kl._check_ids(input_ids)[0].tolist()):
        text = tokenizer.decode([token_id])
        word = text.strip()
        if i == 0:
            kinds.append("first")
        elif "\n" in text:
            kinds.append("newline")
        elif word and not any(c.isalnum() for c in word):
            kinds.append("punctuation")
        elif word.lower() in STOP_WORDS:
            kinds.append("stop_word")
        else:
            kinds.append("other")
    return kinds


def key_norms(cache: kl.KVCache) -> torch.Tensor:
    """Key L2 norms of an uncompressed cache, float32, ``(layers, H_kv, positions)``. RoPE rotates
    coordinate pairs, so these equal the pre-RoPE norms."""
    return torch.stack([k.float().norm(dim=-1)[0] for k in cache.keys])


def value_norms(cache: kl.KVCache) -> torch.Tensor:
    """Value L2 norms of an uncompressed cache, float32, ``(layers, H_kv, positions)``."""
    return torch.stack([v.float().norm(dim=-1)[0] for v in cache.values])


def norm_table(model: Any, tokenizer: Any, docs: Sequence[tuple[str, kl.TokenizedDoc]]) -> Any:
    """One prefill per ``(corpus, document)``: a pandas DataFrame with one row per (document, layer,
    KV head, position) and the columns ``key_norm``, ``value_norm``, ``corpus``, ``document``, ``kind``."""
    import numpy as np
    import pandas as pd

    frames = []
    for corpus, doc in docs:
        cache = kl.prefill(model, doc.input_ids).cache
        kn, vn = key_norms(cache).cpu(), value_norms(cache).cpu()   # (layers, H_kv, positions)
        kinds = token_kinds(tokenizer, doc.input_ids)
        n_layers, n_heads, n = kn.shape
        idx = pd.MultiIndex.from_product([range(n_layers), range(n_heads), range(n)],
                                         names=["layer", "kv_head", "position"])
        frames.append(pd.DataFrame({"key_norm": kn.flatten().numpy(), "value_norm": vn.flatten().numpy()}, index=idx)
                      .reset_index().assign(corpus=corpus, document=doc.title, kind=np.tile(kinds, n_layers * n_heads)))
    return pd.concat(frames, ignore_index=True)


def sink_ratio(norms: Any) -> Any:
    """The first token's key norm over the median norm of the other tokens of its document, layer
    and head, averaged over documents: a DataFrame, layers × KV heads."""
    first = norms[norms.position == 0].set_index(["document", "layer", "kv_head"]).key_norm
    rest = norms[norms.position > 0].groupby(["document", "layer", "kv_head"]).key_norm.median()
    return (first / rest).groupby(["layer", "kv_head"]).mean().unstack()


def norm_by_kind(norms: Any) -> tuple[Any, Any]:
    """Per layer, the median key norm of each token kind over the layer's median (DataFrame, layers ×
    kinds in ``TOKEN_KINDS`` order), and the number of tokens of each kind (one layer and head)."""
    layer_median = norms.groupby("layer").key_norm.median()
    by_kind = norms.groupby(["layer", "kind"]).key_norm.median().unstack()
    relative = by_kind.div(layer_median, axis=0)[[k for k in TOKEN_KINDS if k in by_kind.columns]]
    counts = norms[(norms.layer == 0) & (norms.kv_head == 0)].kind.value_counts()
    return relative, counts


def head_stability(norms: Any) -> list[dict[str, Any]]:
    """For each pair of documents, the Spearman correlation of the per-head median key norms (one
    value per layer × KV head, first token excluded): close to 1 when each head keeps its character."""
    from scipy import stats

    medians = norms[norms.position > 0].groupby(["document", "layer", "kv_head"]).key_norm.median().unstack(0)
    pairs = [(a, b) for i, a in enumerate(medians.columns) for b in medians.columns[i + 1:]]
    return [{"doc_a": a, "doc_b": b, "spearman": stats.spearmanr(medians[a], medians[b]).statistic} for a, b in pairs]


def norm_spread(norms: Any) -> Any:
    """Per layer, the coefficient of variation of the key norms (std / mean over the positions after
    the first, per document and KV head, averaged): how much a norm ranking has to work with (QK-norm
    rescales every key to one RMS before its gain)."""
    per_head = norms[norms.position > 0].groupby(["document", "layer", "kv_head"]).key_norm
    return (per_head.std(ddof=0) / per_head.mean()).groupby("layer").mean()


def spread_summary(model: Any, norms: Any) -> dict[str, Any]:
    """The recorded spread: ``norm_spread`` per layer and, per layer type (``full_attention``, and
    ``sliding_attention`` for a windowed layer), its layers, the median and range of their spread
    and the median sink ratio (``sink_ratio``) over their (layer, KV head) pairs."""
    import numpy as np

    spread, ratio = norm_spread(norms), sink_ratio(norms)
    types: dict[str, list[int]] = {}
    for layer in spread.index:
        types.setdefault(kl._layer_type(model, int(layer)), []).append(int(layer))
    return {"key_norm_cv_by_layer": spread.to_dict(),
            "by_layer_type": {kind: {"layers": layers, "key_norm_cv_median": float(spread[layers].median()),
                                     "key_norm_cv_range": [float(spread[layers].min()), float(spread[layers].max())],
                                     "sink_ratio_median": float(np.median(ratio.loc[layers].to_numpy()))}
                              for kind, layers in sorted(types.items())}}


def summarize(norms: Any, n_early: int, n_documents: int) -> dict[str, Any]:
    """The recorded summary: the sink ratio, early against late positions, token kinds, head
    stability across documents, and the key/value norm correlation."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    ratio = sink_ratio(norms)
    early = norms[(norms.position > 0) & (norms.position < n_early)].groupby("layer").key_norm.median()
    late = norms[norms.position >= n_early].groupby("layer").key_norm.median()
    deep = ratio.loc[2:]
    stability = pd.DataFrame(head_stability(norms), columns=["doc_a", "doc_b", "spearman"])
    return {
        "n_documents": n_documents,
        "sink_ratio_median_all": float(np.median(ratio.to_numpy())),
        "sink_ratio_median_layers_2plus": float(np.median(deep.to_numpy())) if len(deep) else None,
        "fraction_heads_sink_below_median": float((ratio < 1).to_numpy().mean()),
        "early_over_late_median_norm": (early / late).to_dict(),
        "median_norm_by_kind_relative": norm_by_kind(norms)[0].median().to_dict(),
        "head_stability_spearman_mean": float(stability.spearman.mean()) if len(stability) else None,
        "key_value_norm_spearman": float(stats.spearmanr(norms.key_norm, norms.value_norm).statistic),
        "key_norm_by_layer": norms.groupby("layer").key_norm.median().to_dict(),
    }


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def findings(record: dict[str, Any]) -> str:
    """What the numbers say (Markdown), from a recorded result of 01_norm_distributions (the whole
    JSON record): the notebook's last cell and REPORT.md's section both print this."""
    s = record["results"]["summary"]
    kinds = sorted(s["median_norm_by_kind_relative"].items(), key=lambda kv: kv[1])
    below = s["fraction_heads_sink_below_median"]
    stab = s["head_stability_spearman_mean"]
    if below > 0.5:
        sink = "**The first token has a low key norm.**"
        keeps = "KnormPress therefore tends to keep the attention sink."
    else:
        sink = "**The first token does not stand out by a low key norm.**"
        keeps = "KnormPress is therefore not guaranteed to keep the attention sink."
    if stab is None:
        heads = "**Head stability across documents** is not measured: one document only."
    else:
        heads = (f"**Heads {'keep' if stab >= 0.5 else 'do not keep'} their character across documents**: mean Spearman "
                 f"correlation of per-head median norms between documents {stab:.3f}.")
    return f"""{s['n_documents']} documents.

- {sink} Its key norm is below the median of the other tokens in
  {below:.0%} of (layer, KV head) pairs; the median ratio is {s['sink_ratio_median_all']:.2f}
  (layers ≥ 2: {_num(s['sink_ratio_median_layers_2plus'], '.2f')}). {keeps}
- **Token kinds**, median key norm relative to the layer median (median over layers), lowest first:
  {", ".join(f"{k} {v:.2f}" for k, v in kinds)}.
- {heads}
- **Key and value norms** correlate with Spearman {s['key_value_norm_spearman']:.2f} over all tokens, layers and heads.
""" + _spread_sentence(record["results"].get("spread"))


def _spread_sentence(spread: dict[str, Any] | None) -> str:
    """The key norms' spread per layer, and per layer type on a model with windows ("" for a record
    without it)."""
    if not spread:
        return ""
    cv, types = spread["key_norm_cv_by_layer"], spread["by_layer_type"]
    names = {"full_attention": "global (full-attention)", "sliding_attention": "local (sliding-window)"}
    per_type = "; ".join(f"{names.get(k, k)} layers ({len(v['layers'])}): median {v['key_norm_cv_median']:.3f}, "
                         f"{v['key_norm_cv_range'][0]:.3f}–{v['key_norm_cv_range'][1]:.3f}, first token's ratio to "
                         f"the median norm {v['sink_ratio_median']:.2f}" for k, v in types.items())
    return (f"- **Spread of key norms per layer** (coefficient of variation over the positions after the first, "
            f"per document and KV head): {min(cv.values()):.3f}–{max(cv.values()):.3f} across layers"
            + (f"; {per_type}.\n" if len(types) > 1 else ".\n"))


def headline(record: dict[str, Any]) -> str:
    """README's one-line finding from 01_norm_distributions."""
    below = record["results"]["summary"]["fraction_heads_sink_below_median"]
    if below > 0.5:
        return (f"- **The attention sink has a low key norm:** the first token's key norm is below the median in "
                f"{below:.0%} of (layer, head) pairs, so KnormPress keeps it unasked.\n")
    return (f"- **The attention sink does not have a conspicuously low key norm:** the first token's key norm is "
            f"below the median in only {below:.0%} of (layer, head) pairs.\n")
