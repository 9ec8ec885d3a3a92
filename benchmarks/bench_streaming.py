"""Streaming evaluation speed (issue: evaluation at the cost of one forward).

Part 1, per policy family: one-pass ``streaming_ppl`` (reference logits given) against one plain
forward (``kl.full_logits``) at 2,048 tokens of the longest wiki article on SmolLM2, keep_ratio 0.5,
float32, the reference given as ``streaming_sweep`` shares it across a text's configurations: a
``kl.Reference`` (logits and per-row metric terms computed once) and, where the library has
``reference_forward``, the input of the first compressed layer (so the run starts there; the
skipped layers 0-1 ran once, in the reference forward). Records before 2026-12-04 gave the raw
logits, so each call recomputed the metric terms (about 0.04 forwards here): knorm, random, high_norm, streaming, bursts (knorm, ``prune_after`` 1000), knorm with a
64-token recent window, h2o (bars: score-fixed families <= 1.25x, h2o <= 2x). Each library version
runs in a fresh child process: ``--before`` (a git revision of knorm_lib.py) and the working
tree, one after the other; inside a process the plain forward is timed next to every family, so
each ratio comes from one process. Both versions' PPL, per-token NLL and evictions are compared
bit for bit.

Part 2 (``--skip-engines`` leaves it out): the one-pass evaluator against the sequential
reference, knorm at keep_ratio 0.5, both engines in the same run (bar: one-pass >= 10x faster;
PPLs equal to 1e-3 relative), the one-pass time from 512 to 4,096 tokens, and its peak resident
memory at 4,096 tokens in a fresh child process (bar: < 6 GB).

Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import tempfile
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--child-families" in sys.argv:   # part 1's child: the knorm_lib under test comes first
    sys.path.insert(0, sys.argv[sys.argv.index("--child-families") + 1])
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


FAMILIES = {"knorm": dict(policy="knorm"), "random": dict(policy="random"), "high_norm": dict(policy="high_norm"),
            "streaming": dict(policy="streaming"), "bursts_1000": dict(policy="knorm", prune_after=1000),
            "recent_window_64": dict(policy="knorm", recent_window=64), "h2o": dict(policy="h2o")}
SCORE_FIXED_BAR, DYNAMIC_BAR = 1.25, 2.0


def child_families(tokens: int, keep_ratio: float, rounds: int) -> None:
    """Runs in a fresh process with the knorm_lib on ``sys.path[0]``: each family's time, the plain
    forward's time next to it, and digests of what it computed."""
    import knorm_lib

    assert Path(knorm_lib.__file__).parent == Path(sys.path[0]), knorm_lib.__file__
    model, tok = knorm_lib.load_model()
    ids = knorm_lib.long_documents(tok, "wiki", tokens, 1)[0].input_ids
    if hasattr(knorm_lib, "reference_forward"):
        reference = knorm_lib.reference_forward(model, ids, layers=[2])
    else:
        reference = knorm_lib.Reference.of(knorm_lib.full_logits(model, ids))
    out = {"library": knorm_lib.__file__, "families": {}}
    for name, kw in FAMILIES.items():
        run = lambda: knorm_lib.streaming_ppl(model, ids, keep_ratio=keep_ratio, reference_logits=reference, **kw)
        res = run()   # warm-up, and the result compared between versions
        plain, family = [], []
        for _ in range(rounds):
            for times, fn in ((plain, lambda: knorm_lib.full_logits(model, ids)), (family, run)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        evictions = hashlib.sha256(b"".join(res.evictions[i].numpy().tobytes() for i in sorted(res.evictions)))
        out["families"][name] = {"plain_s": plain, "family_s": family, "ppl": res.ppl,
                                 "nll_sha256": hashlib.sha256(res.nll.numpy().tobytes()).hexdigest(),
                                 "evictions_sha256": evictions.hexdigest()}
    print(json.dumps(out))


def families_of(library_dir: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "KNORM_DATA_DIR": str(kl.DATA_DIR)}
    cmd = [sys.executable, __file__, "--child-families", str(library_dir), "--tokens", str(args.tokens),
           "--keep-ratio", str(args.keep_ratio), "--rounds", str(args.rounds)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def compare_families(args: argparse.Namespace) -> dict:
    """Part 1: per family, the before and after times as ratios to the plain forward of their own process."""
    with tempfile.TemporaryDirectory() as before_dir:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.before}:knorm_lib.py"], check=True,
                                capture_output=True, text=True).stdout
        (Path(before_dir) / "knorm_lib.py").write_text(source)
        versions = {"before": families_of(Path(before_dir), args), "after": families_of(ROOT, args)}
    table = {}
    for name in FAMILIES:
        row = {}
        for version, record in versions.items():
            f = record["families"][name]
            ratios = [b / a for a, b in zip(f["plain_s"], f["family_s"])]
            row[version] = {"family_median_s": statistics.median(f["family_s"]),
                            "plain_median_s": statistics.median(f["plain_s"]),
                            "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                            "ppl": f["ppl"]}
        b, a = (versions[v]["families"][name] for v in ("before", "after"))
        row["identical_nll_and_evictions"] = b["nll_sha256"] == a["nll_sha256"] and b["evictions_sha256"] == a["evictions_sha256"]
        row["bar"] = DYNAMIC_BAR if FAMILIES[name]["policy"] in kl.DYNAMIC_POLICIES else SCORE_FIXED_BAR
        row["meets_bar"] = row["after"]["ratio_median"] <= row["bar"]
        table[name] = row
    return {"before_revision": args.before, "rounds": args.rounds, "families": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--growth", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--before", default="50c815c", help="git revision of knorm_lib.py to compare with (part 1)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per family and version, after a warm-up")
    ap.add_argument("--skip-engines", action="store_true", help="part 1 only")
    ap.add_argument("--child-peak", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-families", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peak:
        return child_peak(args.child_peak, args.keep_ratio)
    if args.child_families:
        return child_families(args.tokens, args.keep_ratio, args.rounds)
    families = compare_families(args)
    if args.skip_engines:
        line = {"what": "streaming evaluation cost per policy family, x one plain forward, before vs after",
                "config": {"tokens": args.tokens, "keep_ratio": args.keep_ratio, "skip_layers": [0, 1],
                           "model": "SmolLM2-135M-Instruct (embedded)", "dtype": "float32"},
                "numbers": {"per_family": families}, "machine": runtime.machine_info()}
        print(json.dumps(line))
        runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)
        return

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
        "what": "streaming evaluation: cost per policy family x one plain forward (before vs after); "
                "one-pass masked forward vs sequential per-token reference",
        "config": {"document": ids_all.title, "tokens": args.tokens, "keep_ratio": args.keep_ratio,
                   "skip_layers": [0, 1], "model": "SmolLM2-135M-Instruct (embedded)", "dtype": "float32"},
        "numbers": {"per_family": families, "sequential_s": sequential_s, "one_pass_s": one_pass, "speedup": speedup,
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
