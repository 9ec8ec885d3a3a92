"""Where a long-context decode step's attention time goes (issue #15: "break down what remains").

Notebook 06 times each configuration's attention alone and finds it reads the kept KV at about
half the read bandwidth. This asks whether another formulation of the same single-query attention
would read it faster on this CPU. At SmolLM2's shapes (30 layers, 9 query heads, 3 KV heads,
head_dim 64, float32), with every layer's keys and values as views into buffers preallocated as in
the decode cache and attended one layer after another (so they come from memory, as in a step):

* ``registered_grouped``: the registered attention function under ``kl.grouped_decoding()``,
  what decoding runs (each KV head's query group as one SDPA row);
* ``per_query_head``: SDPA with ``enable_gqa`` (the form on transformers' ``DynamicCache``);
* ``matmul_softmax``: explicit ``q @ K^T``, softmax, ``@ V`` per KV head;
* ``split_kv_4``: flash-decoding, the keys cut into 4 chunks attended as a batch and combined by
  their log-sum-exp (both threads busy even with 3 KV heads);
* ``read_once``: summing every key and value, the floor (each byte read once).

Each: one warm-up, then the median and spread of the repeats, all forms in one run; effective
rate = kept K+V bytes / median; the largest absolute difference from ``registered_grouped``.
Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import knorm_lib as kl  # noqa: E402
from knorm_study import runtime, speed  # noqa: E402

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, ROOM = 30, 9, 3, 64, 64
SCALE = HEAD_DIM ** -0.5


def _split_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    n = k.shape[2] // chunks * chunks
    kc = k[0, :, :n].unflatten(1, (chunks, -1)).transpose(0, 1)   # (chunks, H_kv, n / chunks, D)
    vc = v[0, :, :n].unflatten(1, (chunks, -1)).transpose(0, 1)
    grouped = q.view(1, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM).expand(chunks, -1, -1, -1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(grouped, kc, vc, scale=SCALE)[:2]
    weights = (lse - lse.logsumexp(0, keepdim=True)).exp()[..., None]
    return (out * weights).sum(0).reshape(1, Q_HEADS, 1, HEAD_DIM)


def forms_at(n: int, repeats: int = 9) -> dict:
    gen = torch.Generator().manual_seed(n)
    buffers = [tuple(torch.randn(1, KV_HEADS, n + ROOM, HEAD_DIM, generator=gen) for _ in range(2)) for _ in range(LAYERS)]
    layers = [(k[:, :, :n], v[:, :, :n]) for k, v in buffers]
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen)
    group = Q_HEADS // KV_HEADS

    def grouped(k, v):
        with kl.grouped_decoding():
            return kl._attention(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=SCALE)[0]

    forms = {
        "registered_grouped": grouped,
        "per_query_head": lambda k, v: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True).transpose(1, 2),
        "matmul_softmax": lambda k, v: ((q.view(KV_HEADS, group, HEAD_DIM) @ k[0].transpose(-1, -2) * SCALE).softmax(-1)
                                        @ v[0]).reshape(1, 1, Q_HEADS, HEAD_DIM),
        "split_kv_4": lambda k, v: _split_kv(q, k, v).transpose(1, 2),
    }
    kv_bytes = sum(k.numel() * 4 + v.numel() * 4 for k, v in layers)
    reference = [forms["registered_grouped"](k, v) for k, v in layers]
    out: dict = {"tokens_per_layer": n, "kv_bytes": kv_bytes}
    for name, fn in {**forms, "read_once": lambda k, v: k.sum() + v.sum()}.items():
        t = speed.timed(lambda: [fn(k, v) for k, v in layers], repeats=repeats, warmup=1)
        row = {k: t[k] for k in ("median_s", "min_s", "max_s")}
        row["kv_bytes_per_s"] = kv_bytes / t["median_s"]
        if name in forms:
            row["max_abs_diff"] = max((fn(k, v).reshape(ref.shape) - ref).abs().max().item()
                                      for (k, v), ref in zip(layers, reference))
        out[name] = row
    return out


def main() -> None:
    torch.manual_seed(0)
    bw = speed.memory_bandwidth()
    line = {
        "what": "decode attention over the kept KV, cold across layers: the registered grouped form against other "
                "formulations, and the read-once floor",
        "config": {"layers": LAYERS, "query_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                   "threads": torch.get_num_threads()},
        "numbers": {"read_probe_bytes_per_s": bw["read_bytes_per_s"], "gemv_probe_bytes_per_s": bw["gemv_bytes_per_s"],
                    "by_context": [forms_at(n) for n in (1024, 4096, 8192)]},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)


if __name__ == "__main__":
    main()
