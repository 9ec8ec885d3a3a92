"""7. Prefill evaluation (kvpress's protocol: compress once after the context)."""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from knorm_lib.checks import (ORDERS, Order, POSITION_MODES, PositionMode, _check_choice, _check_context_len,
                              _check_ids, _check_keep_ratio, _check_layer_list, _check_skip_layers,
                              _check_vocab)
from knorm_lib.attention import _RESUME, _layers, _make_resumable, _n_layers, _over, _using, sliding_layers
from knorm_lib.policies import PolicyOptions, check_policy, needs_layer_inputs
from knorm_lib.compression import (KVCache, _slots, compress_cache, footprint, n_kept_for, policy_scores,
                                   rerotate_keys)
from knorm_lib.metrics import Reference, token_metrics

__all__ = ["Prefill", "prefill", "continuation_logits", "full_logits", "reference_forward", "full_ppl",
           "EvalConfig", "EvalResult", "evaluate", "sweep", "prefill_ppl"]


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
