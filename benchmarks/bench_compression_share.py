"""Compression (score + gather over all layers) as a share of the prefill it follows.

KnormPress needs no attention scores, only key norms, so compressing a cache should cost next to
nothing next to the prefill that produced it. Bar (foundation issue): <= 2 % at 4,096 tokens.
Prints one JSON line: what, config, numbers, machine. Not a test: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import knorm_lib as kl  # noqa: E402
from knorm_study import runtime, speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    model, tok = kl.load_model(args.model)
    ids = kl.long_documents(tok, "wiki", args.tokens, 1)[0].input_ids
    holder: dict = {}

    def do_prefill() -> None:
        holder["pre"] = kl.prefill(model, ids)

    def do_compress() -> None:
        kl.compress_cache(holder["pre"].cache, args.keep_ratio, "knorm", skip_layers=())

    prefill_t = speed.timed(do_prefill, repeats=args.repeats, warmup=1)
    compress_t = speed.timed(do_compress, repeats=max(20, args.repeats), warmup=3)
    shares = [c / p for c, p in zip(compress_t["times_s"], prefill_t["times_s"])]
    line = {
        "what": "knorm compression (score + gather, all layers) as a share of prefill time",
        "config": {"tokens": args.tokens, "keep_ratio": args.keep_ratio, "skip_layers": [],
                   "model": args.model or "SmolLM2-135M-Instruct (embedded)", "dtype": str(model.dtype)},
        "numbers": {"prefill_s": prefill_t, "compress_s": compress_t,
                    "share_median": compress_t["median_s"] / prefill_t["median_s"],
                    "share_max": max(shares) if shares else None, "bar": 0.02,
                    "meets_bar": compress_t["median_s"] / prefill_t["median_s"] <= 0.02},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)


if __name__ == "__main__":
    main()
