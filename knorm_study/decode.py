"""Greedy decoding on a compressed cache (the explorer, 05's passkey answers and generations, 06's
TPOT probes): compress the prefill's cache once, then decode one token per forward.

The decode cache appends in place: each layer is preallocated for the tokens to come, filled once
from the compressed ``kl.KVCache`` and read through views, so a step never copies the cache (as
transformers' ``DynamicCache`` does with ``torch.cat``). Layers may hold different lengths
(``skip_layers``). Decode steps use grouped-query attention (``kl.grouped_decoding``)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

import knorm_lib as kl


@functools.cache
def _in_place_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A cache layer that appends in place: ``keys``/``values`` are views of a preallocated buffer."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
            super().__init__()
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.n = 0
            self._k, self._v = keys[:, :, :0], values[:, :, :0]
            self._write(keys, values, room)

        def _write(self, k: torch.Tensor, v: torch.Tensor, room: int = 0) -> None:
            end = self.n + k.shape[2]
            if end > self._k.shape[2]:  # outrun (or the first fill): a bigger buffer, old contents copied once
                size = max(end + room, 2 * self._k.shape[2])
                old_k, old_v = self._k[:, :, :self.n], self._v[:, :, :self.n]
                self._k = k.new_empty(*k.shape[:2], size, k.shape[3])
                self._v = v.new_empty(*v.shape[:2], size, v.shape[3])
                self._k[:, :, :self.n], self._v[:, :, :self.n] = old_k, old_v
            self._k[:, :, self.n:end], self._v[:, :, self.n:end] = k, v
            self.n = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            self._write(key_states, value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

    return InPlaceLayer


def in_place_cache(cache: kl.KVCache, room: int = 0) -> Any:
    """A transformers ``DynamicCache`` holding a copy of ``cache`` whose layers are preallocated for
    ``room`` more tokens and append in place (growing by doubling if outrun). It hands attention
    bitwise the same keys and values as ``cache.to_transformers()``; ``cache`` is never modified."""
    from transformers import DynamicCache

    dyn = DynamicCache()
    layer = _in_place_layer_class()
    dyn.layers = [layer(k, v, room) for k, v in zip(cache.keys, cache.values)]
    dyn.knorm_positions = list(cache.positions)   # where each key sits (sliding windows read it)
    return dyn


def greedy_step(model: Any, dyn: Any, token: torch.Tensor, position: int, grouped: bool = True) -> torch.Tensor:
    """One decode step: feed ``token`` (1, 1) at ``position`` into the transformers cache ``dyn``
    (extended by it); return the greedy next token (1, 1). ``grouped``: grouped-query attention
    reads each kept key once (``False``: once per query head, as transformers' SDPA path does)."""
    with kl.grouped_decoding(grouped), kl._over(dyn):
        out = model(input_ids=token, past_key_values=dyn, use_cache=True,
                    position_ids=torch.tensor([[position]], device=model.device))
    return out.logits[:, -1].argmax(-1).view(1, 1)


@torch.inference_mode()
def generate_greedy(model: Any, input_ids: torch.Tensor, max_new_tokens: int, keep_ratio: float = 1.0,
                    policy: str = "knorm", skip_layers: Sequence[int] = (0, 1), order: kl.Order = "original",
                    position_mode: kl.PositionMode = "absolute", options: kl.PolicyOptions = kl.PolicyOptions(),
                    pre: kl.Prefill | None = None) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` after compressing its prefill cache once.

    The first token comes from the prefill's (uncompressed) logits; new tokens get true positions
    under ``absolute``. Pass ``pre`` to reuse one prefill."""
    kl._positive_int("max_new_tokens", max_new_tokens)
    kl.EvalConfig(keep_ratio, policy, kl._check_layer_list("skip_layers", skip_layers), order,
                  position_mode).validate(kl._n_layers(model))
    pre = pre or kl.prefill(model, input_ids, capture_hidden=kl.needs_layer_inputs(policy))
    cache = kl.compress_cache(pre.cache, keep_ratio, policy, skip_layers, order, options, pre.layer_inputs)
    cache, position = kl._numbered(cache, model, position_mode)
    token = pre.last_logits.argmax(-1).view(1, 1)
    out_tokens = [token]
    dyn = in_place_cache(cache, room=max_new_tokens)
    for _ in range(max_new_tokens - 1):
        token = greedy_step(model, dyn, token, position)
        position += 1
        out_tokens.append(token)
    return torch.cat(out_tokens, dim=1)[0].cpu()
