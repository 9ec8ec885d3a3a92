"""The foundation issue's numbers: full-model PPL of the 3 longest wiki articles (first 2,048
tokens) and continuation PPL (context 1,536, 512 scored tokens) for knorm / random / high_norm at
keep_ratio 1.0 / 0.9 / 0.5 / 0.25 with true positions, plus knorm with cache_relative positions at
0.9 (the write-up's bug). Writes data/results/foundation/full.json and prints a table.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import knorm_lib as kl  # noqa: E402
from knorm_study import intervals, runtime  # noqa: E402

CONTEXT, SCORED, RATIOS = 1536, 512, (1.0, 0.9, 0.5, 0.25)


def main() -> None:
    model, tok = kl.load_model()
    configs = [kl.EvalConfig(r, p) for p in ("knorm", "random", "high_norm") for r in RATIOS]
    configs.append(kl.EvalConfig(0.9, "knorm", position_mode="cache_relative"))
    rows, full = [], []
    for doc in kl.long_documents(tok, "wiki", CONTEXT + SCORED + 1, 3):
        full.append({"document": doc.title, "tokens": 2048, "ppl": kl.full_ppl(model, doc.input_ids[:, :2048])})
        for res in kl.sweep(model, doc.input_ids, CONTEXT, configs, progress=True):
            rows.append({"document": doc.title, **res.summary()})
    agg = intervals.aggregate(rows, ["policy", "position_mode", "keep_ratio"], ["ppl", "next_token_acc", "kl"])
    path = runtime.record_results("foundation", "full", {"context_len": CONTEXT, "scored": SCORED},
                             {"full_model_ppl_2048": full, "rows": rows, "aggregate": agg.to_dict("records")}, model)
    for f in full:
        print(f"full-model PPL, first 2048 tokens of {f['document']}: {f['ppl']:.3f}")
    print(agg[["policy", "position_mode", "keep_ratio", "ppl", "ppl_min", "ppl_max", "next_token_acc", "kl"]]
          .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
