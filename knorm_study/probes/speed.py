"""Probes of knorm_study/speed.py (see knorm_study/fingerprint.py): everything 06_speed_tradeoffs
records except what the host's clock and memory measure. Shapes, bytes, counts and FLOPs of tiny
models; the study's tables (TTFT, prefill, decode, cold runs) built by the module's own code on
the tiny float64 Llama under a *fake clock* (``speed.time`` replaced by a deterministic
``perf_counter``; ``peak_memory`` by a stand-in that runs the function and reports fixed bytes;
the cold runs' fresh process by an in-process call of its body), so that the medians, quantiles,
shares and every model and fit downstream are deterministic functions of the code; then the
bandwidth models, the fit, the long-context ratios, the cache comparison, the headline, the TTFT
trap and the findings' text on synthetic timing tables at the study's real sizes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from knorm_study.fingerprint import probe
from knorm_study.probes import _models


class _Clock:
    """A deterministic ``perf_counter``: each call advances by one of 13 distinct steps (so sorted
    step times, medians and quantiles differ from position to position)."""

    def __init__(self) -> None:
        self.t, self.k = 100.0, 0

    def perf_counter(self) -> float:
        self.k += 1
        self.t += 1e-3 * (1 + (self.k * 5) % 13) + 1e-5 * (self.k % 3)
        return self.t


@contextlib.contextmanager
def _fake_host() -> Iterator[_Clock]:
    """``speed``'s clock and memory sampler replaced for the block (restored after)."""
    from knorm_study import speed

    clock = _Clock()
    counter = {"n": 0}

    def peak_memory(fn: Any, interval_s: float = 0.005, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
        counter["n"] += 1
        inc = 1_000_000 * counter["n"] + 12_345
        return fn(), {"kind": "rss", "baseline_bytes": 500_000_000, "peak_bytes": 500_000_000 + inc, "increase_bytes": inc}

    saved = speed.time, speed.peak_memory
    speed.time, speed.peak_memory = SimpleNamespace(perf_counter=clock.perf_counter), peak_memory
    try:
        yield clock
    finally:
        speed.time, speed.peak_memory = saved


def _records(df: Any, drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in drop} for row in df.to_dict("records")]


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except ValueError as err:
        return f"raises {type(err).__name__}"


@probe("speed")
def shapes_and_bytes() -> dict:
    """``model_shape`` (weight bytes, parameters, layers, KV heads, head_dim, KV bytes per token
    and layer), ``kv_bytes_expected`` and ``prefill_flops`` for the tiny float64 Llama and for
    random-weight Llamas from ``random_llama`` (tied embeddings in float16, bfloat16 with one KV
    head, head_dim from the hidden size); ``load`` of a config (what the cold runs rebuild);
    ``run_labels`` on a CPU and (the card's name stubbed) on CUDA; ``text_ids`` with and without a
    tokenizer; ``comparison_points`` and ``check_sizes``."""
    from knorm_study import speed
    from knorm_study.probes.explore import ByteTokenizer

    tiny = _models.tiny_llama()
    models = {
        "tiny_float64": tiny,
        "tied_float16": speed.random_llama(seed=1, dtype=torch.float16, tie_word_embeddings=True, num_hidden_layers=2),
        "bf16_one_kv_head": speed.random_llama(dtype=torch.bfloat16, num_key_value_heads=1, num_hidden_layers=3,
                                               intermediate_size=96),
        "no_head_dim": speed.random_llama(head_dim=None, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                          num_hidden_layers=2),
    }
    out: dict[str, Any] = {}
    for name, m in models.items():
        out[name] = {
            "shape": speed.model_shape(m), "n_params": speed.n_params(m), "weight_bytes": speed.weight_bytes(m),
            "kv_bytes_per_token": speed.kv_bytes_per_token(m),
            "kv_bytes_expected": [speed.kv_bytes_expected(m, n, r, skip) for n, r, skip in (
                (512, 1.0, (0, 1)), (512, 0.25, (0, 1)), (1000, 0.1, (0,)), (4096, 0.5, ()), (7, 0.3, (1,)))],
            "prefill_flops": [speed.prefill_flops(m, n) for n in (1, 16, 1000, 8192)],
        }
    model, tok, cfg, device = speed.load(None, {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                                                "head_dim": 8}, "cpu", None, 300)
    model2, _, cfg2, _ = speed.load(None, {"max_position_embeddings": 128, "num_hidden_layers": 1}, "cpu", "bfloat16", 300)
    out["load"] = {"config": cfg, "device": device, "tokenizer": tok is None, "dtype": str(model.dtype),
                   "shape": speed.model_shape(model), "config2": cfg2, "dtype2": str(model2.dtype),
                   "max_positions2": model2.config.max_position_embeddings}
    out["run_labels"] = [list(speed.run_labels(tiny, None, True, "cpu", "float64", "full")),
                         list(speed.run_labels(tiny, "org/model", False, "cpu", "float32", "quick")),
                         list(speed.run_labels(tiny, None, False, "cpu", "float32", "paper"))]
    card_name = torch.cuda.get_device_name
    torch.cuda.get_device_name = lambda device=None: "NVIDIA H100 80GB HBM3"   # where a CUDA run records
    try:
        out["run_labels"] += [list(speed.run_labels(tiny, None, True, "cuda:0", "bfloat16", "full")),
                              list(speed.run_labels(tiny, "org/m", False, "cuda", "float16", "quick"))]
    finally:
        torch.cuda.get_device_name = card_name
    ids, title = speed.text_ids(None, tiny, 12)
    ids_text, title_text = speed.text_ids(ByteTokenizer(), tiny, 40)
    out["text_ids"] = {"random": ids[0].tolist(), "random_title": title, "text": ids_text[0].tolist(),
                       "text_title": title_text}
    out["comparison_points"] = {
        str((lens, ratios)): [list(p) for p in speed.comparison_points(lens, ratios)]
        for lens, ratios in (([512, 1024, 2048, 4096, 8192], [1.0, 0.75, 0.5, 0.25, 0.1]), ([256, 512], [1.0, 0.5, 0.1]),
                             ([4096, 16384], [0.5, 0.25]), ([100], [1.0]), ([1024, 8192], [0.75, 0.3]))}
    out["long_lens"] = [speed._long_lens(x) for x in ([512, 1024, 2048, 4096, 8192], [256, 512], [4095, 4096, 32768])]
    sizes = {"headline_len": 512, "context_lens": [256, 512]}
    out["check_sizes"] = [_outcome(lambda: speed.check_sizes(s, k, p) or "accepted") for s, k, p in (
        (sizes, [1.0, 0.5], ["knorm"]), (sizes, [0.5, 0.25], ["knorm"]), ({**sizes, "headline_len": 1024}, [1.0], ["knorm"]),
        (sizes, [1.0], ["knorm", "snapkv"]), (sizes, [1.0], ["knorm", "h2o"]), (sizes, [1.0], ["streaming", "random"]))]
    out["cache_kinds"], out["kv_passes"] = list(speed.CACHE_KINDS), speed.KV_PASSES
    return out


@probe("speed")
def measured_tables() -> dict:
    """The notebook's pipeline on the tiny Llama under the fake clock: ``memory_bandwidth`` and
    ``matmul_rate`` (bytes and FLOPs over median times), ``ttft_tables`` (two contexts, knorm and
    streaming, keep_ratio 1.0 at 0 s) with ``with_compute_estimate``, ``decode_table`` (exact KV
    bytes counted and by formula, both decode caches at the comparison points, greedy tokens, TPOT
    quantiles), ``step_overhead``, ``with_bandwidth_model``, ``with_overhead_models``,
    ``with_attention_model``, ``tpot_fit``, ``long_context_ratios``, ``cache_comparison``,
    ``headline_numbers`` and ``max_compress_share``; ``timed``; and ``ttft_tables``' long-context
    repeats above 4096 tokens (``time_ttft`` replaced by a stand-in there)."""
    from knorm_study import speed

    model = _models.tiny_llama()
    all_ids = _models.ids(24, seed=5)
    keep_ratios, policies, skip = [1.0, 0.5, 0.25], ["knorm", "streaming"], [0, 1]
    with _fake_host():
        bw = speed.memory_bandwidth(64 * 1024, repeats=3)
        mm = speed.matmul_rate(8, repeats=3, dtype=model.dtype)
        timed = speed.timed(lambda: None, repeats=4, warmup=2)
        ttft, prefill_df, prefills, ttft_s = speed.ttft_tables(model, all_ids, [16, 24], keep_ratios, policies, skip, 3, 2)
        prefill_df = speed.with_compute_estimate(prefill_df, model, mm["flop_per_s"])
        dec, dec_s = speed.decode_table(model, prefills, keep_ratios, policies, skip, 24, 3, "cpu")
        W = speed.weight_bytes(model)
        bandwidth = max(bw["read_bytes_per_s"], bw["gemv_bytes_per_s"])
        dec = speed.with_bandwidth_model(dec, W, bandwidth)
        overhead = speed.step_overhead(model, "cpu", n_steps=6)
        dec = speed.with_overhead_models(dec, W, bandwidth, overhead, bw["gemv_bytes_per_s"])
        dec = speed.with_attention_model(dec, model, skip, W, overhead, bw["gemv_bytes_per_s"], room=8)
    fit = speed.tpot_fit(dec, W, bandwidth)
    out = {"bandwidth": {k: v for k, v in bw.items()}, "matmul": mm, "timed": timed,
           "ttft": _records(ttft), "prefill": _records(prefill_df, drop=("prefill_s",)),
           "prefill_s": prefill_df.prefill_s.tolist(), "ttft_seconds": ttft_s, "decode": _records(dec),
           "decode_seconds": dec_s, "step_overhead_s": overhead, "tpot_fit": fit,
           "long": speed.long_context_ratios(dec, [16, 24]), "cache_comparison": speed.cache_comparison(dec),
           "headline": speed.headline_numbers(ttft, dec, 24, keep_ratios),
           "headline_no_025": speed.headline_numbers(ttft, dec, 24, [1.0, 0.5]),
           "compress_share_max": [speed.max_compress_share(ttft, n) for n in (16, 24)],
           "prefill_last_logits_argmax": {n: int(p.last_logits.argmax(-1)) for n, p in prefills.items()}}

    # contexts above 4096 tokens take ``long_repeats``: the pieces replaced by a stand-in
    def fake_time_ttft(model: Any, ids: torch.Tensor, ratios: Any, pols: Any, skip_layers: Any, repeats: int,
                       warmup: int) -> tuple[dict[str, Any], Any]:
        n = ids.shape[1]
        pre = [1.0 + 0.1 * i + n / 1e4 for i in range(repeats)]
        comp = {f"{p}@{r}": [0.0 if r == 1.0 else 0.01 * (i + 1) * (1 - r) for i in range(repeats)]
                for p in pols for r in ratios}
        return {"n_tokens": n, "prefill_s": pre, "compress_s": comp,
                "ttft_s": {k: [a + b for a, b in zip(pre, v)] for k, v in comp.items()},
                "prefill_peak_memory": {"increase_bytes": 7e6 + n, "peak_bytes": 9e8 + n}}, None

    saved = speed.time_ttft
    speed.time_ttft = fake_time_ttft
    try:
        with _fake_host():
            long_ttft, long_prefill, _, _ = speed.ttft_tables(None, torch.zeros(1, 4100, dtype=torch.long), [4096, 4097],
                                                              [1.0, 0.25], ["knorm"], skip, 5, 2)
    finally:
        speed.time_ttft = saved
    out["long_ttft"], out["long_prefill"] = _records(long_ttft), _records(long_prefill)
    return out


@probe("speed")
def cold_runs_and_trap() -> dict:
    """``cold_runs`` → ``cold_warm_ttft`` → the fresh process's body (``_cold_child``: model from
    the config, rounds of keep_ratios in order) → ``trap_table`` → ``trap_medians``, under the
    fake clock, the fresh process replaced by an in-process call of ``_cold_child`` with the spec
    it would read; the spec itself."""
    from knorm_study import speed

    specs = []
    real_run = subprocess.run

    def fake_run(cmd: Any, input: str = "", **kwargs: Any) -> subprocess.CompletedProcess:
        specs.append(json.loads(input))
        stdin, out = sys.stdin, io.StringIO()
        sys.stdin = io.StringIO(input)
        try:
            with contextlib.redirect_stdout(out):
                speed._cold_child(speed.time.perf_counter())
        finally:
            sys.stdin = stdin
        return subprocess.CompletedProcess(cmd, 0, out.getvalue(), "")

    config = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8, "vocab_size": 256}
    subprocess.run = fake_run
    try:
        with _fake_host():
            cold, seconds = speed.cold_runs(_models.ids(20, seed=3), [8, 12], 2, model_config=config, dtype="float64",
                                            skip_layers=[0])
    finally:
        subprocess.run = real_run
    trap = speed.trap_table(cold)
    return {"cold": _records(cold), "seconds": seconds, "trap": _records(trap), "medians": speed.trap_medians(trap),
            "spec": specs[0], "n_specs": len(specs)}


def _synthetic_decode(with_attention: bool = True) -> Any:
    """A decode table at the study's sizes (SmolLM2's KV bytes per token and layer, layers 0 and 1
    whole), TPOT the measured-terms model (step cost, weights at the gemv rate, KV passes at the
    bandwidth) times a deterministic factor from 1.04 to 1.28 (near the 1.3x bar); both caches at
    the comparison points; a second policy at the headline context."""
    import pandas as pd

    from knorm_study import speed

    per_token, layers, skip, weights, bw = 1536, 30, (0, 1), 538_000_000, 20e9
    rows = []
    compare = speed.comparison_points([512, 1024, 2048, 4096, 8192], [1.0, 0.5, 0.25, 0.1])
    for i, n in enumerate([512, 1024, 2048, 4096, 8192]):
        for j, r in enumerate([1.0, 0.5, 0.25, 0.1]):
            for policy in ("knorm", "streaming"):
                if policy != "knorm" and (n != 4096 or r == 1.0):
                    continue
                kept = max(1, round(n * r))
                kv = per_token * (len(skip) * n + (layers - len(skip)) * kept)
                for kind in speed.CACHE_KINDS if policy == "knorm" and (n, r) in compare else ("in_place",):
                    passes = speed.KV_PASSES[kind]
                    # measured over the gemv model: 1.04 to 1.28, under the 1.3x bar
                    tpot = (0.004 + weights / 17e9 + passes * kv / bw) * (1.04 + 0.06 * ((i * 3 + j) % 5))
                    tokens = [7, 8, 9, 10 + (kind == "dynamic" and n == 8192 and r == 0.25)]
                    row = {"context": n, "policy": policy, "keep_ratio": r, "cache": kind, "n_kept": kept, "kv_bytes": kv,
                           "tpot_median_s": tpot, "tokens": tokens, "decode_peak_increase_MB": 3.0 + kv / 1e6}
                    if with_attention and kind == "in_place":
                        row["attention_s"] = kv / (bw * (0.9 + 0.05 * j))
                    rows.append(row)
    dec = pd.DataFrame(rows)
    dec = speed.with_bandwidth_model(dec, weights, bw)
    dec = speed.with_overhead_models(dec, weights, bw, 0.004, 17e9)
    if with_attention:
        dec["attention_bytes_per_s"] = dec.kv_bytes / dec.attention_s
        dec["predicted_attention_s"] = 0.004 + weights / 17e9 + dec.attention_s
    return dec, weights, bw


def _synthetic_ttft() -> Any:
    import pandas as pd

    rows = []
    for i, n in enumerate([512, 1024, 2048, 4096, 8192]):
        for j, r in enumerate([1.0, 0.5, 0.25, 0.1]):
            for policy in ("knorm", "streaming"):
                comp = 0.0 if r == 1.0 else 0.001 * (1 + i) * (1 + 0.2 * j) * (2 if policy == "streaming" else 1)
                ttft = 0.1 * 2 ** i * (1 + 0.01 * ((i + j) % 3)) + comp
                rows.append({"context": n, "policy": policy, "keep_ratio": r, "repeats": 5 if n <= 4096 else 2,
                             "ttft_median_s": ttft, "compress_share_of_ttft": comp / ttft})
    return pd.DataFrame(rows)


def _synthetic_cold() -> Any:
    import pandas as pd

    rows = []
    for n in (256, 1024):
        for proc in range(2):
            for rnd in range(3):
                for r in (1.0, 0.25):
                    first = rnd == 0 and r == 1.0
                    t = ((0.05 * n / 256) * (1 + 0.03 * rnd + 0.02 * proc) * (0.97 if r == 0.25 else 1)
                         * (4.0 if first else 1))
                    rows.append({"context": n, "process": proc, "round": rnd, "keep_ratio": r, "ttft_s": t,
                                 "import_s": 2.5, "load_s": 1.1 + 0.1 * proc})
    return pd.DataFrame(rows)


@probe("speed")
def models_on_synthetic_tables() -> dict:
    """On synthetic tables at the study's sizes: ``with_bandwidth_model``, ``with_overhead_models``,
    ``tpot_fit``, ``long_context_ratios`` (with and without the attention model; contexts at and
    above 4096), ``cache_comparison`` (tokens that agree and one that does not),
    ``headline_numbers`` (0.25 measured or not), ``max_compress_share``, ``trap_table`` and
    ``trap_medians``."""
    from knorm_study import speed

    dec, weights, bw = _synthetic_decode()
    plain, _, _ = _synthetic_decode(with_attention=False)
    ttft = _synthetic_ttft()
    trap = speed.trap_table(_synthetic_cold())
    cols = ["context", "policy", "keep_ratio", "cache", "predicted_tpot_s", "measured_over_model",
            "predicted_with_overhead_s", "predicted_gemv_s"]
    return {
        "models": dec[cols].to_dict("records"),
        "tpot_fit": speed.tpot_fit(dec, weights, bw),
        "long": speed.long_context_ratios(dec, [512, 1024, 2048, 4096, 8192]),
        "long_no_attention": speed.long_context_ratios(plain, [512, 1024, 2048]),
        "long_strict_bar": speed.long_context_ratios(plain[plain.context < 8192], [512, 1024, 2048, 4096]),
        "cache_comparison": speed.cache_comparison(dec),
        "headline": speed.headline_numbers(ttft, dec, 4096, [1.0, 0.5, 0.25, 0.1]),
        "headline_no_025": speed.headline_numbers(ttft, dec, 4096, [1.0, 0.5, 0.1]),
        "compress_share_max": [speed.max_compress_share(ttft, n) for n in (512, 4096)],
        "trap": _records(trap), "trap_medians": speed.trap_medians(trap),
    }


def _record(dec: Any, ttft: Any, trap: Any, weights: int, bw: float, ops_cat: bool) -> dict:
    """A 06 record as ``findings`` reads it (JSON round trip: keys become strings)."""
    from knorm_study import runtime, speed

    sizes = {"headline_len": 4096, "context_lens": [512, 1024, 2048, 4096, 8192], "cold_lens": [256, 1024],
             "n_cold_processes": 2}
    keep = [1.0, 0.75, 0.5, 0.25, 0.1] if ops_cat else [1.0, 0.5, 0.1]
    prefill = [{"context": n, "measured_over_predicted": 1.4 + 0.1 * i, "prefill_peak_increase_MB": 40.0 * 2 ** i}
               for i, n in enumerate(sizes["context_lens"])]
    ops = [{"op": op, "share_of_wall": s} for op, s in (("aten::mm", 0.41), ("aten::cat", 0.22 if ops_cat else 0.001),
                                                        ("aten::bmm", 0.1), ("aten::add", 0.05), ("aten::mul", 0.02))]
    summary = {"headline": speed.headline_numbers(ttft, dec, 4096, keep), "tpot_fit": speed.tpot_fit(dec, weights, bw),
               "bandwidth_probes": {"read_bytes_per_s": 21e9, "gemv_bytes_per_s": 17e9, "copy_bytes_per_s": 9e9},
               "bandwidth_bytes_per_s": bw, "weight_bytes": weights, "step_overhead_s": 0.004,
               "profile_ops": ops if ops_cat else ops[:1], "profile_ops_dynamic": ops, "profile_context": 8192,
               "cache_comparison": speed.cache_comparison(dec),
               "compress_share_of_ttft_at_headline_max": speed.max_compress_share(ttft, 4096),
               **speed.long_context_ratios(dec, sizes["context_lens"]), **speed.trap_medians(trap)}
    record = {"parameters": {"keep_ratios": keep, "skip_layers": [0, 1], "sizes": sizes},
              "results": {"summary": summary, "ttft": ttft.to_dict("records"), "prefill": prefill,
                          "decode": dec.to_dict("records")}}
    return json.loads(json.dumps(runtime._finite(record), default=str))


@probe("speed")
def findings_text() -> dict:
    """``findings``' Markdown on two synthetic records: TTFT flat, decode faster, the attention
    model present; and TTFT changed by more than 5 %, decode not faster, no attention model, no
    ``aten::cat`` among the in-place operators."""
    from knorm_study import speed

    dec, weights, bw = _synthetic_decode()
    ttft = _synthetic_ttft()
    trap = speed.trap_table(_synthetic_cold())
    first = speed.findings(_record(dec, ttft, trap, weights, bw, True))
    plain, _, _ = _synthetic_decode(with_attention=False)
    slow = plain.copy()
    slow.loc[(slow.context == 4096) & (slow.keep_ratio < 1), "tpot_median_s"] = 0.05
    ttft2 = ttft.copy()
    ttft2.loc[(ttft2.context == 4096) & (ttft2.keep_ratio < 1), "ttft_median_s"] *= 1.2
    second = speed.findings(_record(slow, ttft2, trap, weights, bw, False))
    return {"findings": first, "findings_other": second}
