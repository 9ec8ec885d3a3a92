"""Streaming-protocol perplexity on one long wiki article (first 2,048 tokens): knorm, random,
high_norm, streaming (sink 4 + recent) and H2O at keep_ratio 0.9 / 0.5 / 0.25, true positions,
skip_layers (0, 1). One-pass engine (H2O's steps replayed inside each layer). Writes
data/results/streaming/full.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import knorm_lib as kl  # noqa: E402
from knorm_study import runtime  # noqa: E402

POLICIES, RATIOS, N_TOKENS = ("knorm", "random", "high_norm", "streaming", "h2o"), (0.9, 0.5, 0.25), 2048


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policies", nargs="*", default=list(POLICIES),
                    help="rerun only these; rows of the other policies are kept from the last results file")
    args = ap.parse_args()
    model, tok = kl.load_model()
    doc = kl.long_documents(tok, "wiki", N_TOKENS, 1)[0]
    rows = [{"document": doc.title, "policy": "none (full cache)", "keep_ratio": 1.0, "engine": "-",
             "ppl": kl.full_ppl(model, doc.input_ids), "seconds": None}]
    previous = runtime.RESULTS_DIR / "streaming" / "full.json"
    if set(args.policies) != set(POLICIES) and previous.exists():
        rows += [r for r in json.loads(previous.read_text())["results"]["rows"][1:] if r["policy"] not in args.policies]
    for policy in args.policies:
        for ratio in RATIOS:
            t0 = time.perf_counter()
            res = kl.streaming_ppl(model, doc.input_ids, policy, keep_ratio=ratio, progress=True)
            rows.append({"document": doc.title, **res.summary(), "seconds": time.perf_counter() - t0})
            print(f"{policy:10s} keep {ratio:4}: PPL {res.ppl:8.3f}  acc {res.next_token_acc:.3f}  "
                  f"KL {res.kl_mean:.4f}  [{res.config.engine}, {rows[-1]['seconds']:.0f} s]", flush=True)
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (POLICIES.index(r["policy"]), -r["keep_ratio"]))
    path = runtime.record_results("streaming", "full", {"tokens": N_TOKENS, "policies": POLICIES, "keep_ratios": RATIOS},
                             {"document": doc.title, "rows": rows}, model)
    print(f"full cache PPL {rows[0]['ppl']:.3f}; written: {path}")


if __name__ == "__main__":
    main()
