"""8. Streaming evaluation (the paper's LM protocol, the write-up's "Method 1")."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch

from knorm_lib.checks import (ORDERS, Order, POSITION_MODES, PositionMode, _check_choice, _check_ids,
                              _check_keep_ratio, _check_skip_layers, _check_vocab, _positive_int, _require)
from knorm_lib.attention import (_MASK_FN, _WINDOW_BY_SLOT, _head_dim, _n_layers, _over, _using,
                                 recording_attention, sliding_layers)
from knorm_lib.policies import (DYNAMIC_POLICIES, LAYER_INPUT_POLICIES, LayerKV, PolicyOptions, _h2o_recent,
                                check_policy, needs_layer_inputs, resolve_policy)
from knorm_lib.compression import _gather_kept, _slots, _to_slots, footprint, keep_indices, storage_order
from knorm_lib.metrics import Reference, token_metrics
from knorm_lib.prefill_protocol import (EvalResult, _capture_layer_inputs, _first_compressed, _progress,
                                        _resumed, full_logits, reference_forward)

__all__ = ["Engine", "StreamingConfig", "budget_schedule", "eviction_steps", "dynamic_eviction_steps",
           "streaming_ppl", "streaming_sweep"]


Engine = Literal["sequential", "one_pass"]


@dataclass(frozen=True)
class StreamingConfig:
    policy: str = "knorm"
    keep_ratio: float | None = None
    max_cache: int | None = None
    skip_layers: tuple[int, ...] = (0, 1)
    order: Order = "original"
    position_mode: PositionMode = "absolute"
    engine: Engine = "one_pass"
    seed: int = 0
    n_sink: int = 4
    prune_after: int | None = None
    recent_window: int = 0


def budget_schedule(n: int, keep_ratio: float | None = None, max_cache: int | None = None,
                    prune_after: int | None = None) -> torch.Tensor:
    """``b[t]``: tokens each compressed layer retains after step ``t``. ``max_cache=B``: ``min(t + 1, B)``;
    ``keep_ratio=r``: ``n_kept_for(t + 1, r)``; ``keep_ratio=r, prune_after=P``: the reference code's
    bursts (``l2compress`` ``cache.l2_compress``): a layer holding ``L >= P`` entries drops to
    ``ceil(r * L)``, so the cache saw-tooths between about ``r * P`` and ``P``."""
    if (keep_ratio is None) == (max_cache is None):
        raise ValueError(f"keep_ratio={keep_ratio!r}, max_cache={max_cache!r}: give exactly one budget")
    steps = torch.arange(1, n + 1)
    if max_cache is not None:
        _require(prune_after is None, "prune_after", prune_after, "None with max_cache (bursts take keep_ratio)")
        _positive_int("max_cache", max_cache)
        return steps.clamp(max=max_cache)
    keep_ratio = _check_keep_ratio(keep_ratio)
    if prune_after is not None:
        _positive_int("prune_after", prune_after)
        lengths, length = [], 0
        for _ in range(n):
            length += 1
            if length >= prune_after and keep_ratio < 1:
                length = math.ceil(keep_ratio * length)
            lengths.append(length)
        return torch.tensor(lengths)
    return (steps.double() * (1 - (1 - keep_ratio))).long().clamp(min=1) if keep_ratio < 1 else steps


def eviction_steps(scores: torch.Tensor, budget: torch.Tensor, recent_window: int = 0) -> torch.Tensor:
    """For scores ``(H, n)`` fixed once each token exists: the step each token is evicted at (``n``:
    never), simulating "after token t, evict the lowest scores until ``budget[t]`` remain" with a
    heap per head. The ``recent_window`` newest go only when the budget is below the window, oldest first."""
    import heapq
    from collections import deque

    n_heads, n = scores.shape
    rows = scores.detach().double().cpu().tolist()
    caps = budget.tolist()
    out = [[n] * n for _ in range(n_heads)]
    if not recent_window:   # the same steps without the window's bookkeeping: 1.6x faster
        for row, evict in zip(rows, out):
            heap: list[tuple[float, int]] = []
            for t in range(n):
                if len(heap) < caps[t]:
                    heapq.heappush(heap, (row[t], t))
                    continue
                evict[heapq.heappushpop(heap, (row[t], t))[1]] = t
                while len(heap) > caps[t]:
                    evict[heapq.heappop(heap)[1]] = t
        return torch.tensor(out, dtype=torch.long)
    for h in range(n_heads):
        heap: list[tuple[float, int]] = []
        window: deque[int] = deque()
        row, evict = rows[h], out[h]
        for t in range(n):
            window.append(t)
            while window and window[0] <= t - recent_window:   # out of the window: ranked by score
                j = window.popleft()
                heapq.heappush(heap, (row[j], j))
            while len(heap) + len(window) > caps[t]:
                evict[heapq.heappop(heap)[1] if heap else window.popleft()] = t
    return torch.tensor(out, dtype=torch.long)


def _protect_recent(scores: torch.Tensor, positions: torch.Tensor, newest: int, recent_window: int) -> torch.Tensor:
    """``scores`` with the ``recent_window`` newest tokens ranked above every other."""
    if not recent_window:
        return scores
    return torch.where(positions > newest - recent_window, torch.full_like(scores, float("inf")), scores)


@torch.inference_mode()
def dynamic_eviction_steps(query: torch.Tensor, key: torch.Tensor, scale: float, budget: torch.Tensor,
                           block: int = 256, window: int | None = None) -> torch.Tensor:
    """H2O's eviction steps ``(H_kv, n)`` from one layer's queries ``(1, H_q, n, D)`` and keys
    ``(1, H_kv, n, D)`` at positions ``0..n-1``. Exact: query ``t`` depends only on earlier layers, whose
    retained sets are already fixed, so replaying the sequential engine's steps (attend, within the
    layer's sliding ``window`` if any, add the attention to each token's mass, evict the lowest mass
    outside the ``_h2o_recent`` newest until ``budget[t]`` remain, the oldest of equal masses first)
    takes ``h2o_score``'s decisions."""
    _, n_q_heads, n, _ = query.shape
    n_kv_heads = key.shape[1]
    groups = n_q_heads // n_kv_heads
    q, k = query[0].float(), key[0].float().repeat_interleave(groups, dim=0)
    hidden = torch.zeros(n_kv_heads, 1, n, device=key.device)   # 0 while a token is cached, -inf once evicted
    mass = torch.zeros(n_kv_heads, n, device=key.device)
    evict = torch.full((n_kv_heads, n), n, dtype=torch.long)
    heads = torch.arange(n_kv_heads)
    caps, n_alive = budget.tolist(), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: thread hand-offs would cost more than the work
    try:
        for start in range(0, n, block):
            stop = min(start + block, n)
            logits = ((q[:, start:stop] @ k[:, :stop].transpose(-1, -2)) * scale).view(n_kv_heads, groups, -1, stop)
            for t in range(start, stop):
                n_alive += 1
                seen = max(0, t + 1 - window) if window else 0   # the first key in the window
                probs = (logits[:, :, t - start, seen:t + 1] + hidden[:, :, seen:t + 1]).softmax(-1)
                mass[:, seen:t + 1] += probs.sum(1)
                older = t + 1 - _h2o_recent(caps[t])   # the recent tokens are never evicted
                while n_alive > caps[t]:
                    gone = (mass[:, :older] - hidden[:, 0, :older]).argmin(-1)   # an evicted token's is +inf
                    hidden[heads, 0, gone] = float("-inf")
                    evict[heads, gone.cpu()] = t
                    n_alive -= 1
    finally:
        torch.set_num_threads(threads)
    return evict


def _per_kv_head(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum ``(B, H_q, ...)`` over the query heads that share each KV head: ``(B, H_kv, ...)``."""
    return x.view(x.shape[0], n_kv_heads, x.shape[1] // n_kv_heads, *x.shape[2:]).sum(2)


def _query_positions(budget: torch.Tensor, position_mode: str, any_compressed: bool) -> torch.Tensor:
    n = budget.numel()
    if position_mode == "absolute" or not any_compressed:
        return torch.arange(n)
    # cache_relative: token t is numbered by the compressed cache's length before it, b[t-1]
    return torch.cat([torch.zeros(1, dtype=torch.long), budget[:-1]])


@torch.inference_mode()
def _stream_one_pass(model: Any, ids: torch.Tensor, cfg: StreamingConfig, budget: torch.Tensor,
                     evict_override: dict[int, torch.Tensor] | None = None,
                     reference: Reference | None = None) -> tuple[torch.Tensor, dict]:
    _, score_fn, _ = resolve_policy(cfg.policy)
    opts = PolicyOptions(cfg.seed, cfg.n_sink)
    n = ids.shape[1]
    skip = set(cfg.skip_layers)
    evictions: dict[int, torch.Tensor] = {}

    def mask_fn(layer_idx: int, query: torch.Tensor, key: torch.Tensor, scale: float,
                window: int | None) -> torch.Tensor | None:
        if layer_idx in skip:
            return None
        if evict_override is not None:
            evict = evict_override[layer_idx]
        elif cfg.policy in DYNAMIC_POLICIES:
            evict = dynamic_eviction_steps(query, key, scale, budget, window=window)
        else:
            positions = torch.arange(n, device=key.device).expand(1, key.shape[1], n)
            scores = score_fn(LayerKV(key, key, positions, layer_idx, **inputs.get(layer_idx, {})), opts)[0]
            evict = eviction_steps(scores, budget, cfg.recent_window)
        evictions[layer_idx] = evict
        return evict   # _attention masks with it (_streaming_attention)

    any_compressed = len(skip) < _n_layers(model)
    position_ids = _query_positions(budget, cfg.position_mode, any_compressed)[None].to(model.device)
    inputs: dict[int, dict] = {}   # each layer's inputs, for a policy that scores them
    capture = _capture_layer_inputs(model, inputs) if needs_layer_inputs(cfg.policy) else contextlib.nullcontext()
    by_slot = cfg.position_mode != "absolute"   # a window counts the slots the numbering implies
    with _using(_MASK_FN, mask_fn), _using(_WINDOW_BY_SLOT, by_slot), \
            _resumed(reference, skip, cfg.position_mode == "absolute"), capture:
        logits = model(input_ids=ids.to(model.device), position_ids=position_ids, use_cache=False).logits[0]
    return logits, evictions


@torch.inference_mode()
def _stream_sequential(model: Any, ids: torch.Tensor, cfg: StreamingConfig, budget: torch.Tensor,
                       orders: Sequence[str], progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """One token per forward; after each step every non-skipped layer is cut back to ``budget[t]`` per
    KV head (``rerotated``: kept keys re-rotated from their as-cached rotation, so no rounding
    accumulates). ``ids`` ``(B, n)``: B texts as one batch, row ``b`` stored in ``orders[b]``.
    Returns logits ``(B, n, vocab)`` and each row's evictions."""
    from transformers import DynamicCache

    _, score_fn, _ = resolve_policy(cfg.policy)
    opts = PolicyOptions(cfg.seed, cfg.n_sink)
    (n_rows, n), n_layers = ids.shape, _n_layers(model)
    skip = set(cfg.skip_layers)
    any_compressed = len(skip) < n_layers
    by_norm = torch.tensor([o == "by_norm" for o in orders], device=model.device).view(-1, 1, 1)
    cache = DynamicCache()
    pos: list[torch.Tensor | None] = [None] * n_layers       # original token index per cached entry
    base_keys: list[torch.Tensor | None] = [None] * n_layers  # keys as cached (rerotated mode)
    base_rot: list[torch.Tensor | None] = [None] * n_layers   # the position each was rotated at
    mass: list[torch.Tensor | None] = [None] * n_layers       # attention received so far (h2o)
    evictions: dict[int, torch.Tensor] = {}                  # layer -> (B, H_kv, n)
    rerotate = cfg.position_mode == "rerotated"

    def record(layer_idx: int, probs: torch.Tensor) -> None:
        received = _per_kv_head(probs.sum(2), model.config.num_key_value_heads)  # summed over the group
        prev = mass[layer_idx]
        mass[layer_idx] = received if prev is None else torch.cat([prev, prev.new_zeros(*prev.shape[:2], 1)], -1) + received

    logits, next_position = [], 0
    with recording_attention(record if cfg.policy in DYNAMIC_POLICIES else None):
        for t in _progress(range(n), "streaming (sequential)", progress):
            position = t if cfg.position_mode == "absolute" or not any_compressed else next_position
            # where the numbering puts each cached key: absolute, the original indices; else cache slots
            cache.knorm_positions = [p if p is None or cfg.position_mode == "absolute" else _slots(p, position)
                                     for p in pos]
            with _over(cache):
                out = model(input_ids=ids[:, t:t + 1].to(model.device), past_key_values=cache, use_cache=True,
                            position_ids=torch.full((n_rows, 1), position, device=model.device))
            logits.append(out.logits[:, -1])
            for i, layer in enumerate(cache.layers):
                b, h = layer.keys.shape[:2]
                new = torch.full((b, h, 1), t, device=layer.keys.device)
                pos[i] = new if pos[i] is None else torch.cat([pos[i], new], -1)
                if rerotate:
                    new_key, new_rot = layer.keys[:, :, -1:], torch.full_like(new, position)
                    base_keys[i] = new_key if base_keys[i] is None else torch.cat([base_keys[i], new_key], 2)
                    base_rot[i] = new_rot if base_rot[i] is None else torch.cat([base_rot[i], new_rot], -1)
                n_keep = int(budget[t])
                if i in skip or layer.keys.shape[2] <= n_keep:
                    continue
                kv = LayerKV(layer.keys, layer.values, pos[i], i, attention_mass=mass[i], budget=n_keep)
                idx = keep_indices(_protect_recent(score_fn(kv, opts), pos[i], t, cfg.recent_window), pos[i], n_keep)
                kept = torch.zeros(pos[i].shape, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
                ev = evictions.setdefault(i, torch.full((b, h, n), n, dtype=torch.long))
                ev.scatter_(2, pos[i][~kept].view(b, h, -1).cpu(), t)
                idx = storage_order(idx, pos[i], layer.keys, "original")
                if bool(by_norm.any()):
                    idx = torch.where(by_norm, storage_order(idx, pos[i], layer.keys, "by_norm"), idx)
                layer.keys, layer.values, pos[i] = _gather_kept(layer.keys, layer.values, pos[i], idx)
                if mass[i] is not None:
                    mass[i] = mass[i].gather(-1, idx)
                if rerotate:
                    base_keys[i], _, base_rot[i] = _gather_kept(base_keys[i], base_keys[i], base_rot[i], idx)
            lengths = [layer.keys.shape[2] for layer in cache.layers]
            next_position = min(lengths)
            if rerotate:
                for i, layer in enumerate(cache.layers):
                    layer.keys = _to_slots(base_keys[i], base_rot[i], next_position, model, i)[0]
    return torch.stack(logits, 1), [{i: ev[row] for i, ev in evictions.items()} for row in range(n_rows)]


def _streaming_config(model: Any, n: int, policy: str = "knorm", keep_ratio: float | None = None,
                      max_cache: int | None = None, skip_layers: Sequence[int] = (0, 1), engine: Engine | None = None,
                      order: Order = "original", position_mode: PositionMode = "absolute", seed: int = 0,
                      n_sink: int = 4, prune_after: int | None = None,
                      recent_window: int = 0) -> tuple[StreamingConfig, torch.Tensor]:
    """The checked configuration of a streaming run over ``n`` tokens and its budget schedule."""
    if n < 2:
        raise ValueError("input_ids: need at least two tokens")
    PolicyOptions(seed, n_sink)
    check_policy("policy", policy, "streaming")
    skip = tuple(sorted(_check_skip_layers(skip_layers, _n_layers(model))))
    _check_choice("order", order, ORDERS)
    _check_choice("position_mode", position_mode, POSITION_MODES)
    budget = budget_schedule(n, keep_ratio, max_cache, prune_after)
    _require(isinstance(recent_window, int) and not isinstance(recent_window, bool) and recent_window >= 0,
             "recent_window", recent_window, "an int >= 0")
    _require(not recent_window or policy not in DYNAMIC_POLICIES, "recent_window", recent_window,
             f"0 with policy={policy!r} (dynamic policies keep their own recent tokens)")
    if engine is None:
        engine = "one_pass" if position_mode != "rerotated" else "sequential"
    _check_choice("engine", engine, ("sequential", "one_pass"))
    _require(engine == "one_pass" or policy not in LAYER_INPUT_POLICIES, "engine", engine,
             f"'one_pass' with policy={policy!r} (it scores the layer's inputs, which the one-pass forward has)")
    if engine == "one_pass" and position_mode == "rerotated":
        raise ValueError("engine='one_pass': position_mode='rerotated' moves keys every step; use engine='sequential'")
    _require(engine == "sequential" or position_mode == "absolute" or policy not in DYNAMIC_POLICIES
             or not sliding_layers(model), "engine", engine, f"'sequential' for policy={policy!r} with "
             f"position_mode={position_mode!r} on a model with sliding windows (the one-pass replay counts "
             "windows in true positions)")
    return StreamingConfig(policy, keep_ratio, max_cache, skip, order, position_mode, engine, seed, n_sink,
                           prune_after, recent_window), budget


def _streaming_result(model: Any, ids: torch.Tensor, cfg: StreamingConfig, budget: torch.Tensor,
                      logits: torch.Tensor, evictions: dict, ref_logits: torch.Tensor | Reference) -> EvalResult:
    n, n_layers = ids.shape[1], _n_layers(model)
    m = token_metrics(logits[:-1], ids[0, 1:].to(model.device), ref_logits[:-1])
    kv_bytes_per_token = 2 * model.config.num_key_value_heads * _head_dim(model) * next(model.parameters()).element_size()
    lengths = [n if i in cfg.skip_layers else int(budget[-1]) for i in range(n_layers)]
    n_kept = n if len(cfg.skip_layers) == n_layers else int(budget[-1])
    kept_fraction = (budget.double() / torch.arange(1, n + 1)).mean().item()
    compressed = 1 - len(cfg.skip_layers) / n_layers
    meta = {"protocol": "streaming", "n_tokens": n, "final_cache_len": n_kept,
            "mean_kept_fraction": kept_fraction if compressed else 1.0,
            "mean_cache_fraction": compressed * kept_fraction + (1 - compressed)}
    if sliding_layers(model):   # what the next query could read, per layer type, after the text
        every = torch.arange(n).expand(1, model.config.num_key_value_heads, n)
        held = [every[evictions[i][None] == n].view(1, every.shape[1], -1) if i in evictions else every
                for i in range(n_layers)]
        meta["by_layer_type"] = footprint(model, held, n)
    return EvalResult(cfg, m["nll"], m["correct"], m["kl"], m["top1_agree"], n_kept, 0,
                      sum(lengths) * kv_bytes_per_token, meta=meta, evictions=evictions)


def _nothing_evicted(budget: torch.Tensor) -> bool:
    return bool((budget == torch.arange(1, budget.numel() + 1)).all())


def _run_engine(model: Any, ids: torch.Tensor, cfg: StreamingConfig, budget: torch.Tensor,
                reference_logits: torch.Tensor | Reference | None, evict_override: dict | None = None,
                progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Logits ``(n, vocab)`` and evictions of one text: the reference's when nothing is evicted."""
    if _nothing_evicted(budget) and reference_logits is not None and evict_override is None:
        logits = reference_logits.logits if isinstance(reference_logits, Reference) else reference_logits
        return logits, {}
    if cfg.engine == "one_pass":
        return _stream_one_pass(model, ids, cfg, budget, evict_override, reference_logits)
    logits, (evictions,) = _stream_sequential(model, ids, cfg, budget, [cfg.order], progress)
    return logits[0], evictions


def streaming_ppl(model: Any, input_ids: torch.Tensor, policy: str = "knorm", keep_ratio: float | None = None,
                  max_cache: int | None = None, skip_layers: Sequence[int] = (0, 1), engine: Engine | None = None,
                  order: Order = "original", position_mode: PositionMode = "absolute", seed: int = 0,
                  n_sink: int = 4, prune_after: int | None = None, recent_window: int = 0, progress: bool = False,
                  reference_logits: torch.Tensor | Reference | None = None,
                  evict_override: dict[int, torch.Tensor] | None = None) -> EvalResult:
    """Streaming protocol: every token is scored while the cache is compressed as it grows.

    Token ``t`` attends to the set retained after step ``t-1`` plus itself; then each non-skipped
    layer keeps, per KV head, the ``budget[t]`` best-scored tokens (``budget_schedule``), the token
    just added included (as in the paper's code), except the ``recent_window`` newest (score-fixed
    policies). ``.meta``: ``mean_kept_fraction`` (mean over steps of tokens a compressed layer holds
    / tokens seen: the effective compression), ``mean_cache_fraction`` (over all layers),
    ``final_cache_len``; ``.evictions``: per compressed layer ``(H_kv, n)``.

    ``engine="one_pass"`` (default where it applies) scores the text in ONE forward with a per-layer
    mask: eviction steps from the scores (a heap per KV head), or replayed inside each layer for h2o
    (``dynamic_eviction_steps``). ``"sequential"``: one forward per token, the reference (needed for
    ``rerotated``). KL and top-1 agreement compare with ``reference_logits`` (default: computed; a
    ``reference_forward`` also lets the one-pass engine start at the first compressed layer)."""
    ids = _check_ids(input_ids)
    _check_vocab(model, ids)
    cfg, budget = _streaming_config(model, ids.shape[1], policy, keep_ratio, max_cache, skip_layers, engine, order,
                                    position_mode, seed, n_sink, prune_after, recent_window)
    logits, evictions = _run_engine(model, ids, cfg, budget, reference_logits, evict_override, progress)
    ref_logits = reference_logits if reference_logits is not None else full_logits(model, ids)
    return _streaming_result(model, ids, cfg, budget, logits, evictions, ref_logits)


def streaming_sweep(model: Any, input_ids: torch.Tensor | Sequence[torch.Tensor], configs: Sequence[dict[str, Any]],
                    progress: bool = False) -> list[EvalResult]:
    """``streaming_ppl`` for each text (one ``(1, n)`` tensor or a list of one length) and configuration
    (keyword dicts), text-major. Each text's reference forward is shared, and sequential
    configurations differing only in storage order run as one batch over texts and orders (same
    numbers up to float rounding, a fraction of the time)."""
    texts = [input_ids] if isinstance(input_ids, torch.Tensor) else list(input_ids)
    _require(bool(texts), "input_ids", input_ids, "a token tensor or a non-empty list of them")
    texts = [_check_ids(ids) for ids in texts]
    for ids in texts:
        _check_vocab(model, ids)
    n = texts[0].shape[1]
    _require(all(ids.shape[1] == n for ids in texts), "input_ids", [tuple(ids.shape) for ids in texts],
             "texts of one length")
    setups = [_streaming_config(model, n, **cfg) for cfg in configs]
    starts = {_first_compressed(cfg.skip_layers) for cfg, _ in setups if cfg.engine == "one_pass"}
    references = [reference_forward(model, ids, layers=starts) for ids in texts]
    results: dict[tuple[int, int], EvalResult] = {}
    batches: dict[StreamingConfig, list[int]] = {}
    for c, (cfg, budget) in _progress(list(enumerate(setups)), "streaming configurations", progress):
        if cfg.engine == "sequential" and not _nothing_evicted(budget):
            batches.setdefault(replace(cfg, order="original"), []).append(c)
            continue
        for d, ids in enumerate(texts):
            logits, evictions = _run_engine(model, ids, cfg, budget, references[d])
            results[d, c] = _streaming_result(model, ids, cfg, budget, logits, evictions, references[d])
    for members in _progress(list(batches.values()), "sequential batches", progress):
        cfg, budget = setups[members[0]]
        rows = [(d, c) for d in range(len(texts)) for c in members]
        logits, evictions = _stream_sequential(model, torch.cat([texts[d] for d, _ in rows]), cfg, budget,
                                               [setups[c][0].order for _, c in rows])
        for row, (d, c) in enumerate(rows):
            results[d, c] = _streaming_result(model, texts[d], setups[c][0], budget, logits[row], evictions[row],
                                              references[d])
    return [results[d, c] for d in range(len(texts)) for c in range(len(setups))]
