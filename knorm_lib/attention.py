"""2. The attention function and the models it supports (loading: knorm_study/models.py): its masks
(causal, evicted, sliding window) read positions, never cache lengths."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ATTN_IMPLEMENTATION", "MaskFn", "recording_attention", "grouped_decoding", "check_supported",
           "sliding_layers", "streaming_mask"]


ATTN_IMPLEMENTATION = "knorm_study"

# The one-pass streaming engine's per-layer visibility, ``mask_fn(layer_idx, query, key, scale, window)``
# with the layer's RoPE-rotated tensors and sliding window (``None``: none): the step each key is
# evicted at per KV head, ``(H_kv, n)`` integers (batch size 1, ``streaming_mask`` says what it
# means), or ``None`` (causal).
MaskFn = Callable[[int, torch.Tensor, torch.Tensor, float, "int | None"], "torch.Tensor | None"]
_MASK_FN: contextvars.ContextVar[MaskFn | None] = contextvars.ContextVar("knorm_mask_fn", default=None)
_ATTN_RECORDER: contextvars.ContextVar[Callable[[int, torch.Tensor], None] | None] = \
    contextvars.ContextVar("knorm_attn_recorder", default=None)
# Grouped decode steps equal the per-head form up to float rounding, not bitwise, so the
# evaluators that score perplexity keep the per-head form.
_GROUPED_DECODE: contextvars.ContextVar[bool] = contextvars.ContextVar("knorm_grouped_decode", default=False)
# Sliding-window layers need each cached key's position, which a cache's length stops giving once
# tokens are evicted: the positions ``(B, H_kv, S)`` per layer of the cache a forward attends to
# (``_over``; held by the transformers cache, ``knorm_positions``). A windowed layer appends its
# queries' positions, so the list follows the cache as it grows.
_KEY_POSITIONS: contextvars.ContextVar[list | None] = contextvars.ContextVar("knorm_key_positions", default=None)
# The one-pass engine under a cache-length numbering (``cache_relative``): a window counts cache
# slots, not true positions (``streaming_mask``).
_WINDOW_BY_SLOT: contextvars.ContextVar[bool] = contextvars.ContextVar("knorm_window_by_slot", default=False)
# ``(start, hidden)``: the forward starts at layer ``start`` from ``hidden`` (``_resumed``).
_RESUME: contextvars.ContextVar[tuple[int, torch.Tensor] | None] = contextvars.ContextVar("knorm_resume", default=None)


@contextlib.contextmanager
def _using(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _over(cache: Any) -> contextlib.AbstractContextManager:
    """Within the block, forwards attend over the transformers cache ``cache``, whose
    ``knorm_positions`` (set where the library builds it) say where each key sits."""
    return _using(_KEY_POSITIONS, getattr(cache, "knorm_positions", None))


def recording_attention(fn: Callable[[int, torch.Tensor], None] | None) -> contextlib.AbstractContextManager:
    """Within the block, every attention call passes ``(layer_idx, probabilities (B, H_q, q_len,
    k_len))`` to ``fn`` (how H2O and the attention studies read attention)."""
    return _using(_ATTN_RECORDER, fn)


def grouped_decoding(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, single-token queries attend in grouped-query form: each KV head's group of
    queries as one block, so every cached key and value is read once per step (decoding)."""
    return _using(_GROUPED_DECODE, enabled)


def streaming_mask(evict: torch.Tensor, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None,
                   window: tuple[int, torch.Tensor, bool] | None = None) -> torch.Tensor:
    """Additive mask per KV head ``(H_kv, n, n)``: key ``j`` visible to query ``t`` iff ``j <= t <= evict[j]``;
    ``rows=(start, stop)``: only queries ``start <= t < stop``. A sliding-window layer,
    ``window=(w, positions, by_slot)``: and ``positions[t] - positions[j] < w`` (tokens at ``positions``), or,
    ``by_slot`` (new tokens numbered by the cache's length), fewer than ``w`` cached keys in ``(j, t]``:
    the slots the model numbered, as the sequential engine holds them."""
    n_heads, n = evict.shape
    start, stop = rows or (0, n)
    t = torch.arange(start, stop, device=evict.device).view(1, stop - start, 1)
    j = torch.arange(n, device=evict.device).view(1, 1, n)
    visible = (j <= t) & (t <= evict.view(n_heads, 1, n))
    if window is not None and window[2]:
        visible &= visible.flip(-1).cumsum(-1).flip(-1) <= window[0]   # cached keys in [j, t]
    elif window is not None:
        pos = window[1].to(evict.device)
        visible &= (pos[start:stop].view(1, -1, 1) - pos[:n].view(1, 1, n)) < window[0]
    return torch.where(visible, 0.0, float("-inf")).to(dtype)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA whose causal mask comes from this layer's own key length: the ``q_len`` queries are the
    last ``q_len`` keys, everything before them is cache and fully visible. On a sliding-window
    layer (transformers passes ``sliding_window``) key ``j`` is visible from position ``p`` iff
    ``0 <= p - j < window``, positions from ``position_ids`` and ``_KEY_POSITIONS``."""
    for feature in ("softcap", "s_aux"):   # features this function does not implement
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"layer {module.layer_idx}: attention with {feature}={kwargs[feature]!r} is not "
                                      "implemented by knorm_lib's attention function (load_model refuses such models)")
    q_len, k_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    by_slot = _WINDOW_BY_SLOT.get()
    # one pass numbered by cache lengths: an uncompressed layer's slots are the tokens' indices
    position_ids = torch.arange(k_len - q_len, k_len, device=key.device)[None] if by_slot else kwargs.get("position_ids")
    positions = _window_positions(module.layer_idx, key, position_ids, q_len) if window else None
    mask_fn = _MASK_FN.get()
    scale = scaling or query.shape[-1] ** -0.5
    evict = mask_fn(module.layer_idx, query, key, scale, window) if mask_fn is not None else None
    recorder = _ATTN_RECORDER.get()
    if window and evict is None and recorder is None and q_len == k_len > 1 and key.shape[0] == 1:
        evict = torch.full(key.shape[1:3], k_len, dtype=torch.long)   # a forward without a cache: in blocks too
    windowed = (window, positions[0][0], by_slot) if window else None
    if evict is not None and recorder is None:
        return _streaming_attention(query, key, value, evict, scaling, windowed), None
    mask = streaming_mask(evict.to(query.device), query.dtype, window=windowed) if evict is not None else None
    is_causal = False
    if window:   # a predicate on positions: 0 <= p - j < window (and, streaming, not yet evicted)
        if evict is not None:
            visible = mask[None] == 0
        else:
            q_pos, k_pos = positions
            seen = q_pos[:, None, :, None] - k_pos[:, :, None, :]   # (B, H_kv, q_len, k_len)
            visible = (seen >= 0) & (seen < window)
        mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
    elif mask is None and q_len > 1:
        if q_len == k_len:
            is_causal = True
        else:
            # additive: 1.1-1.6x faster than boolean on CPU, bitwise equal (benchmarks/bench_evaluation_speed.py)
            mask = torch.full((q_len, k_len), float("-inf"), dtype=query.dtype, device=query.device).triu(k_len - q_len + 1)
    if q_len == 1 and mask is None and recorder is None and _GROUPED_DECODE.get():
        # each KV head's query group as one block: every key and value read once (enable_gqa: per query head)
        b, h_q, _, _ = query.shape
        grouped = query.reshape(b, key.shape[1], h_q // key.shape[1], query.shape[-1])
        out = F.scaled_dot_product_attention(grouped, key, value, scale=scaling)
        return out.reshape(b, h_q, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    if recorder is not None:  # float32 whatever the model's dtype, as the one-pass replay of H2O
        logits = query.float() @ key.float().repeat_interleave(groups, dim=1).transpose(-1, -2) * scale
        if mask is not None:
            logits = logits + (mask.float().repeat_interleave(groups, dim=mask.dim() - 3) if mask.dim() > 2
                               else mask.float())
        elif is_causal:
            visible = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
            logits = logits.masked_fill(~visible, float("-inf"))
        recorder(module.layer_idx, logits.float().softmax(-1))  # (B, H_q, q_len, k_len)
    if mask is not None and mask.dim() == 3:
        # each KV head's query group is one batch row: the mask is never repeated per query head
        h_kv, d = key.shape[1], query.shape[-1]
        out = F.scaled_dot_product_attention(query.view(h_kv, groups, q_len, d), key[0][:, None], value[0][:, None],
                                             attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
        out = out.view(1, h_kv * groups, q_len, value.shape[-1])
    elif mask is not None and mask.dim() == 4:   # (B, H_kv, q_len, k_len): a window
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.repeat_interleave(groups, dim=1),
                                             scale=scaling, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                             scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _window_positions(layer_idx: int, key: torch.Tensor, position_ids: torch.Tensor | None,
                      q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of a windowed layer's queries ``(B, q_len)`` and keys ``(B, H_kv, k_len)``: the
    queries are the last ``q_len`` keys; the cached ones sit where ``_KEY_POSITIONS`` says (never
    where a cache length would put them), which then holds this layer's keys."""
    if position_ids is None:
        raise ValueError(f"layer {layer_idx}: a sliding-window layer needs the queries' position_ids")
    b, h_kv, k_len = key.shape[0], key.shape[1], key.shape[2]
    q_pos = position_ids.to(key.device).expand(b, q_len)
    new = q_pos[:, None, :].expand(b, h_kv, q_len)
    book = _KEY_POSITIONS.get()
    if k_len == q_len:
        k_pos = new
    else:
        cached = book[layer_idx] if book is not None else None
        if cached is None or cached.shape[-1] + q_len != k_len:
            raise ValueError(f"layer {layer_idx}: a sliding-window layer attends over a cache of {k_len - q_len} keys "
                             "whose positions knorm_lib does not know (build caches with knorm_lib: prefill, "
                             "KVCache.to_transformers, decode.in_place_cache); a cache length does not say where "
                             "a key sits once tokens are evicted")
        k_pos = torch.cat([cached.to(key.device).expand(b, h_kv, -1), new], dim=-1)
    if book is not None:
        book[layer_idx] = k_pos
    return q_pos, k_pos


# CPU SDPA walks keys in blocks of 512: cutting the keys at a multiple of 512 leaves every output
# bit unchanged (tested), any other cut does not.
_CPU_KEY_BLOCK = 512


def _streaming_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, evict: torch.Tensor,
                         scaling: float | None, window: tuple[int, torch.Tensor, bool] | None = None) -> torch.Tensor:
    """Attention of ``n`` queries over their own ``n`` keys, key ``j`` visible to query ``t`` iff ``j <= t <= evict[h, j]``
    and within ``window`` (``streaming_mask``); ``(1, n, H_q, D)``. On CPU a block of queries at a time over the
    keys up to the block's end only (5/8 of the work at 2,048 tokens, the same bits), and, windowed by
    position, from the block of 512 that holds the first key in the window; a last block of one query joins
    the one before (alone, SDPA takes another path for it, whose float32 rounding differs on some CPUs)."""
    n_kv_heads, n = evict.shape
    groups, d = query.shape[1] // n_kv_heads, query.shape[-1]
    block = _CPU_KEY_BLOCK if query.device.type == "cpu" else n
    evict = evict.to(query.device)
    starts = [s for s in range(0, n, block) if s == 0 or n - s > 1]
    outs = []
    for start, stop in zip(starts, starts[1:] + [n]):
        first = 0
        if window is not None and not window[2]:   # positions never decrease: keys before the window stay unseen
            first = int(torch.searchsorted(window[1], window[1][start] - window[0] + 1)) // _CPU_KEY_BLOCK * _CPU_KEY_BLOCK
        mask = streaming_mask(evict[:, :stop], query.dtype, rows=(start, stop), window=window)[..., first:]
        # each KV head's query group is one batch row: the mask is never repeated per query head
        q = query[0, :, start:stop].reshape(n_kv_heads, groups, stop - start, d)
        outs.append(F.scaled_dot_product_attention(q, key[0, :, None, first:stop], value[0, :, None, first:stop],
                                                   attn_mask=mask[:, None], scale=scaling, enable_gqa=True))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.view(1, n_kv_heads * groups, n, value.shape[-1]).transpose(1, 2).contiguous()


def _make_resumable(model: Any) -> None:
    """Under ``_RESUME = (start, hidden)`` the decoder layers before ``start`` pass their input
    through unchanged (the start layer's input replaces their output) and layer ``start`` takes
    ``hidden``; without it they run as they are. Once per model."""
    if getattr(model, "_knorm_resumable", False):
        return
    model._knorm_resumable = True
    for i, layer in enumerate(_layers(model)):
        def forward(hidden_states: torch.Tensor, *args: Any, _i: int = i, _forward: Callable = layer.forward,
                    **kwargs: Any) -> torch.Tensor:
            resume = _RESUME.get()
            if resume is not None and _i <= resume[0]:
                if _i < resume[0]:
                    return hidden_states
                hidden_states = resume[1]
            return _forward(hidden_states, *args, **kwargs)
        layer.forward = forward


def _register_attention() -> None:
    from transformers import AttentionInterface

    # cuDNN's attention plans every new key length afresh (tens of ms per decode step); flash,
    # memory-efficient and math kernels need no plan
    torch.backends.cuda.enable_cudnn_sdp(False)
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)


def _check_config(cfg: Any, arch: str) -> None:
    """The attention features ``check_supported`` refuses, read from the config (before any weights load)."""
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"model: {arch} uses attention logit softcapping (attn_logit_softcapping="
                         f"{cfg.attn_logit_softcapping}), which knorm_lib's attention function does not implement "
                         "(SDPA has no tanh on the scores); refusing rather than computing other numbers")


def check_supported(model: Any) -> None:
    """Refuse, naming the feature, a model this library cannot evaluate exactly. Supported:
    decoder-only RoPE models laid out like Llama (``model.model.layers[i].self_attn``, one
    ``model.model.rotary_emb``): Llama, SmolLM, Mistral and Phi-3 (with or without a sliding
    window), Qwen 2/3, OLMo 2 and Gemma 3 (text). Sliding windows are masks on true positions
    (``sliding_layers``); each layer type re-rotates with its own RoPE. Refused: other layouts and
    attention logit softcapping (Gemma 2)."""
    cfg = getattr(model, "config", None)
    arch = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if cfg is None or layers is None or getattr(inner, "rotary_emb", None) is None \
            or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"model: {arch} is not supported: knorm_lib evaluates decoder-only models with RoPE "
                         "attention laid out like Llama (model.model.layers[i].self_attn, model.model.rotary_emb)")
    _check_config(cfg, arch)


def _layers(model: Any) -> Sequence[torch.nn.Module]:
    return model.model.layers


def sliding_layers(model: Any) -> tuple[int, ...]:
    """The layers whose attention sees only the last ``config.sliding_window`` positions: Gemma 3's
    local layers (five in six), every layer of a Mistral or Phi-3 whose config sets a window, Qwen 2/3's
    layers from ``max_window_layers`` on with ``use_sliding_window``. A query at position ``p`` sees a
    key at ``j`` iff ``0 <= p - j < window``, positions as numbered: true positions (``absolute``) or,
    when new tokens are numbered by the cache's length, the cache slots that numbering implies.
    knorm_lib keeps whole caches and masks by position (transformers' own sliding caches drop all
    but the last window - 1 keys, which eviction would misplace)."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", None) is False:
        return ()
    types = getattr(cfg, "layer_types", None)
    return tuple(i for i in range(_n_layers(model)) if types is None or types[i] == "sliding_attention")


def _n_layers(model: Any) -> int:
    return len(_layers(model))


def _head_dim(model: Any) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
