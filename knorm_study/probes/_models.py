"""What the probes run on: tiny float64 models with weights drawn from a seeded generator (uniform,
so the same bits on every host: no Box-Muller, no vectorised transcendental), token ids, and the
embedded tokenizer."""

from __future__ import annotations

import functools
from typing import Any

import torch

import knorm_lib as kl

VOCAB = 256


def _fill_weights(model: Any, seed: int, scale: float) -> Any:
    """Every parameter from one seeded uniform stream, in name order: matrices in
    ``[-scale, scale)``, norm gains in ``[0.5, 1.5)``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_((0.5 + u) if p.dim() == 1 and "norm" in name else (2 * u - 1) * scale)
    return model


@functools.cache
def tiny_llama(seed: int = 0, n_layers: int = 4, scale: float = 0.2) -> Any:
    """A float64 Llama (``n_layers`` layers, 4 query heads, 2 KV heads, head_dim 16, vocabulary
    256) with knorm_lib's attention; attention far from uniform, so position effects show.
    Shared between probes: never modify it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kl._register_attention()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      rope_theta=10_000.0, tie_word_embeddings=False)
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype=torch.float64)
    return _fill_weights(model, seed, scale).eval()


def ids(n: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """``(1, n)`` token ids from a seeded generator."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@functools.cache
def tokenizer() -> Any:
    """The embedded model's tokenizer (``make data``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(kl.DEFAULT_MODEL_DIR)


def rounded(t: torch.Tensor | float, digits: int = 12) -> Any:
    """A tensor or float as plain numbers (lists for tensors)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().tolist() if t.is_floating_point() else t.detach().cpu().tolist()
    return float(t)


@functools.cache
def tiny_llama_favouring(favour: tuple[int, ...], seed: int = 0, others: float = 0.01) -> Any:
    """``tiny_llama(seed)``'s weights (a separate copy) with every output row outside the ids in
    ``favour`` scaled by ``others``, so greedy decoding favours ``favour`` (digits: a passkey answer
    then comes out right at some digits and wrong at others). Shared between probes: never modify it."""
    model = tiny_llama.__wrapped__(seed)
    with torch.no_grad():
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[list(favour)] = True
        model.lm_head.weight[~keep] *= others
    return model


@functools.cache
def tiny_qwen3(seed: int = 0) -> Any:
    """A float64 Qwen 3 (QK-norm; 3 layers, 4 query heads, 2 KV heads, head_dim 16, vocabulary 256),
    weights as ``tiny_llama``'s, norm gains in [0.5, 1.5) so the normalised keys rank otherwise.
    Shared between probes: never modify it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kl._register_attention()
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(dtype=torch.float64)
    return _fill_weights(model, seed, 0.2).eval()


@functools.cache
def tiny_gemma3_global_rope() -> Any:
    """A float64 Gemma 3 text model (3 layers: two local, one global, each type its own RoPE base;
    one KV head; QK-norm) with windows off (the per-layer RoPE probe's model, kept as it was).
    Shared between probes: never modify it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kl._register_attention()
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                           sliding_window=None, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).to(dtype=torch.float64)
    return _fill_weights(model, 0, 0.2).eval()


@functools.cache
def tiny_gemma3_windowed() -> Any:
    """A float64 Gemma 3 text model with a sliding window of 6 (3 layers: local, global, local; one KV
    head; QK-norm; each layer type its own RoPE base), weights as ``tiny_llama``'s.
    Shared between probes: never modify it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kl._register_attention()
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                           sliding_window=6, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).to(dtype=torch.float64)
    return _fill_weights(model, 0, 0.2).eval()


@functools.cache
def tiny_gemma3_hybrid() -> Any:
    """A float64 Gemma 3 text model with two layer types past layer 1 (6 layers: local, local, local,
    global, local, global; window 6; one KV head; QK-norm), weights as ``tiny_llama``'s: the
    per-layer-type summaries' model. Shared between probes: never modify it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kl._register_attention()
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                           sliding_window=6, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"])
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).to(dtype=torch.float64)
    return _fill_weights(model, 0, 0.2).eval()
