"""Streaming evaluation speed (issue: evaluation at the cost of one forward).

Part 1, per policy family: one-pass ``streaming_ppl`` (reference logits given) against one plain
forward (``kl.full_logits``) at 2,048 tokens of the longest wiki article on SmolLM2, keep_ratio 0.5,
float32, the reference given as ``streaming_sweep`` shares it across a text's configurations: a
``kl.Reference`` (logits and per-row metric terms computed once) and, where the library has
``reference_forward``, the input of the first compressed layer (so the run starts there; the
skipped layers 0-1 ran once, in the reference forward). Records before 2026-12-04 gave the raw
logits, so each call recomputed the metric terms (about 0.04 forwards here): knorm, random, high_norm, streaming, bursts (knorm, ``prune_after`` 1000), knorm with a
64-token recent window, h2o (bars: score-fixed families <= 1.25x, h2o <= 2x). Each library version
runs in a fresh child process: ``--before`` (a git revision of knorm_lib, the module or the
package) and the working tree, one after the other; inside a process the plain forward is timed
next to every family, so each ratio comes from one process. Both versions' PPL, per-token NLL
and evictions are compared bit for bit.

Part 2 (``--skip-engines`` leaves it out): the one-pass evaluator against the sequential
reference, knorm at keep_ratio 0.5, both engines in the same run (bar: one-pass >= 10x faster;
PPLs equal to 1e-3 relative), the one-pass time from 512 to 4,096 tokens, and its peak resident
memory at 4,096 tokens in a fresh child process (bar: < 6 GB).

Part 3 (``--skip-architectures`` leaves it out; ``--architectures-only`` runs it alone, prints its
line and writes no record): the one-pass engine on each architecture family ``check_supported``
accepts, sliding windows crossed. Per family a random-weight float32 model built from its
transformers config class with knorm_lib's attention (6 layers, hidden 256, 4 query heads of 64,
2 KV heads, vocab 8,192; window 512 where the family has one: Mistral and Phi-3 every layer,
Qwen 2/3 layers 3-5, Gemma 3 five local layers to one global with 1 KV head; Llama and OLMo 2
none), 2,048 random token ids, knorm at keep_ratio 0.5 with part 1's reference (a
``reference_forward`` holding layer 2's input, so the run starts there), timed in one process
next to the plain forward (``kl.full_logits``, the same model and attention function; bar
<= 1.25x, part 1's score-fixed bar). In the same rounds: the one-pass run with the reference's
logits only (every layer runs: with 6 layers, starting at layer 2 skips a third of them, on
SmolLM2 a fifteenth) and transformers' own ``sdpa`` forward of the same weights (what a windowed
layer's plain forward costs outside knorm_lib). Gemma 2 is listed with ``check_supported``'s
refusal, not timed.

Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import argparse
import dataclasses
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

import torch

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

    here = Path(knorm_lib.__file__).parent   # knorm_lib.py, or the package knorm_lib/ since the split
    assert Path(sys.path[0]) in (here, here.parent), knorm_lib.__file__
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
        # the library as it was: the module knorm_lib.py or (since the split) the package knorm_lib/
        paths = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", args.before, "knorm_lib.py",
                                "knorm_lib"], check=True, capture_output=True, text=True).stdout.split()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, *paths], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", before_dir], input=archive, check=True)
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


# Part 3: one shape for every family, each family's own switches on top. The vocabulary is sized to
# the model, as the per-token metrics scale with it: the output layer holds 31% of the weights a
# forward multiplies by (SmolLM2: 21%); at 32,000 (69%) the metrics alone took a third of a forward.
# 2,048 tokens cross the 512-token window four times.
ARCH_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=False)
ARCH_WINDOW = 512
ARCHITECTURES = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=ARCH_WINDOW, max_window_layers=3),
    "qwen3": dict(use_sliding_window=True, sliding_window=ARCH_WINDOW, max_window_layers=3),
    "mistral": dict(sliding_window=ARCH_WINDOW),
    "phi3": dict(sliding_window=ARCH_WINDOW, pad_token_id=0),
    "gemma3_text": dict(sliding_window=ARCH_WINDOW, num_key_value_heads=1, query_pre_attn_scalar=64,
                        layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "olmo2": {},
}
REFUSED_ARCHITECTURES = {"gemma2": dict(sliding_window=ARCH_WINDOW, query_pre_attn_scalar=64)}   # its own softcapping


def architecture_model(family: str, tokens: int, **extra) -> torch.nn.Module:
    """A random-weight float32 model of ``family`` with knorm_lib's attention; ``check_supported``'s
    refusal is raised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**ARCH_SHAPE, "max_position_embeddings": max(4096, tokens), **extra})
    kl._register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)
    kl.check_supported(model)
    return model


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "range": [min(values), max(values)]}


def time_architectures(tokens: int, keep_ratio: float, rounds: int) -> dict:
    """Part 3: per family, the one-pass engine's time as a ratio to the plain forward of the same
    model, interleaved in ``rounds`` rounds after a warm-up round."""
    ids = torch.randint(0, ARCH_SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    table = {}
    for family, extra in ARCHITECTURES.items():
        model = architecture_model(family, tokens, **extra)
        reference = kl.reference_forward(model, ids, layers=[2])   # as part 1: the run starts at layer 2
        logits_only = dataclasses.replace(reference, layer_inputs={})   # the same terms; every layer runs

        def sdpa() -> None:
            model.set_attn_implementation("sdpa")
            try:
                kl.full_logits(model, ids)
            finally:
                model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)

        def one_pass(ref: kl.Reference):
            return lambda: kl.streaming_ppl(model, ids, "knorm", keep_ratio=keep_ratio, engine="one_pass",
                                            reference_logits=ref)

        runs = {"plain": lambda: kl.full_logits(model, ids), "plain_sdpa": sdpa,
                "one_pass": one_pass(reference), "one_pass_every_layer": one_pass(logits_only)}
        results = {name: fn() for name, fn in runs.items()}   # warm-up
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        per_round = lambda num, den: [a / b for a, b in zip(times[num], times[den])]
        windowed = kl.sliding_layers(model)
        n_layers = model.config.num_hidden_layers
        resumed, every = results["one_pass"], results["one_pass_every_layer"]
        ratio = _spread(per_round("one_pass", "plain"))
        ratio_every = _spread(per_round("one_pass_every_layer", "plain"))
        table[family] = {
            "architecture": type(model).__name__, "tokens": tokens, "layers": n_layers,
            "kv_heads": model.config.num_key_value_heads, "window": ARCH_WINDOW if windowed else None,
            "layer_types": {"sliding_attention": len(windowed), "full_attention": n_layers - len(windowed)},
            "sliding_layers": list(windowed), "rounds": rounds,
            "median_s": {name: statistics.median(t) for name, t in times.items()}, "times_s": times,
            "ratio": ratio, "ratio_every_layer": ratio_every,
            "ratio_to_sdpa": _spread(per_round("one_pass", "plain_sdpa")),
            "plain_to_sdpa": _spread(per_round("plain", "plain_sdpa")),
            "ppl": resumed.ppl,
            "identical_nll_and_evictions_every_layer": bool(torch.equal(resumed.nll, every.nll)) and all(
                torch.equal(resumed.evictions[i], every.evictions[i]) for i in resumed.evictions),
            "bar": SCORE_FIXED_BAR, "meets_bar": ratio["median"] <= SCORE_FIXED_BAR,
            "meets_bar_every_layer": ratio_every["median"] <= SCORE_FIXED_BAR,
        }
        del model
    refused = {}
    for family, extra in REFUSED_ARCHITECTURES.items():
        try:
            architecture_model(family, tokens, **extra)
        except ValueError as err:
            refused[family] = str(err)
        else:
            raise AssertionError(f"{family}: check_supported accepted it; move it to ARCHITECTURES")
    return {"tokens": tokens, "keep_ratio": keep_ratio, "policy": "knorm", "engine": "one_pass", "rounds": rounds,
            "shape": ARCH_SHAPE, "window": ARCH_WINDOW, "dtype": "float32",
            "weights": "random (transformers' initialisation, seed 0)", "ids": "uniform random token ids, seed 0",
            "families": table, "refused": refused, "bar": SCORE_FIXED_BAR,
            "meets_bar": all(row["meets_bar"] for row in table.values()),
            "meets_bar_every_layer": all(row["meets_bar_every_layer"] for row in table.values())}


ARCH_WHAT = "one-pass streaming evaluation cost per architecture family x one plain forward of the same model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--growth", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--before", default="50c815c", help="git revision of knorm_lib to compare with (part 1)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per family and version, after a warm-up")
    ap.add_argument("--skip-engines", action="store_true", help="parts 1 and 3 only")
    ap.add_argument("--skip-architectures", action="store_true", help="leave part 3 out")
    ap.add_argument("--architectures-only", action="store_true",
                    help="part 3 alone: print its line, write no record (a partial one would replace the full one)")
    ap.add_argument("--arch-tokens", type=int, default=2048, help="part 3's text length")
    ap.add_argument("--arch-rounds", type=int, default=3, help="part 3: timed rounds per family, after a warm-up")
    ap.add_argument("--child-peak", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-families", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peak:
        return child_peak(args.child_peak, args.keep_ratio)
    if args.child_families:
        return child_families(args.tokens, args.keep_ratio, args.rounds)
    if args.architectures_only:
        part = time_architectures(args.arch_tokens, args.keep_ratio, args.arch_rounds)
        print(json.dumps({"what": ARCH_WHAT, "config": {"tokens": args.arch_tokens, "keep_ratio": args.keep_ratio,
                                                        "skip_layers": [0, 1], "dtype": "float32"},
                          "numbers": {"architectures": part}, "machine": runtime.machine_info()}))
        return
    families = compare_families(args)
    architectures = {} if args.skip_architectures else {
        "architectures": time_architectures(args.arch_tokens, args.keep_ratio, args.arch_rounds)}
    arch_what = "" if args.skip_architectures else "; " + ARCH_WHAT
    if args.skip_engines:
        line = {"what": "streaming evaluation cost per policy family, x one plain forward, before vs after" + arch_what,
                "config": {"tokens": args.tokens, "keep_ratio": args.keep_ratio, "skip_layers": [0, 1],
                           "model": "SmolLM2-135M-Instruct (embedded)", "dtype": "float32"},
                "numbers": {"per_family": families, **architectures}, "machine": runtime.machine_info()}
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
                "one-pass masked forward vs sequential per-token reference" + arch_what,
        "config": {"document": ids_all.title, "tokens": args.tokens, "keep_ratio": args.keep_ratio,
                   "skip_layers": [0, 1], "model": "SmolLM2-135M-Instruct (embedded)", "dtype": "float32"},
        "numbers": {"per_family": families, "sequential_s": sequential_s, "one_pass_s": one_pass, "speedup": speedup,
                    "reference_forward_s": reference_s, "speedup_each_computing_its_own_reference": speedup_with_reference,
                    "ppl_sequential": seq_result.ppl, "ppl_one_pass": op_result.ppl, "ppl_rel_diff": rel,
                    "flipped_eviction_decisions": flips, "one_pass_s_by_tokens": growth,
                    "peak_rss_4096": peak, "bars": {"speedup_min": 10, "ppl_rel_diff_max": 1e-3, "peak_gb_max": 6},
                    "meets_bars": speedup >= 10 and rel <= 1e-3 and peak["peak_rss_mb"] < 6 * 1024,
                    **architectures},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)


if __name__ == "__main__":
    main()
