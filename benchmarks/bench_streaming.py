"""Streaming evaluation: one-pass evaluator against the sequential reference (issue: exact streaming).

2,048 tokens of the longest wiki article on SmolLM2, knorm at keep_ratio 0.5, both engines in the
same run (bar: one-pass >= 10x faster, aim 20x; PPLs equal to 1e-3 relative). The uncompressed
reference forward (for KL) is shared by both engines and reported separately, with the speedup
when each engine computes its own. Then the one-pass
path's time from 512 to 4,096 tokens, and its peak resident memory at 4,096 tokens measured in a
fresh child process (bar: < 6 GB). Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import knorm_lib as kl  # noqa: E402
from knorm_study import runtime, speed  # noqa: E402


def child_peak(n_tokens: int, keep_ratio: float) -> None:
    """Runs in a fresh process: peak RSS of one one-pass evaluation (model already loaded), its
    own reference forward and metrics included."""
    model, tok = kl.load_model()
    ids = kl.long_documents(tok, "wiki", n_tokens, 1)[0].input_ids
    base = speed.rss_bytes() / 2**20
    t0 = time.perf_counter()
    res = kl.streaming_ppl(model, ids, "knorm", keep_ratio=keep_ratio, engine="one_pass")
    print(json.dumps({"tokens": n_tokens, "rss_after_load_mb": base, "seconds": time.perf_counter() - t0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ppl": res.ppl}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--growth", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--child-peak", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peak:
        return child_peak(args.child_peak, args.keep_ratio)

    model, tok = kl.load_model()
    longest = max(args.growth + [args.tokens])
    ids_all = kl.long_documents(tok, "wiki", longest, 1)[0]
    ids = ids_all.input_ids[:, :args.tokens]
    # The uncompressed reference (for KL / agreement) is one plain forward that both engines need
    # and a sweep computes once per text (streaming_sweep): it is timed separately and shared.
    reference_s = speed.timed(lambda: kl.full_logits(model, ids), repeats=args.repeats, warmup=1)
    reference = kl.full_logits(model, ids)
    run = lambda engine, x=ids, ref=reference: kl.streaming_ppl(model, x, "knorm", keep_ratio=args.keep_ratio,
                                                                engine=engine, reference_logits=ref)
    one_pass = speed.timed(lambda: run("one_pass"), repeats=args.repeats, warmup=1)
    t0 = time.perf_counter()
    seq_result = run("sequential")
    sequential_s = time.perf_counter() - t0
    op_result = run("one_pass")
    flips = sum(int((seq_result.evictions[i] != op_result.evictions[i]).sum()) for i in seq_result.evictions)
    growth = {}
    for n in args.growth:
        x = ids_all.input_ids[:, :n]
        growth[n] = speed.timed(lambda: run("one_pass", x, None), repeats=1 if n >= 4096 else args.repeats,
                             warmup=0)["median_s"]
    peak = json.loads(subprocess.run([sys.executable, __file__, "--child-peak", "4096", "--keep-ratio",
                                      str(args.keep_ratio)], check=True, capture_output=True, text=True).stdout)
    speedup = sequential_s / one_pass["median_s"]
    speedup_with_reference = (sequential_s + reference_s["median_s"]) / (one_pass["median_s"] + reference_s["median_s"])
    rel = abs(seq_result.ppl - op_result.ppl) / seq_result.ppl
    line = {
        "what": "streaming knorm evaluation: one-pass masked forward vs sequential per-token reference",
        "config": {"document": ids_all.title, "tokens": args.tokens, "keep_ratio": args.keep_ratio,
                   "skip_layers": [0, 1], "model": "SmolLM2-135M-Instruct (embedded)", "dtype": "float32"},
        "numbers": {"sequential_s": sequential_s, "one_pass_s": one_pass, "speedup": speedup,
                    "reference_forward_s": reference_s, "speedup_each_computing_its_own_reference": speedup_with_reference,
                    "ppl_sequential": seq_result.ppl, "ppl_one_pass": op_result.ppl, "ppl_rel_diff": rel,
                    "flipped_eviction_decisions": flips, "one_pass_s_by_tokens": growth,
                    "peak_rss_4096": peak, "bars": {"speedup_min": 10, "ppl_rel_diff_max": 1e-3, "peak_gb_max": 6},
                    "meets_bars": speedup >= 10 and rel <= 1e-3 and peak["peak_rss_mb"] < 6 * 1024},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)


if __name__ == "__main__":
    main()
