"""Probes of knorm_lib (see knorm_study/fingerprint.py): every policy, both protocols, the three
position modes, both storage orders, skip layers, bursts, recent windows, the one-pass engine's
block boundaries, exact ties, the metrics, the budget rules and the text data."""

from __future__ import annotations

from typing import Any

import torch

import knorm_lib as kl
from knorm_study.fingerprint import FLOAT32_RTOL, probe
from knorm_study.probes import _models as m

CONTEXT, N_TOKENS = 28, 44


def _summary(res: kl.EvalResult) -> dict[str, Any]:
    """An evaluation's recorded summary, its per-token NLL, and per compressed layer and KV head
    two sums of its eviction steps (plain and weighted by position: any other kept set moves one)."""
    out = {**res.summary(), "nll": m.rounded(res.nll)}
    if res.evictions:
        weights = torch.arange(1, res.nll.numel() + 2)
        out["evictions"] = {str(i): [m.rounded(ev.reshape(-1, ev.shape[-1]).sum(-1)),
                                     m.rounded((ev.reshape(-1, ev.shape[-1]) * weights).sum(-1))]
                            for i, ev in sorted(res.evictions.items())}
    return out


@probe("knorm_lib")
def prefill_protocol() -> dict[str, Any]:
    """``sweep``: every fixed-score policy, the three position modes, both orders, skip sets."""
    configs = [kl.EvalConfig(1.0), kl.EvalConfig(0.5), kl.EvalConfig(0.9),
               kl.EvalConfig(0.3, "knorm", (), "by_norm", "rerotated"),
               kl.EvalConfig(0.3, "knorm", (), "original", "cache_relative"),
               kl.EvalConfig(0.5, "knorm", (0, 1), "original", "cache_relative"),
               kl.EvalConfig(0.6, "knorm", (1, 3), "by_norm", "absolute"),
               kl.EvalConfig(0.7, "high_norm", (0,)), kl.EvalConfig(0.5, "random", (), seed=1),
               kl.EvalConfig(0.4, "random", (0, 1), "original", "rerotated", seed=3),
               kl.EvalConfig(0.5, "streaming", (), n_sink=2), kl.EvalConfig(0.25, "streaming", (0, 1)),
               kl.EvalConfig(1.0, "knorm", (), "by_norm", "rerotated"),
               kl.EvalConfig(1.0, "knorm", (), "original", "cache_relative"),
               kl.EvalConfig(0.5, "knorm", (0, 1, 2, 3))]
    results = kl.sweep(m.tiny_llama(), m.ids(N_TOKENS, seed=1), CONTEXT, configs)
    return {str(i): _summary(r) for i, r in enumerate(results)}


@probe("knorm_lib", rtol=FLOAT32_RTOL)
def kvpress_policies() -> dict[str, Any]:
    """The kvpress presses through ``sweep`` (their scores pass through float32)."""
    configs = [kl.EvalConfig(0.5, p, ()) for p in sorted(kl.KVPRESS_POLICIES)]
    results = kl.sweep(m.tiny_llama(), m.ids(80, seed=2), 72, configs)   # SnapKV's window: 64 queries
    return {c.policy: _summary(r) for c, r in zip(configs, results)}


@probe("knorm_lib")
def streaming_protocol() -> dict[str, Any]:
    """``streaming_sweep`` and ``streaming_ppl``: every policy (h2o's replay included), both budget
    kinds, bursts, recent windows, skip sets, both engines, the three position modes, both orders."""
    model, x = m.tiny_llama(), m.ids(40, seed=3)
    configs = [dict(keep_ratio=0.5), dict(max_cache=12), dict(keep_ratio=0.5, skip_layers=()),
               dict(policy="high_norm", keep_ratio=0.5), dict(policy="random", keep_ratio=0.4, seed=2),
               dict(policy="streaming", max_cache=10, n_sink=3), dict(policy="h2o", max_cache=12),
               dict(policy="h2o", keep_ratio=0.5, skip_layers=(0,)),
               dict(keep_ratio=0.5, prune_after=10), dict(keep_ratio=0.5, recent_window=4),
               dict(policy="random", max_cache=9, recent_window=12), dict(keep_ratio=0.5, position_mode="cache_relative"),
               dict(keep_ratio=0.5, engine="sequential"), dict(keep_ratio=0.5, engine="sequential", order="by_norm"),
               dict(keep_ratio=0.4, position_mode="rerotated", order="by_norm"),
               dict(policy="h2o", max_cache=12, engine="sequential"),
               dict(keep_ratio=1.0), dict(keep_ratio=0.5, skip_layers=(0, 1, 2, 3))]
    results = kl.streaming_sweep(model, [x, m.ids(40, seed=4)], configs)
    out = {str(i): _summary(r) for i, r in enumerate(results)}
    for second_text in list(out)[len(configs):]:   # its summary is enough
        del out[second_text]["nll"]
    alone = kl.streaming_ppl(model, x, "knorm", keep_ratio=0.5, skip_layers=(1,), position_mode="cache_relative",
                             engine="sequential")
    out["streaming_ppl"] = _summary(alone)
    return out


@probe("knorm_lib")
def one_pass_block_boundaries() -> dict[str, Any]:
    """The one-pass engine across its CPU key block: lengths 0, 1 and 2 mod the block."""
    model = m.tiny_llama(n_layers=2)
    out = {}
    for n in (kl._CPU_KEY_BLOCK, kl._CPU_KEY_BLOCK + 1, kl._CPU_KEY_BLOCK + 2):
        res = kl.streaming_ppl(model, m.ids(n, seed=5), "knorm", keep_ratio=0.25, skip_layers=(0,))
        out[str(n)] = {"ppl": res.ppl, "kl": res.kl_mean, "nll_tail": m.rounded(res.nll[-8:]),
                       "evicted_sum": int(res.evictions[1].sum()), "mean_kept_fraction": res.meta["mean_kept_fraction"]}
    return out


@probe("knorm_lib")
def ties_and_budgets() -> dict[str, Any]:
    """The tie rule (newest first), eviction steps with ties and windows, budgets and n_kept."""
    scores = torch.tensor([[[1.0, 2.0, 1.0, 2.0, 1.0, 0.0, 2.0, 1.0]]])
    positions = torch.arange(8).view(1, 1, 8)
    keys = torch.linspace(-1, 1, 8 * 4, dtype=torch.float64).view(1, 1, 8, 4).flip(2)
    tied = torch.tensor([[3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 2.0, 2.0, 3.0, 1.0], [0.0] * 10])
    budget = kl.budget_schedule(10, max_cache=4)
    return {"keep": [m.rounded(kl.keep_indices(scores, positions, k)) for k in (1, 3, 5, 8)],
            "storage_original": m.rounded(kl.storage_order(kl.keep_indices(scores, positions, 5), positions, keys, "original")),
            "storage_by_norm": m.rounded(kl.storage_order(kl.keep_indices(scores, positions, 5), positions, keys, "by_norm")),
            "evict": m.rounded(kl.eviction_steps(tied, budget)),
            "evict_window": m.rounded(kl.eviction_steps(tied, budget, recent_window=2)),
            "evict_window_over_budget": m.rounded(kl.eviction_steps(tied, kl.budget_schedule(10, max_cache=2), 3)),
            "budget_ratio": m.rounded(kl.budget_schedule(23, keep_ratio=0.3)),
            "budget_max_cache": m.rounded(kl.budget_schedule(12, max_cache=5)),
            "budget_bursts": m.rounded(kl.budget_schedule(30, keep_ratio=0.5, prune_after=7)),
            "budget_full": m.rounded(kl.budget_schedule(6, keep_ratio=1.0)),
            "n_kept": [kl.n_kept_for(n, r) for n in (1, 7, 37, 100, 1000) for r in (0.999, 0.9, 2 / 3, 0.5, 0.3, 0.01)],
            "mask": m.rounded(kl.streaming_mask(torch.tensor([[1, 3, 4, 4]]), torch.float64, rows=(1, 4)))}


@probe("knorm_lib")
def compression_and_positions() -> dict[str, Any]:
    """``compress_cache`` on tied and real scores, ``rerotate_keys``, the decode forms of attention."""
    model = m.tiny_llama()
    pre = kl.prefill(model, m.ids(21, seed=6))
    tied = [torch.zeros_like(p, dtype=torch.float32) for p in pre.cache.positions]
    out = {"tied_positions": m.rounded(kl.compress_cache(pre.cache, 0.4, scores=tied, skip_layers=(0,)).positions[1]),
           "last_logits": m.rounded(pre.last_logits[0, :8])}
    comp = kl.compress_cache(pre.cache, 0.5, "knorm", (0,), "by_norm")
    out["kept_positions"] = [m.rounded(p) for p in comp.positions]
    out["nbytes"] = comp.nbytes()
    rot, next_position = kl.rerotate_keys(comp, model)
    out["rerotated"] = {"next_position": next_position, "key_sums": [m.rounded(k.sum()) for k in rot.keys],
                        "slots": m.rounded(rot.positions[2])}
    new = m.ids(1, seed=7)
    per_head = kl.continuation_logits(model, comp, new)
    with kl.grouped_decoding():
        grouped = kl.continuation_logits(model, comp, new)
    out["decode"] = {"per_head": m.rounded(per_head[0, :8]), "grouped": m.rounded(grouped[0, :8])}
    ref = kl.reference_forward(model, m.ids(6, seed=8), pre.cache, layers=(2,))
    out["reference"] = {"lse": m.rounded(ref.lse), "top1": m.rounded(ref.top1), "layer2_sum": m.rounded(ref.layer_inputs[2].sum())}
    return out


@probe("knorm_lib", rtol=FLOAT32_RTOL)
def float32_paths() -> dict[str, Any]:
    """What passes through float32 even for a float64 model: key-norm scores, the recorded attention
    probabilities, ``full_ppl``."""
    model = m.tiny_llama()
    x = m.ids(16, seed=9)
    pre = kl.prefill(model, x)
    scores = {p: [m.rounded(s[0, :, :6]) for s in kl.policy_scores(pre.cache, p, kl.PolicyOptions(1, 2), skip=(0,))[1:]]
              for p in ("knorm", "high_norm", "random", "streaming")}
    seen: dict[int, Any] = {}
    with kl.recording_attention(lambda i, probs: seen.setdefault(i, probs)):
        kl.full_logits(model, x)
    return {"scores": scores, "attention_row_5": {str(i): m.rounded(p[0, :, 5, :6]) for i, p in sorted(seen.items())},
            "full_ppl": kl.full_ppl(model, x)}


@probe("knorm_lib")
def metrics() -> dict[str, Any]:
    """``token_metrics`` and ``Reference`` across the row chunk (40 rows, chunk 32)."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(40, 50, generator=gen, dtype=torch.float64) * 3
    ref = logits + torch.randn(40, 50, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (40,), generator=gen)
    direct = kl.token_metrics(logits, targets, ref)
    shared = kl.token_metrics(logits[:20], targets[:20], kl.Reference.of(ref)[:20])
    same = kl.token_metrics(ref, targets, ref)
    return {"direct": {k: m.rounded(v.double() if v.dtype == torch.bool else v) for k, v in direct.items()},
            "shared_nll": m.rounded(shared["nll"]), "self_kl_max": m.rounded(same["kl"].max())}


@probe("knorm_lib")
def texts() -> dict[str, Any]:
    """The corpora and the documents the notebooks read (the embedded tokenizer)."""
    tok = m.tokenizer()
    out = {}
    for corpus in kl.CORPORA:
        docs = kl.load_corpus(corpus)
        out[corpus] = {"n": len(docs), "titles": [d.title for d in docs[:3]], "chars": [len(d.text) for d in docs[:5]]}
        long = kl.long_documents(tok, corpus, 600, 3)
        out[corpus]["long"] = [{"title": d.title, "n": int(d.input_ids.shape[1]), "first": m.rounded(d.input_ids[0, :6]),
                                "sum": int(d.input_ids.sum())} for d in long]
    out["encode"] = m.rounded(kl.encode(tok, "The key norm of a token, measured twice.", max_tokens=6)[0])
    return out


@probe("knorm_lib")
def prenorm_policy() -> dict[str, Any]:
    """``knorm_prenorm`` on a QK-norm model (Qwen 3): prefill kept sets, the one-pass engine's
    evictions and NLL; on the Llama, its kept set beside knorm's."""
    model, x = m.tiny_qwen3(), m.ids(36, seed=11)
    res = kl.sweep(model, x, 24, [kl.EvalConfig(0.5, "knorm_prenorm", ()), kl.EvalConfig(0.25, "knorm_prenorm", (0,))])
    pre = kl.prefill(model, x[:, :24], capture_hidden=True)
    kept = kl.compress_cache(pre.cache, 0.5, "knorm_prenorm", (), layer_inputs=pre.layer_inputs)
    llama_pre = kl.prefill(m.tiny_llama(), x[:, :24], capture_hidden=True)
    llama = kl.compress_cache(llama_pre.cache, 0.5, "knorm_prenorm", (), layer_inputs=llama_pre.layer_inputs)
    stream = kl.streaming_ppl(model, x, "knorm_prenorm", max_cache=10, skip_layers=())
    return {"sweep": [_summary(r) for r in res], "kept": [m.rounded(p[0]) for p in kept.positions],
            "llama_kept": [m.rounded(p[0]) for p in llama.positions[2:]], "streaming": _summary(stream)}


@probe("knorm_lib")
def per_layer_rope() -> dict[str, Any]:
    """Re-rotation with each layer's own RoPE (Gemma 3's local and global bases; one KV head):
    the rerotated keys, and a rerotated continuation's NLL."""
    model, x = m.tiny_gemma3_global_rope(), m.ids(30, seed=12)
    pre = kl.prefill(model, x[:, :20])
    rot, next_position = kl.rerotate_keys(kl.compress_cache(pre.cache, 0.5, "knorm", ()), model)
    res = kl.sweep(model, x, 20, [kl.EvalConfig(0.5, "knorm", (), "by_norm", "rerotated")])[0]
    return {"next_position": next_position, "key_sums": [m.rounded(k.sum(dim=(0, 2, 3))) for k in rot.keys],
            "key_first": [m.rounded(k[0, 0, 0, :4]) for k in rot.keys], "rerotated": _summary(res)}


@probe("knorm_lib")
def sliding_windows() -> dict[str, Any]:
    """Sliding-window layers (a tiny Gemma 3, window 6, 30 tokens): the prefill protocol under both
    layer scopes, the one-pass engine (knorm, and h2o's replay), the per-layer-type footprint, and
    the cache-length numberings (windows over cache slots) in both protocols."""
    model, x = m.tiny_gemma3_windowed(), m.ids(30, seed=13)
    scopes = {c: kl.layers_to_skip(model, (), c) for c in kl.LAYER_SCOPES}
    prefill = kl.sweep(model, x, 20, [kl.EvalConfig(0.5, "knorm", skip) for skip in scopes.values()])
    return {"sliding_layers": list(kl.sliding_layers(model)), "scopes": {c: list(s) for c, s in scopes.items()},
            "prefill": [_summary(r) for r in prefill],
            "one_pass": _summary(kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=())),
            "h2o": _summary(kl.streaming_ppl(model, x, "h2o", max_cache=8, skip_layers=())),
            "cache_relative": [_summary(kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=(), engine=engine,
                                                         position_mode="cache_relative"))
                               for engine in ("one_pass", "sequential")],
            "numbered_prefill": [_summary(r) for r in kl.sweep(model, x, 20, [
                kl.EvalConfig(0.5, "knorm", (), "original", mode) for mode in ("cache_relative", "rerotated")])]}


@probe("knorm_lib")
def applicable_policies() -> dict[str, Any]:
    """``applicable_policies``: knorm_prenorm kept on a QK-norm model, dropped on a Llama."""
    policies = ["knorm", "knorm_prenorm", "random", "snapkv"]
    return {"llama": kl.applicable_policies(m.tiny_llama(), policies),
            "qwen3": kl.applicable_policies(m.tiny_qwen3(), policies)}
