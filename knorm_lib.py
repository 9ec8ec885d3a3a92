"""knorm_lib: KnormPress (keep the keys with the lowest L2 norm) and its measurement, exactly.

Readable top to bottom: 1 input checks, 2 the attention function and the models it supports, 3 data, 4 policies
(higher score = keep; ``register_policy``), 5 compression (``keep_indices`` holds the tie rule),
6 metrics, 7 prefill evaluation (``prefill_ppl``, ``sweep``), 8 streaming evaluation
(``streaming_ppl``, ``streaming_sweep``). The study machinery lives in ``knorm_study``, which
imports this module (``load_model`` and section 3's names are knorm_study.models' and .texts',
re-exported).

How to choose ``position_mode`` (the write-up's pitfall lives here):

* ``"absolute"``: new tokens keep their true positions. Correct: RoPE rotated every cached key
  at its own position, so attention over the kept keys is a set operation.
* ``"cache_relative"``: new tokens are numbered from the compressed cache length, what
  ``model(new_ids, past_key_values=cache)`` does without ``position_ids`` (transformers reads
  layer 0's length). Queries sit at the wrong distance from every key: the write-up's 39.68 ->
  155.91 jump.
* ``"rerotated"``: kept keys are re-rotated to contiguous slots in storage order and new tokens
  follow them (StreamingLLM's pos-shift, kvpress's ``KeyRerotationPress``). Only here does
  storage order (``order="by_norm"``) matter.

Evaluation is unpadded; the attention function builds its causal mask from each layer's own key
length, so layers may hold caches of different lengths (``skip_layers``), and a sliding-window
layer's mask from its keys' true positions (``sliding_layers``), never from a cache length.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "load_model", "check_supported", "recording_attention", "grouped_decoding",
    "LayerKV", "PolicyOptions", "POLICIES", "DYNAMIC_POLICIES", "KVPRESS_POLICIES", "LAYER_INPUT_POLICIES",
    "register_policy", "needs_layer_inputs", "has_qk_norm", "sliding_layers", "resolve_policy", "check_policy",
    "n_kept_for", "KVCache", "keep_indices", "storage_order", "policy_scores", "compress_cache", "rerotate_keys",
    "Reference", "token_metrics",
    "Prefill", "prefill", "continuation_logits", "full_logits", "reference_forward", "full_ppl",
    "EvalConfig", "EvalResult", "evaluate", "sweep", "prefill_ppl",
    "StreamingConfig", "budget_schedule", "eviction_steps", "dynamic_eviction_steps", "streaming_mask",
    "streaming_ppl", "streaming_sweep",
    "POSITION_MODES", "ORDERS", "LAYER_SCOPES", "layers_to_skip", "footprint",
]

PROJECT_ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("KNORM_DATA_DIR", PROJECT_ROOT / "data"))
DEFAULT_MODEL_DIR = DATA_DIR / "models" / "SmolLM2-135M-Instruct"
CORPUS_DIR = DATA_DIR / "corpora"
ATTN_IMPLEMENTATION = "knorm_study"

PositionMode = Literal["absolute", "cache_relative", "rerotated"]
Order = Literal["original", "by_norm"]
POSITION_MODES: tuple[str, ...] = ("absolute", "cache_relative", "rerotated")
ORDERS: tuple[str, ...] = ("original", "by_norm")


# ---- 1. Input checks: every entry point runs these before heavy work; errors name the argument ----

def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r}: must be a positive int")


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {what}")


def _check_list(name: str, v: Any, check: Callable[[Any], None]) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}={v!r}: must be a non-empty list")
    for item in v:
        check(item)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {choices}")


def _check_keep_ratio(keep_ratio: float) -> float:
    if not isinstance(keep_ratio, numbers.Real) or isinstance(keep_ratio, bool) or math.isnan(keep_ratio) \
            or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio!r}: must be a number in (0, 1]")
    return float(keep_ratio)


def _check_layer_list(name: str, layers: Any) -> tuple[int, ...]:
    if not isinstance(layers, (list, tuple, set, frozenset, range)) or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"{name}={layers!r}: must be a list of layer indices, e.g. (0, 1) or ()")
    return tuple(layers)


def _check_skip_layers(skip_layers: Iterable[int], n_layers: int) -> frozenset[int]:
    skip = frozenset(_check_layer_list("skip_layers", skip_layers))
    bad = [i for i in skip if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"skip_layers={tuple(skip_layers)!r}: {bad} outside the model's layers 0..{n_layers - 1}")
    return skip


def _check_device(device: Any) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (accelerate's device_map); MPS is refused because the tie
    rule and the metrics compute in float64, which MPS does not have."""
    kind = device.split(":")[0] if isinstance(device, str) else None
    if kind == "mps":
        raise ValueError("device='mps': not supported (knorm_lib breaks ties and computes metrics in float64, "
                         "which MPS lacks); use 'cpu'")
    _require(kind in ("cpu", "cuda", "auto") and (kind != "auto" or device == "auto"), "device", device,
             "'cpu', 'cuda', 'cuda:N' or 'auto'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available here")
    return device


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids: expected an integer tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected shape (1, n), got {tuple(input_ids.shape)} (batch size 1 only)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: empty input has no tokens to evaluate")
    return input_ids


def _check_vocab(model: Any, input_ids: torch.Tensor) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    if (vocab is not None and int(input_ids.max()) >= vocab) or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids: token ids must lie in 0..{vocab} - 1 (the model's vocabulary); "
                         f"got {int(input_ids.min())}..{int(input_ids.max())}")


def _check_context_len(context_len: int, n_tokens: int) -> None:
    if not isinstance(context_len, int) or isinstance(context_len, bool) or not 1 <= context_len < n_tokens - 1:
        raise ValueError(f"context_len={context_len!r}: must be an int with 1 <= context_len < number of "
                         f"tokens - 1 = {n_tokens - 1} (at least two tokens must follow the context)")


# ---- 2. The attention function and the models it supports (loading: knorm_study/models.py) ----------

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
    if evict is not None and recorder is None:
        return _streaming_attention(query, key, value, evict, scaling,
                                    window and (window, positions[0][0], by_slot)), None
    mask = streaming_mask(evict.to(query.device), query.dtype) if evict is not None else None
    is_causal = False
    if window:   # a predicate on positions: 0 <= p - j < window (and, streaming, not yet evicted)
        if evict is not None:
            mask = streaming_mask(evict.to(query.device), query.dtype, window=(window, positions[0][0], by_slot))
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


# ---- 3. Data: knorm_study/texts.py (corpora, documents, token sequences), its names re-exported ----

def __getattr__(name: str) -> Any:
    """The names knorm_study's ``texts`` and ``models`` define (the notebooks call ``kl.load_model``,
    ``kl.long_documents``), imported on first use: those modules import this one."""
    from knorm_study import models, texts

    for module in (texts, models):
        if name in module.EXPORTED:
            return getattr(module, name)
    raise AttributeError(f"module 'knorm_lib' has no attribute {name!r}")


# ---- 4. Scores and policies (higher score = keep) -------------------------------------------------

@dataclass
class LayerKV:
    """What a policy sees of one layer: keys/values ``(B, H_kv, S, D)``, original positions
    ``(B, H_kv, S)``, the layer's inputs (kvpress presses), attention received (dynamic policies)."""
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    layer_idx: int
    module: torch.nn.Module | None = None
    hidden_states: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_mass: torch.Tensor | None = None
    budget: int | None = None   # tokens to keep at this step (streaming)


@dataclass(frozen=True)
class PolicyOptions:
    seed: int = 0     # ``random``
    n_sink: int = 4   # ``streaming``

    def __post_init__(self) -> None:
        for name, value, low in (("seed", self.seed, None), ("n_sink", self.n_sink, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise ValueError(f"{name}={value!r}: must be an int" + (f" >= {low}" if low is not None else ""))


ScoreFn = Callable[[LayerKV, PolicyOptions], torch.Tensor]
POLICIES: dict[str, ScoreFn] = {}


def register_policy(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """``@register_policy("mine")`` on ``def mine(kv, opts) -> scores (B, H_kv, S)`` makes
    ``policy="mine"`` work everywhere."""
    def wrap(fn: ScoreFn) -> ScoreFn:
        POLICIES[name] = fn
        return fn
    return wrap


def _norms(keys: torch.Tensor) -> torch.Tensor:
    # float32 on purpose: bf16 norms tie heavily (kvpress does the same).
    return keys.float().norm(dim=-1)


@register_policy("knorm")
def knorm_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """KnormPress: keep the lowest key norms."""
    return -_norms(kv.keys)


@register_policy("high_norm")
def high_norm_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """Ablation: keep the highest key norms (the paper finds this worse than random)."""
    return _norms(kv.keys)


def _hash_uniform(positions: torch.Tensor, layer_idx: int, seed: int) -> torch.Tensor:
    """Uniform in [0, 1) per (seed, layer, KV head, position): streaming and prefill runs draw the
    same score for the same token."""
    heads = torch.arange(positions.shape[1], device=positions.device).view(1, -1, 1)
    x = (positions * 0x9E3779B1 + heads * 0x85EBCA77 + layer_idx * 0xC2B2AE3D + seed * 0x27D4EB2F) & 0xFFFFFFFF
    for _ in range(2):  # integer mixing (all intermediate values stay below 2**63)
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x ^ (x >> 16)).double() / 2.0**32).float()


@register_policy("random")
def random_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """Uniform random, seeded: the same (seed, layer, head, token) always draws the same score."""
    return _hash_uniform(kv.positions, kv.layer_idx, opts.seed)


@register_policy("streaming")
def streaming_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """StreamingLLM: the first ``n_sink`` tokens (the first last to go), then the most recent ones;
    2**23 keeps the scores exact in float32."""
    pos = kv.positions.float()
    return torch.where(kv.positions < opts.n_sink, 2.0**23 + opts.n_sink - pos, pos)


def _h2o_recent(budget: int) -> int:
    return budget // 2   # H2O's even split of the budget: recent tokens, then heavy hitters


@register_policy("h2o")
def h2o_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """H2O: the most recent half of the budget, then the most attention received so far. Dynamic
    (scores grow with later queries): streaming protocol only."""
    if kv.attention_mass is None or kv.budget is None:
        raise ValueError("policy='h2o' is dynamic (it needs the attention each token received so far): "
                         "use it with streaming_ppl, not with prefill compression")
    n_recent = _h2o_recent(kv.budget)
    newest = kv.positions.amax(dim=-1, keepdim=True)
    recent = kv.positions > newest - n_recent
    return torch.where(recent, kv.attention_mass.new_full((), float("inf")), kv.attention_mass)


DYNAMIC_POLICIES: tuple[str, ...] = ("h2o",)


def _key_before_norm(kv: LayerKV) -> torch.Tensor | None:
    """The layer's keys ``(B, H_kv, S, D)`` as ``k_proj`` gives them, before QK-norm's ``k_norm``
    (and RoPE); ``None`` for a layer without ``k_norm``."""
    if getattr(kv.module, "k_norm", None) is None:
        return None
    keys = kv.module.k_proj(kv.hidden_states)   # (B, S, H_kv * D): OLMo 2 normalises all heads at once
    return keys.view(*keys.shape[:2], kv.keys.shape[1], -1).transpose(1, 2)


@register_policy("knorm_prenorm")
def knorm_prenorm_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """KnormPress on the key before QK-norm: keep the lowest norms of ``k_proj``'s output (QK-norm
    rescales every cached key to one RMS before its gain, so the cached key's norm may have lost
    the key's size). Without ``k_norm`` that is the cached key's norm (RoPE preserves norms), so it
    ranks exactly as ``knorm``. Needs the layer's inputs (prefill; the one-pass engine)."""
    if kv.module is None or kv.hidden_states is None:
        raise ValueError("policy='knorm_prenorm' scores k_proj's output: it needs the layer's inputs "
                         "(prefill(..., capture_hidden=True); streaming: engine='one_pass')")
    before = _key_before_norm(kv)
    return -_norms(kv.keys if before is None else before)


# registered policies that score the layer's inputs, as the kvpress presses do
LAYER_INPUT_POLICIES: tuple[str, ...] = ("knorm_prenorm",)


def has_qk_norm(model: Any) -> bool:
    """Its attention layers normalise keys before caching them (``k_norm``: Qwen 3, OLMo 2, Gemma 3)."""
    return any(getattr(layer.self_attn, "k_norm", None) is not None for layer in _layers(model))


def applicable_policies(model: Any, policies: Sequence[str]) -> list[str]:
    """``policies`` as a study runs them on ``model``: ``knorm_prenorm`` only where the model has
    QK-norm (elsewhere it ranks exactly as ``knorm``, tested), so its rows never copy knorm's."""
    return [p for p in policies if p not in LAYER_INPUT_POLICIES or has_qk_norm(model)]


KVPRESS_POLICIES: dict[str, str] = {"snapkv": "SnapKVPress", "tova": "TOVAPress",
                                    "expected_attention": "ExpectedAttentionPress"}


def _press_score_fn(press: Any) -> ScoreFn:
    def score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
        if kv.hidden_states is None or kv.module is None:
            raise ValueError("policy: kvpress presses need the prefill's hidden states; "
                             "use prefill(..., capture_hidden=True) (prefill_ppl and sweep do it)")
        kwargs = {"position_embeddings": kv.position_embeddings,
                  "cache_position": torch.arange(kv.keys.shape[2], device=kv.keys.device)}
        return press.score(kv.module, kv.hidden_states, kv.keys, kv.values, None, kwargs).float()
    return score


def _make_kvpress(name: str) -> Any:
    import kvpress

    return getattr(kvpress, KVPRESS_POLICIES[name])()


def needs_layer_inputs(policy: str | Any) -> bool:
    """The policy scores the layer's inputs (kvpress presses, ``LAYER_INPUT_POLICIES``): its
    prefill needs ``capture_hidden=True``."""
    return not isinstance(policy, str) or policy in KVPRESS_POLICIES or policy in LAYER_INPUT_POLICIES


def resolve_policy(policy: str | Any) -> tuple[str, ScoreFn, bool]:
    """``(name, score_fn, needs_hidden_states)`` for a policy name or a kvpress ``ScorerPress``."""
    if isinstance(policy, str):
        if policy in POLICIES:
            return policy, POLICIES[policy], policy in LAYER_INPUT_POLICIES
        if policy in KVPRESS_POLICIES:
            return policy, _press_score_fn(_make_kvpress(policy)), True
        raise ValueError(f"policy={policy!r}: unknown; choose one of "
                         f"{sorted(POLICIES) + sorted(KVPRESS_POLICIES)} or pass a kvpress ScorerPress")
    if hasattr(policy, "score") and hasattr(policy, "compression_ratio"):
        return type(policy).__name__, _press_score_fn(policy), True
    raise ValueError(f"policy={policy!r}: expected a policy name or a kvpress ScorerPress instance")


def check_policy(name: str, policy: Any, protocol: Literal["prefill", "streaming"]) -> None:
    """``policy`` (argument ``name``) is a name ``protocol`` can run: prefill takes the policies whose
    score is fixed once the key exists and the kvpress presses; streaming, the registered policies
    (the dynamic ones, h2o, included)."""
    _require(isinstance(policy, str), name, policy, "a policy name")
    if policy not in POLICIES and policy not in KVPRESS_POLICIES:
        raise ValueError(f"{name}={policy!r}: unknown; choose one of {sorted(POLICIES) + sorted(KVPRESS_POLICIES)}")
    if protocol == "prefill":
        _require(policy not in DYNAMIC_POLICIES, name, policy, "a policy whose score is fixed once the key exists; "
                 f"{policy} is dynamic (it needs the attention each token received so far): streaming protocol only")
    else:
        _require(policy in POLICIES, name, policy, f"one of {sorted(POLICIES)} (kvpress presses score the "
                 "prefill's hidden states: prefill protocol only)")


# ---- 5. Compression -------------------------------------------------------------------------------

def n_kept_for(n: int, keep_ratio: float) -> int:
    """Tokens kept out of ``n``: exactly kvpress's ``compute_n_kept(n, 1 - keep_ratio)``."""
    compression_ratio = 1 - _check_keep_ratio(keep_ratio)
    return max(1, int(n * (1 - compression_ratio)))


@dataclass
class KVCache:
    """Per layer ``keys``/``values`` ``(B, H_kv, S_l, D)`` and original ``positions`` ``(B, H_kv, S_l)``
    (layers may differ in length), and ``seq_len``, the tokens seen."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    seq_len: int

    @classmethod
    def from_transformers(cls, cache: Any) -> "KVCache":
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        b, h, s, _ = keys[0].shape
        pos = torch.arange(s, device=keys[0].device).expand(b, h, s)
        return cls(keys, values, [pos] * len(keys), s)

    def to_transformers(self) -> Any:
        """A transformers ``DynamicCache`` holding a copy (later updates never touch ``self``)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, i)
        cache.knorm_positions = list(self.positions)   # where each key sits (sliding windows read it)
        return cache

    def lengths(self) -> list[int]:
        return [k.shape[2] for k in self.keys]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def keep_indices(scores: torch.Tensor, positions: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (last dim) of the ``n_keep`` highest ``scores``: THE TIE RULE of every ranking here.
    Equal scores keep the newest token. Every ranking (prefill, both streaming engines, the
    attention-loss study) follows it, so a kept set never depends on how ``topk`` orders ties."""
    by_position = positions.argsort(dim=-1, descending=True, stable=True)
    by_score = scores.gather(-1, by_position).argsort(dim=-1, descending=True, stable=True)
    return by_position.gather(-1, by_score)[..., :n_keep]


def storage_order(idx: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, order: Order) -> torch.Tensor:
    """Kept indices ``idx`` in storage order: by position (``"original"``) or by ascending key norm,
    ties by position (``"by_norm"``, the paper's code)."""
    idx = idx.gather(-1, positions.gather(-1, idx).argsort(dim=-1, stable=True))
    if order == "by_norm":
        idx = idx.gather(-1, _norms(keys).gather(-1, idx).argsort(dim=-1, stable=True))
    return idx


def _gather_kept(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, gather_idx), values.gather(2, gather_idx), positions.gather(-1, idx)


@torch.inference_mode()
def policy_scores(cache: KVCache, policy: str | Any, options: PolicyOptions = PolicyOptions(),
                  layer_inputs: dict[int, dict] | None = None,
                  skip: Iterable[int] = ()) -> list[torch.Tensor | None]:
    """One score tensor ``(B, H_kv, S)`` per layer (``None`` for skipped layers)."""
    _, score_fn, needs_hidden = resolve_policy(policy)
    if needs_hidden and not layer_inputs:
        raise ValueError("policy: kvpress presses need the prefill's hidden states; "
                         "use prefill(..., capture_hidden=True)")
    skip = set(skip)
    out: list[torch.Tensor | None] = []
    for i, (k, v, p) in enumerate(zip(cache.keys, cache.values, cache.positions)):
        if i in skip:
            out.append(None)
            continue
        extra = (layer_inputs or {}).get(i, {})
        out.append(score_fn(LayerKV(k, v, p, i, **extra), options))
    return out


@torch.inference_mode()
def compress_cache(cache: KVCache, keep_ratio: float, policy: str | Any = "knorm",
                   skip_layers: Iterable[int] = (0, 1), order: Order = "original",
                   options: PolicyOptions = PolicyOptions(), layer_inputs: dict[int, dict] | None = None,
                   scores: list[torch.Tensor] | None = None) -> KVCache:
    """Keep, per layer and KV head, the ``n_kept_for(S, keep_ratio)`` highest-scored tokens (knorm:
    lowest key norms); ``skip_layers`` stay whole (the paper's ``(0, 1)``). ``order``: see
    ``storage_order``. ``scores`` (per layer ``(B, H_kv, S)``) skips re-scoring."""
    keep_ratio = _check_keep_ratio(keep_ratio)
    skip = _check_skip_layers(skip_layers, len(cache.keys))
    _check_choice("order", order, ORDERS)
    if scores is None:
        scores = policy_scores(cache, policy, options, layer_inputs, skip)
    keys, values, positions = [], [], []
    for i, (k, v, p) in enumerate(zip(cache.keys, cache.values, cache.positions)):
        if i in skip or (keep_ratio == 1.0 and order == "original"):
            keys.append(k), values.append(v), positions.append(p)
            continue
        idx = storage_order(keep_indices(scores[i], p, n_kept_for(k.shape[2], keep_ratio)), p, k, order)
        for out, kept in zip((keys, values, positions), _gather_kept(k, v, p, idx)):
            out.append(kept)
    return KVCache(keys, values, positions, cache.seq_len)


def _rotate(keys: torch.Tensor, delta: torch.Tensor, model: Any, layer_idx: int) -> torch.Tensor:
    """Apply RoPE by ``delta`` positions (per token, may be negative) to already-rotated keys, with
    layer ``layer_idx``'s rotary parameters (Gemma 3: one base per layer type)."""
    rotary = model.model.rotary_emb
    layer_types = getattr(rotary, "layer_types", None)   # per-layer-type parameters
    layer_type = model.config.layer_types[layer_idx] if layer_types else None
    prefix = f"{layer_type}_" if layer_type else ""
    b, h, s, d = keys.shape
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    rotated_dims = 2 * inv_freq.numel() if inv_freq is not None else d
    if rotated_dims != d:
        raise ValueError(f"position_mode='rerotated': this model rotates {rotated_dims} of {d} dimensions per head "
                         "(partial RoPE); re-rotation supports full RoPE only")
    positions = delta.reshape(1, -1).to(keys.device)
    cos, sin = rotary(keys, positions, layer_type) if layer_type else rotary(keys, positions)
    scale = getattr(rotary, f"{prefix}attention_scaling", 1.0)
    cos = (cos / scale).reshape(b, h, s, d).to(keys.dtype)
    sin = (sin / scale).reshape(b, h, s, d).to(keys.dtype)
    half = d // 2
    rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated_half * sin


def _slots(positions: torch.Tensor, next_position: int) -> torch.Tensor:
    """A layer's entries (``positions``, storage order) numbered as contiguous slots ending before
    ``next_position``: where a cache-length numbering puts them."""
    s = positions.shape[-1]
    return torch.arange(s, device=positions.device).expand_as(positions) + (next_position - s)


def _to_slots(keys: torch.Tensor, rotated_at: torch.Tensor, next_position: int,
              model: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys`` (rotated at ``rotated_at``) re-rotated to contiguous slots ending before ``next_position``."""
    slots = _slots(rotated_at, next_position)
    return _rotate(keys, slots - rotated_at, model, layer_idx), slots


def rerotate_keys(cache: KVCache, model: Any) -> tuple[KVCache, int]:
    """Each kept key moved to a contiguous slot in storage order (StreamingLLM's pos-shift), and the
    next token's position. Longer (skipped) layers shift as a whole, so their attention stays exact."""
    next_position = min(cache.lengths())
    moved = [_to_slots(k, p, next_position, model, i) for i, (k, p) in enumerate(zip(cache.keys, cache.positions))]
    return KVCache([k for k, _ in moved], list(cache.values), [p for _, p in moved], cache.seq_len), next_position


LAYER_SCOPES: tuple[str, ...] = ("all", "global")


def layers_to_skip(model: Any, skip_layers: Iterable[int] = (0, 1), compress: str = "all") -> tuple[int, ...]:
    """The ``skip_layers`` argument that compresses what ``compress`` names on a hybrid model:
    ``"all"``, every layer outside ``skip_layers`` (the paper's rule, literally); ``"global"``, only
    the full-attention layers outside them (kvpress's rule for Gemma 3: a local layer never holds
    more than its window, so compressing it saves little memory at long contexts and changes what
    the window sees). On a model without windows both are ``skip_layers``."""
    _check_choice("compress", compress, LAYER_SCOPES)
    skip = _check_skip_layers(skip_layers, _n_layers(model))
    return tuple(sorted(skip | set(sliding_layers(model)) if compress == "global" else skip))


def _layer_type(model: Any, layer_idx: int) -> str:
    return "sliding_attention" if layer_idx in sliding_layers(model) else "full_attention"


def footprint(model: Any, held: Sequence[torch.Tensor], seq_len: int) -> dict[str, dict[str, float]]:
    """Per layer type, what the next query (position ``seq_len``) can still read, from the positions
    ``held`` per layer ``(B, H_kv, S)`` (true positions): ``kv_bytes`` of those entries and
    ``kept_fraction``, their number over what the uncompressed layer would offer (a local layer: the
    last ``window - 1`` positions, as transformers' sliding cache keeps; an older key is never read again)."""
    window = getattr(model.config, "sliding_window", None)
    per_entry = 2 * _head_dim(model) * next(model.parameters()).element_size()
    out: dict[str, dict[str, float]] = {}
    for i, pos in enumerate(held):
        kind = _layer_type(model, i)
        if kind == "sliding_attention":
            readable, offered = int((pos > seq_len - window).sum()), pos.shape[0] * pos.shape[1] * min(seq_len, window - 1)
        else:
            readable, offered = pos.numel(), pos.shape[0] * pos.shape[1] * seq_len
        row = out.setdefault(kind, {"layers": 0, "kv_bytes": 0, "entries": 0, "offered": 0})
        row["layers"] += 1
        row["kv_bytes"] += readable * per_entry
        row["entries"] += readable
        row["offered"] += offered
    return {kind: {"layers": r["layers"], "kv_bytes": r["kv_bytes"], "kept_fraction": r["entries"] / r["offered"]}
            for kind, r in out.items()}


# ---- 6. Metrics -----------------------------------------------------------------------------------

def _metrics_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class Reference:
    """The uncompressed logits ``(T, vocab)`` with their per-row terms for ``token_metrics``
    (log-sum-exp, ``sum p_ref * ref``, argmax), computed once per sweep, and (``reference_forward``)
    the hidden state that entered some layers in that forward."""
    logits: torch.Tensor
    lse: torch.Tensor
    self_dot: torch.Tensor
    top1: torch.Tensor
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, logits: torch.Tensor, dtype: torch.dtype | None = None, chunk: int = 32,
           layer_inputs: dict[int, torch.Tensor] | None = None) -> "Reference":
        dtype = dtype or _metrics_dtype(logits)
        parts: tuple[list[torch.Tensor], ...] = ([], [], [])
        for start in range(0, logits.shape[0], chunk):
            ref = logits[start:start + chunk].to(dtype)
            lse = ref.logsumexp(-1)
            for out, value in zip(parts, (lse, torch.linalg.vecdot((ref - lse[:, None]).exp_(), ref), ref.argmax(-1))):
                out.append(value)
        return cls(logits, *(torch.cat(v) for v in parts), layer_inputs or {})

    def __getitem__(self, rows: slice) -> "Reference":
        return Reference(self.logits[rows], self.lse[rows], self.self_dot[rows], self.top1[rows])


def token_metrics(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | Reference,
                  chunk: int = 32) -> dict[str, torch.Tensor]:
    """Per-token NLL, correctness, KL(reference || logits) and top-1 agreement with the reference,
    in row chunks (memory: a few ``chunk x vocab`` blocks; ``KL = sum p_ref (ref - x) - lse(ref) +
    lse(x)`` needs one exp pass)."""
    ref_all = ref_logits if isinstance(ref_logits, Reference) else Reference.of(ref_logits, chunk=chunk)
    dtype = _metrics_dtype(logits, ref_all.logits)
    if ref_all.lse.dtype != dtype:
        ref_all = Reference.of(ref_all.logits, dtype, chunk)
    targets = targets.to(logits.device)
    ref_all = Reference(*(t.to(logits.device) for t in (ref_all.logits, ref_all.lse, ref_all.self_dot, ref_all.top1)))
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "correct": [], "kl": [], "top1_agree": []}
    for start in range(0, logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        x, ref, ref_lse = logits[rows].to(dtype), ref_all.logits[rows].to(dtype), ref_all.lse[rows]
        tgt = targets[rows].view(-1, 1)
        lse = x.logsumexp(-1)
        ref_p = (ref - ref_lse[:, None]).exp_()
        kl = ref_all.self_dot[rows] - torch.linalg.vecdot(ref_p, x) - ref_lse + lse
        pred = x.argmax(-1)
        parts["nll"].append((lse - x.gather(-1, tgt).squeeze(-1)).cpu())
        parts["kl"].append(kl.clamp_min(0.0).cpu())
        parts["correct"].append((pred == tgt.squeeze(-1)).cpu())
        parts["top1_agree"].append((pred == ref_all.top1[rows]).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


# ---- 7. Prefill evaluation (kvpress's protocol: compress once after the context) ------------------

@dataclass
class Prefill:
    cache: KVCache
    last_logits: torch.Tensor                       # (1, vocab): predicts the token after the context
    layer_inputs: dict[int, dict] | None = None     # per layer: module, hidden_states, position_embeddings


class _LayerRotary(torch.nn.Module):
    """One layer type's rotary embedding, called as kvpress's presses call a layer's
    ``rotary_emb(x, position_ids)`` (a model with one RoPE per layer type takes the type too)."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str) -> None:
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)


@contextlib.contextmanager
def _capture_layer_inputs(model: Any, store: dict[int, dict]) -> Iterator[None]:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        store[module.layer_idx] = {"module": module, "hidden_states": hidden,
                                   "position_embeddings": kwargs.get("position_embeddings")}

    rotary = model.model.rotary_emb
    for i, layer in enumerate(_layers(model)):  # some presses (ExpectedAttention) read RoPE from the layer, as kvpress arranges
        if not hasattr(layer.self_attn, "rotary_emb"):
            per_type = getattr(rotary, "layer_types", None)   # Gemma 3: the layer's own type's RoPE
            layer.self_attn.rotary_emb = _LayerRotary(rotary, model.config.layer_types[i]) if per_type else rotary
    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in _layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def prefill(model: Any, input_ids: torch.Tensor, capture_hidden: bool = False) -> Prefill:
    """One forward: the full cache, the last logits and, with ``capture_hidden``, each attention
    layer's inputs (kvpress presses)."""
    from transformers import DynamicCache

    input_ids = _check_ids(input_ids).to(model.device)
    _check_vocab(model, input_ids)
    store: dict[int, dict] = {}
    ctx = _capture_layer_inputs(model, store) if capture_hidden else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    return Prefill(KVCache.from_transformers(out.past_key_values), out.logits[:, -1].float(),
                   store if capture_hidden else None)


def _numbered(cache: KVCache, model: Any, position_mode: PositionMode) -> tuple[KVCache, int]:
    """The cache to attend to and the next token's position under ``position_mode``; its
    ``positions`` are where the numbering puts each key (a window reads them): true positions
    (``absolute``), or contiguous slots before the next token (``cache_relative``, ``rerotated``)."""
    _check_choice("position_mode", position_mode, POSITION_MODES)
    if position_mode == "rerotated":
        return rerotate_keys(cache, model)
    if position_mode == "absolute":
        return cache, cache.seq_len
    start = min(cache.lengths())
    return replace(cache, positions=[_slots(p, start) for p in cache.positions]), start


@torch.inference_mode()
def continuation_logits(model: Any, cache: KVCache, new_ids: torch.Tensor,
                        position_mode: PositionMode = "absolute") -> torch.Tensor:
    """Logits ``(T, vocab)`` of ``new_ids`` fed teacher-forced in one forward over ``cache``,
    numbered by ``position_mode`` (see the module docstring)."""
    cache, start = _numbered(cache, model, position_mode)
    t = new_ids.shape[-1]
    position_ids = torch.arange(start, start + t, device=model.device)[None]
    past = cache.to_transformers()
    with _over(past):
        out = model(input_ids=new_ids.to(model.device).view(1, -1), past_key_values=past,
                    position_ids=position_ids, use_cache=True)
    return out.logits[0]


@torch.inference_mode()
def full_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` of the uncompressed model (the reference for KL and agreement)."""
    return model(input_ids=_check_ids(input_ids).to(model.device), use_cache=False).logits[0]


def _first_compressed(skip_layers: Iterable[int]) -> int:
    skip, i = set(skip_layers), 0
    while i in skip:
        i += 1
    return i


def reference_forward(model: Any, input_ids: torch.Tensor, cache: KVCache | None = None,
                      layers: Iterable[int] = ()) -> Reference:
    """The uncompressed forward of ``input_ids`` (``full_logits``, or after ``cache`` as
    ``continuation_logits``) as a ``Reference`` holding the hidden state that entered each of
    ``layers``: a later forward of the same tokens at the same positions whose layers before one of
    them are all skipped starts there (``_resumed``), so a sweep runs the skipped layers once per text."""
    _make_resumable(model)
    inputs: dict[int, torch.Tensor] = {}
    thread = threading.get_ident()

    def keep(i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if threading.get_ident() == thread:   # not another thread's forward of the same model
                inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    handles = [_layers(model)[i].register_forward_pre_hook(keep(i), with_kwargs=True)
               for i in set(layers) if 0 < i < _n_layers(model)]
    try:
        logits = full_logits(model, input_ids) if cache is None else continuation_logits(model, cache, input_ids)
    finally:
        for h in handles:
            h.remove()
    return Reference.of(logits, layer_inputs=inputs)


def _resumed(reference: torch.Tensor | Reference | None, skip_layers: Iterable[int],
             same_positions: bool) -> contextlib.AbstractContextManager:
    """Within the block the model's forward starts at the first compressed layer from the input the
    reference forward gave it, when recorded and the positions are the reference's: the skipped
    layers before it would compute exactly that again (tested bit for bit)."""
    start = _first_compressed(skip_layers)
    hidden = reference.layer_inputs.get(start) if isinstance(reference, Reference) and same_positions else None
    return _using(_RESUME, (start, hidden)) if hidden is not None else contextlib.nullcontext()


@torch.inference_mode()
def full_ppl(model: Any, input_ids: torch.Tensor) -> float:
    """The uncompressed model's perplexity on tokens 1..n-1: a baseline, not a compression result."""
    input_ids = _check_ids(input_ids).to(model.device)
    _check_vocab(model, input_ids)
    if input_ids.shape[1] < 2:
        raise ValueError("input_ids: need at least two tokens")
    logits = model(input_ids=input_ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits.float(), input_ids[0, 1:]).item())


@dataclass(frozen=True)
class EvalConfig:
    keep_ratio: float = 1.0
    policy: str = "knorm"
    skip_layers: tuple[int, ...] = (0, 1)
    order: Order = "original"
    position_mode: PositionMode = "absolute"
    seed: int = 0
    n_sink: int = 4

    def validate(self, n_layers: int) -> None:
        _check_keep_ratio(self.keep_ratio)
        check_policy("policy", self.policy, "prefill")
        _check_skip_layers(self.skip_layers, n_layers)
        _check_choice("order", self.order, ORDERS)
        _check_choice("position_mode", self.position_mode, POSITION_MODES)
        PolicyOptions(self.seed, self.n_sink)


@dataclass
class EvalResult:
    """Per-token metrics of one configuration, one value per scored token (prefill: tokens
    ``context_len+1 .. n-1``; streaming: ``1 .. n-1``)."""
    config: EvalConfig
    nll: torch.Tensor
    correct: torch.Tensor
    kl: torch.Tensor
    top1_agree_mask: torch.Tensor
    n_kept: int
    context_len: int
    cache_bytes: int
    meta: dict = field(default_factory=dict)
    evictions: dict | None = None   # streaming: layer -> eviction step per (KV head, token)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.mean().item())

    @property
    def next_token_acc(self) -> float:
        return self.correct.float().mean().item()

    @property
    def kl_mean(self) -> float:
        return self.kl.mean().item()

    @property
    def top1_agree(self) -> float:
        return self.top1_agree_mask.float().mean().item()

    def summary(self) -> dict[str, Any]:
        """Plain numbers (for tables and JSON results)."""
        cfg = asdict(self.config)
        cfg["skip_layers"] = list(cfg["skip_layers"])
        return {**cfg, "ppl": self.ppl, "mean_nll": self.nll.mean().item(), "next_token_acc": self.next_token_acc,
                "kl": self.kl_mean, "top1_agree": self.top1_agree, "n_kept": self.n_kept,
                "context_len": self.context_len, "n_scored": int(self.nll.numel()), "cache_bytes": self.cache_bytes,
                **self.meta}


def _n_kept_reported(context_len: int, keep_ratio: float, skip_layers: Sequence[int], model: Any) -> int:
    """Tokens per head a compressed layer keeps; the whole context when every layer is skipped."""
    if len(set(skip_layers)) >= _n_layers(model):
        return context_len
    return n_kept_for(context_len, keep_ratio)


def _is_identity(cfg: EvalConfig) -> bool:
    return cfg.keep_ratio == 1.0 and cfg.order == "original" and cfg.position_mode == "absolute"


def _progress(items: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, mininterval=10)  # plain tqdm: papermill-safe


def evaluate(model: Any, pre: Prefill, new_ids: torch.Tensor, targets: torch.Tensor, cfg: EvalConfig,
             reference_logits: torch.Tensor | Reference,
             scores: list[torch.Tensor] | None = None) -> tuple[EvalResult, KVCache]:
    """Compress ``pre.cache`` (``scores``: the policy's, if known), feed ``new_ids`` teacher-forced and
    score against ``targets`` and ``reference_logits``; returns the result and the compressed cache."""
    cache = compress_cache(pre.cache, cfg.keep_ratio, cfg.policy, cfg.skip_layers, cfg.order,
                           PolicyOptions(cfg.seed, cfg.n_sink), pre.layer_inputs, scores)
    if _is_identity(cfg):
        logits = reference_logits.logits if isinstance(reference_logits, Reference) else reference_logits
    else:
        with _resumed(reference_logits, cfg.skip_layers, cfg.position_mode == "absolute"):
            logits = continuation_logits(model, cache, new_ids, cfg.position_mode)
    m = token_metrics(logits, targets, reference_logits)
    context_len = pre.cache.seq_len
    n_kept = _n_kept_reported(context_len, cfg.keep_ratio, cfg.skip_layers, model)
    meta = {"by_layer_type": footprint(model, cache.positions, context_len)} if sliding_layers(model) else {}
    return EvalResult(cfg, m["nll"], m["correct"], m["kl"], m["top1_agree"], n_kept, context_len,
                      cache.nbytes(), meta), cache


def sweep(model: Any, input_ids: torch.Tensor, context_len: int, configs: Sequence[EvalConfig],
          progress: bool = False, reference_logits: torch.Tensor | None = None,
          pre: Prefill | None = None) -> list[EvalResult]:
    """Many configurations on one input with ONE prefill (compression only reads the prefill's cache,
    so this is exact); scores computed once per policy. ``reference_logits`` (the uncompressed
    continuation's) skips that forward; ``pre``: the context's prefill, if the caller has it."""
    input_ids = _check_ids(input_ids)
    _check_context_len(context_len, input_ids.shape[1])
    if isinstance(configs, EvalConfig) or not all(isinstance(c, EvalConfig) for c in configs):
        raise ValueError(f"configs={configs!r}: must be a list of EvalConfig (e.g. [EvalConfig(keep_ratio=0.5)])")
    _check_vocab(model, input_ids)
    for cfg in configs:
        cfg.validate(_n_layers(model))
    needs_hidden = any(needs_layer_inputs(cfg.policy) for cfg in configs)
    if pre is None:
        pre = prefill(model, input_ids[:, :context_len], capture_hidden=needs_hidden)
    elif pre.cache.seq_len != context_len or (needs_hidden and pre.layer_inputs is None):
        raise ValueError(f"pre: must be the prefill of the first context_len={context_len} tokens"
                         + (" with capture_hidden=True (policies scoring the layer's inputs)" if needs_hidden else "")
                         + f"; got one of {pre.cache.seq_len} tokens")
    new_ids, targets = input_ids[:, context_len:-1], input_ids[0, context_len + 1:].to(model.device)
    starts = {_first_compressed(c.skip_layers) for c in configs if c.position_mode == "absolute"}
    ref_logits = (Reference.of(reference_logits) if reference_logits is not None
                  else reference_forward(model, new_ids, pre.cache, starts))
    score_cache: dict[tuple, list] = {}
    results = []
    for cfg in _progress(configs, "configurations", progress):
        key = (cfg.policy, cfg.seed, cfg.n_sink)
        if key not in score_cache:
            score_cache[key] = policy_scores(pre.cache, cfg.policy, PolicyOptions(cfg.seed, cfg.n_sink),
                                             pre.layer_inputs)
        results.append(evaluate(model, pre, new_ids, targets, cfg, ref_logits, score_cache[key])[0])
    return results


def prefill_ppl(model: Any, input_ids: torch.Tensor, context_len: int, keep_ratio: float,
                policy: str = "knorm", skip_layers: Sequence[int] = (0, 1), order: Order = "original",
                position_mode: PositionMode = "absolute", seed: int = 0, n_sink: int = 4) -> EvalResult:
    """kvpress's protocol (the write-up's "Method 2"): prefill ``context_len`` tokens, compress once,
    score the rest teacher-forced against the true tokens and the uncompressed cache's forward."""
    cfg = EvalConfig(keep_ratio, policy, _check_layer_list("skip_layers", skip_layers), order, position_mode, seed, n_sink)
    return sweep(model, input_ids, context_len, [cfg])[0]


# ---- 8. Streaming evaluation (the paper's LM protocol, the write-up's "Method 1") -----------------

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
