"""The two streaming engines in bfloat16: how far apart their perplexities are (issue: any model,
any device). In float32 they agree to 1e-5 and in float64 exactly (tests); in bfloat16 the keys
each engine computes differ in the last bits, so near-tied norms can flip an eviction. Both
compute H2O's attention scores in float32. SmolLM2 on CPU, the first two wiki articles cut to
512 tokens, knorm and h2o at keep_ratio 0.5. Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import knorm_lib as kl  # noqa: E402
from knorm_study import runtime  # noqa: E402


def main() -> None:
    model, tokenizer = kl.load_model(dtype="bfloat16")
    rows = []
    for doc in kl.long_documents(tokenizer, "wiki", 512, 2):
        for policy in ("knorm", "h2o"):
            ppl = {engine: kl.streaming_ppl(model, doc.input_ids, policy, keep_ratio=0.5, engine=engine).ppl
                   for engine in ("one_pass", "sequential")}
            rows.append({"document": doc.title, "policy": policy, "ppl_one_pass": ppl["one_pass"],
                         "ppl_sequential": ppl["sequential"], "rel_diff": ppl["one_pass"] / ppl["sequential"] - 1})
    line = {
        "what": "streaming engines in bfloat16: one-pass vs sequential perplexity",
        "config": {"model": "SmolLM2-135M-Instruct (embedded)", "dtype": "bfloat16", "tokens": 512, "documents": 2,
                   "keep_ratio": 0.5, "skip_layers": [0, 1], "policies": ["knorm", "h2o"]},
        "numbers": {"rows": rows, "max_abs_rel_diff": max(abs(r["rel_diff"]) for r in rows)},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)


if __name__ == "__main__":
    main()
