"""4. Scores and policies (higher score = keep): ``@register_policy`` adds one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from knorm_lib.checks import _require
from knorm_lib.attention import _layers

__all__ = ["LayerKV", "PolicyOptions", "ScoreFn", "POLICIES", "register_policy", "knorm_score",
           "high_norm_score", "random_score", "streaming_score", "h2o_score", "DYNAMIC_POLICIES",
           "knorm_prenorm_score", "LAYER_INPUT_POLICIES", "has_qk_norm", "applicable_policies",
           "KVPRESS_POLICIES", "needs_layer_inputs", "resolve_policy", "check_policy"]


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
