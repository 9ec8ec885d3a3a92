"""What made the evaluators faster without changing a number (issue: report time; the study's own
speed claims): the attention mask's form, and batching the sequential engine.

1. SDPA at SmolLM2's shapes (9 query heads, 3 KV heads, head_dim 64, float32) over an arbitrary
   streaming mask, at 1,024 and 2,048 tokens: a boolean mask, the same mask additive, and the
   additive mask per KV head with each head's query group as one batch row (what
   ``knorm_lib._attention`` runs). Outputs are compared bitwise with the boolean form.
2. ``kl.streaming_sweep`` on 03's sequential configurations (knorm re-rotated under both storage
   orders and by_norm under absolute positions, keep_ratio 0.5) over 2 wiki texts of 96 tokens:
   one batch against one call per (text, configuration); the largest relative PPL difference.

Each timing: one warm-up, then the median and spread of the repeats, both forms in one run.
Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import knorm_lib as kl  # noqa: E402
from knorm_study import runtime, speed  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _summary(t: dict) -> dict:
    return {k: t[k] for k in ("median_s", "min_s", "max_s")}


def mask_forms(n: int, repeats: int = 7) -> dict:
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, Q_HEADS, n, HEAD_DIM, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen) for _ in range(2))
    evict = torch.randint(0, n + 1, (KV_HEADS, n), generator=gen)
    additive = kl.streaming_mask(evict)                                   # (H_kv, n, n)
    boolean = (additive == 0).repeat_interleave(Q_HEADS // KV_HEADS, 0)[None]
    forms = {
        "boolean": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=boolean, enable_gqa=True),
        "additive": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=additive.repeat_interleave(Q_HEADS // KV_HEADS, 0)[None], enable_gqa=True),
        "additive_per_kv_head": lambda: F.scaled_dot_product_attention(
            q.view(KV_HEADS, Q_HEADS // KV_HEADS, n, HEAD_DIM), k[0][:, None], v[0][:, None],
            attn_mask=additive[:, None], enable_gqa=True).view(1, Q_HEADS, n, HEAD_DIM),
    }
    reference = forms["boolean"]()
    out = {"tokens": n}
    for name, fn in forms.items():
        out[name] = {**_summary(speed.timed(fn, repeats=repeats)), "bitwise_equal_to_boolean": bool(torch.equal(fn(), reference))}
    out["boolean_over_per_kv_head"] = out["boolean"]["median_s"] / out["additive_per_kv_head"]["median_s"]
    return out


def sequential_batching(model, tokenizer, n_tokens: int = 96) -> dict:
    texts = [d.input_ids[:, :n_tokens] for d in kl.long_documents(tokenizer, "wiki", n_tokens, 2)]
    configs = [dict(policy="knorm", keep_ratio=0.5, position_mode="rerotated", order=o) for o in kl.ORDERS]
    configs.append(dict(policy="knorm", keep_ratio=0.5, order="by_norm", engine="sequential"))
    kl.streaming_sweep(model, texts[0][:, :16], configs)   # warm-up
    t0 = time.perf_counter()
    batched = kl.streaming_sweep(model, texts, configs)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    separate = [kl.streaming_ppl(model, ids, **cfg) for ids in texts for cfg in configs]
    separate_s = time.perf_counter() - t0
    return {"texts": len(texts), "tokens": n_tokens, "configurations": len(configs), "batched_s": batched_s,
            "separate_s": separate_s, "speedup": separate_s / batched_s,
            "max_rel_ppl_diff": max(abs(a.ppl / b.ppl - 1) for a, b in zip(batched, separate))}


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = kl.load_model()
    line = {
        "what": "evaluation speed: attention mask forms, and the batched sequential streaming engine",
        "config": {"sdpa_shapes": {"query_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32"},
                   "model": "SmolLM2-135M-Instruct (embedded)", "sequential_configs": "03's: rerotated x 2 orders, "
                   "absolute by_norm; knorm keep_ratio 0.5"},
        "numbers": {"mask_forms": [mask_forms(n) for n in (1024, 2048)],
                    "sequential_batching": sequential_batching(model, tokenizer)},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)


if __name__ == "__main__":
    main()
