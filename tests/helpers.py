"""Shared test helpers and constants (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

import knorm_lib as kl

N_TOKENS = 64

CONTEXT = 40

N_LAYERS = 4

N_KV_HEADS = 2

HEAD_DIM = 16


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """``(1, n)`` random token ids from a seeded generator (independent of the global RNG)."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _full_forward_nll(model, ids, context_len):
    """Reference: cross-entropy of ONE plain forward over all tokens, at the scored positions."""
    with torch.no_grad():
        logits = model(ids).logits[0]
    return F.cross_entropy(logits[context_len:-1].double(), ids[0, context_len + 1:], reduction="none")

AWKWARD_RATIOS = [0.9, 0.7, 0.3, 0.1, 1 / 3, 2 / 3, 0.5, 0.25, 0.05, 0.01, 0.999, 1e-9, 1.0]


def _check_consistent(comp: kl.KVCache, full: kl.KVCache, layer: int) -> None:
    """Every kept (key, value) row is the full cache's row at the recorded original position."""
    pos = comp.positions[layer]
    idx = pos.unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)
    assert torch.equal(comp.keys[layer], full.keys[layer].gather(2, idx))
    assert torch.equal(comp.values[layer], full.values[layer].gather(2, idx))


def _brute_force_kept(keys: torch.Tensor, n_kept: int, lowest: bool) -> torch.Tensor:
    """Sorted positions of the n_kept lowest (or highest) key norms, per KV head."""
    norms = keys[0].double().norm(dim=-1)  # (H_kv, S)
    order = norms.argsort(dim=-1, descending=not lowest)
    return order[:, :n_kept].sort(dim=-1).values

SWEEP_CONFIGS = [
    kl.EvalConfig(1.0),
    kl.EvalConfig(0.5),
    kl.EvalConfig(0.5, "knorm", (), "by_norm", "rerotated"),
    kl.EvalConfig(0.3, "knorm", (), "original", "cache_relative"),
    kl.EvalConfig(0.7, "high_norm", (0,)),
    kl.EvalConfig(0.5, "random", (), seed=1),
    kl.EvalConfig(0.5, "random", (), seed=2),
    kl.EvalConfig(0.5, "streaming", (), n_sink=2),
    kl.EvalConfig(0.5, "streaming", (), n_sink=6),
    kl.EvalConfig(0.5, "tova", ()),
    kl.EvalConfig(1.0, "knorm", (), "by_norm", "rerotated"),
]


def _greedy_reference(model, ids, n_new):
    """Greedy decoding by re-running the WHOLE sequence each step: no cache at all."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, ids.shape[1]:]

BAD_KEEP_RATIOS = [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", None, True]


def _eager_probs(model, ids):
    """Attention probabilities from transformers' own eager implementation: (layers, H_q, n, n)."""
    model.set_attn_implementation("eager")
    try:
        out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)
    return torch.stack([a[0] for a in out.attentions])


def _threshold_rows(values: dict[float, tuple[float, float]]) -> list[dict]:
    return [{"variant": "v", "document": doc, "keep_ratio": r, "ppl": ppl[i]}
            for r, ppl in values.items() for i, doc in enumerate(("a", "b"))]

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152)

SUPPORTED = {
    "llama": dict(head_dim=16),
    "llama3-rope": dict(model_type="llama", head_dim=16, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "mistral-no-window": dict(model_type="mistral", sliding_window=None, head_dim=16),
    "phi3": dict(pad_token_id=0),
    "phi3-partial-rope": dict(model_type="phi3", pad_token_id=0, partial_rotary_factor=0.5),
    "mistral-window": dict(model_type="mistral", sliding_window=16, head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}

REFUSED = {
    "gemma2": (dict(head_dim=16), "softcapping"),
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4, vocab_size=49152), "not supported"),
}


def _save(tmp_path, model_type: str, overrides: dict) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(overrides)
    model_type = overrides.pop("model_type", model_type)
    fields = overrides if model_type == "gpt2" else {**SMALL, **overrides}
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    for p in model.parameters():   # far from uniform attention, so mistakes show
        torch.nn.init.normal_(p, std=0.1)
    out = tmp_path / model_type
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(kl.DEFAULT_MODEL_DIR / name, out / name)
    return str(out)

REAL_CONTEXT = 200  # tokens 201..299 are scored

ROOT = Path(__file__).resolve().parents[1]

STATIC = ["knorm", "high_norm", "random", "streaming"]

SCHEDULES = [dict(keep_ratio=0.5), dict(max_cache=12)]


def reference_burst_ppl(model, ids, keep_ratio, prune_after, skip_layers):
    """An independent token loop written from l2compress's description: feed one token at its true
    position; then every layer not in ``skip_layers`` whose cache holds >= ``prune_after`` entries
    keeps the ceil(keep_ratio * length) lowest-norm keys, stored sorted by norm (the newest token
    may go). Returns (perplexity, cache length per layer after every step)."""
    import math

    from transformers import DynamicCache

    cache, nll, lengths = DynamicCache(), [], []
    for t in range(ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[t]]))
        nll.append(F.cross_entropy(out.logits[0, -1:].double(), ids[0, t + 1:t + 2]).item())
        for i, layer in enumerate(cache.layers):
            length = layer.keys.shape[2]
            if i in skip_layers or length < prune_after:
                continue
            order = layer.keys.norm(dim=-1).argsort(dim=-1)[..., :math.ceil(keep_ratio * length)]
            idx = order.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        lengths.append([layer.keys.shape[2] for layer in cache.layers])
    return math.exp(sum(nll) / len(nll)), lengths


def _acc(values: dict[float, float], ctx: int = 256, policy: str = "knorm") -> list[dict]:
    return [{"context": ctx, "policy": policy, "keep_ratio": r, "accuracy": a, "lo": 0.0, "hi": 1.0, "n": 3.0}
            for r, a in values.items()]


# ---- the exactness matrix's families (tests/core/test_architectures.py) ----

WINDOW = 7
ARCH_VOCAB = 256

FAMILIES = {
    "llama": dict(),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=0),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=None, final_logit_softcapping=None,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=WINDOW, num_key_value_heads=1, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "olmo2": dict(),
}
# the families whose configs set a window (test_windows_are_where_the_config_puts_them checks it)
WINDOWED = {"qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text"}


def tiny_family(family: str, dtype: torch.dtype = torch.float64):
    """``(ours, theirs)``: one random-weight model with knorm_lib's attention and the same weights
    with transformers' ``sdpa``; 3 layers, 4 query heads, head_dim 16."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=ARCH_VOCAB, max_position_embeddings=512,
                  tie_word_embeddings=False)
    cfg = AutoConfig.for_model(family, **{**fields, **FAMILIES[family]})
    kl._register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.2)
    theirs = copy.deepcopy(model)
    theirs.set_attn_implementation("sdpa")
    model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)
    kl.check_supported(model)
    return model, theirs
