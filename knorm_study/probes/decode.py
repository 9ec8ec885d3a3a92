"""Probes of knorm_study/decode.py (see knorm_study/fingerprint.py).

``generate_greedy`` under every argument the notebooks pass (00's explorer: keep_ratio, policy,
skip_layers, position_mode, ``pre``; 05's generation runs: the passkey policies, snapkv among
them, with and without ``pre``), and the in-place decode cache stepped by ``greedy_step`` (both
attention paths, outrunning its room), read back as the keys and values it holds."""

from __future__ import annotations

import torch

import knorm_lib as kl
from knorm_study.fingerprint import probe
from knorm_study.probes._models import ids, tiny_llama

PROMPT_LEN = 72   # snapkv scores the last 64 queries: the prompt must be longer
N_NEW = 10


@probe("decode")
def generate_greedy_settings() -> dict:
    """Greedy continuations: the full cache (default arguments, own prefill), every 05 policy at
    one keep_ratio from one shared prefill, snapkv on its own prefill (capture_hidden), no layer
    skipped, the three position modes, by-norm storage order and a random seed."""
    from knorm_study import decode

    model, prompt = tiny_llama(), ids(PROMPT_LEN, seed=11)
    pre = kl.prefill(model, prompt, capture_hidden=True)
    g = lambda *a, **kw: decode.generate_greedy(model, prompt, N_NEW, *a, **kw).tolist()
    out = {"full": g(), "full_pre": g(pre=pre), "one_token": decode.generate_greedy(model, prompt, 1, 0.25).tolist()}
    for policy in ("knorm", "random", "high_norm", "streaming", "snapkv"):
        out[f"{policy}@0.25"] = g(0.25, policy, (0, 1), pre=pre)
    out["snapkv@0.5 own prefill"] = g(0.5, "snapkv", (0,))
    out["knorm@0.1 all layers"] = g(0.1, "knorm", ())
    out["knorm@0.1 skip 1"] = g(0.1, "knorm", (1,))
    for mode in ("cache_relative", "rerotated"):
        out[f"knorm@0.1 {mode}"] = g(0.1, "knorm", (), "original", mode, pre=pre)
    out["knorm@0.5 by_norm"] = g(0.5, "knorm", (0, 1), "by_norm", pre=pre)
    out["random@0.5 seed 3"] = g(0.5, "random", (), options=kl.PolicyOptions(seed=3), pre=pre)
    out["streaming@0.25 n_sink 1"] = g(0.25, "streaming", (), options=kl.PolicyOptions(n_sink=1), pre=pre)
    return out


@probe("decode")
@torch.inference_mode()
def in_place_cache_steps() -> dict:
    """``in_place_cache`` of a compressed cache whose layers hold different lengths, stepped by
    ``greedy_step`` (grouped and per-head attention, past its preallocated room): per step the
    token, per layer the length and the keys/values held, and that the source cache is untouched."""
    from knorm_study import decode

    model = tiny_llama()
    prompt = ids(24, seed=12)
    pre = kl.prefill(model, prompt)
    cache = kl.compress_cache(pre.cache, 0.5, "knorm", (0,))
    before = [k.clone() for k in cache.keys]
    weights = lambda t: torch.arange(1, t.shape[2] + 1, dtype=t.dtype).view(1, 1, -1, 1)

    def held(dyn) -> dict:
        return {"lengths": [layer.get_seq_length() for layer in dyn.layers],
                "dyn_length": dyn.get_seq_length(),
                "keys": [float((layer.keys * weights(layer.keys)).sum()) for layer in dyn.layers],
                "values": [float((layer.values * weights(layer.values)).sum()) for layer in dyn.layers],
                "shapes": [list(layer.keys.shape) for layer in dyn.layers]}

    dyn = decode.in_place_cache(cache, room=2)
    out = {"start": held(dyn),
           "same_as_transformers": all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                                       for a, b in zip(dyn.layers, cache.to_transformers().layers))}
    token, position, tokens = pre.last_logits.argmax(-1).view(1, 1), prompt.shape[1], []
    for step in range(5):
        token = decode.greedy_step(model, dyn, token, position, grouped=step % 2 == 0)
        tokens.append(int(token))
        position += 1
    out.update(tokens=tokens, end=held(dyn),
               source_untouched=all(torch.equal(a, b) for a, b in zip(before, cache.keys)))
    # the last step's logits over the in-place cache, both attention paths
    for grouped in (True, False):
        with kl.grouped_decoding(grouped):
            step = decode.in_place_cache(cache, room=1)
            logits = model(input_ids=token, past_key_values=step, use_cache=True,
                           position_ids=torch.tensor([[prompt.shape[1]]])).logits[0, -1]
        out[f"logits_grouped_{grouped}"] = [float(logits.sum()), float(logits.max()), int(logits.argmax())]
    return out
