"""5. Compression: what is kept (``keep_indices`` holds the tie rule), re-rotation, the KV footprint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from knorm_lib.checks import ORDERS, Order, _check_choice, _check_keep_ratio, _check_skip_layers
from knorm_lib.attention import _head_dim, _n_layers, sliding_layers
from knorm_lib.policies import LayerKV, PolicyOptions, _norms, resolve_policy

__all__ = ["n_kept_for", "KVCache", "keep_indices", "storage_order", "policy_scores", "compress_cache",
           "rerotate_keys", "LAYER_SCOPES", "layers_to_skip", "footprint"]


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
