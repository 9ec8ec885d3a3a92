"""The speed study (06_speed_tradeoffs): exact bytes, peak memory, timed decode, machine rates, cold starts,
and the study's analysis (TTFT and decode tables, the bandwidth model and its fits, the TTFT trap, findings)."""

from __future__ import annotations

import functools
import gc
import json
import numbers
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch

import knorm_lib as kl
from knorm_study import decode, runtime


def random_llama(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 **config: Any) -> Any:
    """A random-weight Llama built from a config (no download), with knorm_lib's attention function.

    Defaults give a tiny model for tests (4 layers, 4 query heads, 2 KV heads, head_dim 16);
    pass e.g. ``num_hidden_layers=32, hidden_size=4096, ...`` for a speed study at real shapes
    (speed does not depend on the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kl._register_attention()
    defaults = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                    rope_theta=10_000.0, tie_word_embeddings=False)
    cfg = LlamaConfig(**{**defaults, **config})
    cfg._attn_implementation = kl.ATTN_IMPLEMENTATION
    torch.manual_seed(seed)
    if torch.device(device).type == "cpu":
        model = LlamaForCausalLM(cfg).to(dtype=dtype)
    else:   # initialised on the card: seconds instead of a minute for real shapes (other random weights)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype=dtype)
    return model.eval()


def _sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on a CPU.
    Every timing in this module brackets its clock with it."""
    if str(device).startswith("cuda"):   # every card: a model spread by device_map="auto" runs on several
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def timed(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: Any = "cpu") -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times, each bracketed by ``_sync(device)``;
    median and spread in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1], "times_s": times}


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters, each shared tensor (tied embeddings) counted once:
    what one decode step must stream from memory besides the KV cache."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _malloc_trim() -> None:
    """glibc only: return free heap memory to the OS (otherwise freed memory stays resident)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], interval_s: float = 0.005, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once; return its result and the peak memory while it ran.

    CPU: resident memory sampled every ``interval_s`` by a background thread (short spikes between
    samples can be missed; on glibc, free heap memory is trimmed first so that the resident set
    tracks live memory). CUDA: the allocator's exact peak.
    ``increase_bytes`` is the peak above the memory held just before the call."""
    import threading

    if not isinstance(interval_s, numbers.Real) or not interval_s > 0:
        raise ValueError(f"interval_s={interval_s!r}: must be a positive number of seconds")
    if str(device).startswith("cuda"):
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return result, {"kind": "cuda_allocated", "baseline_bytes": base, "peak_bytes": peak,
                        "increase_bytes": peak - base}
    # collect garbage and hand freed heap pages back first, so the resident set tracks live memory
    # and no earlier garbage is freed inside the measurement (it would hide what ``fn`` allocates)
    gc.collect()
    _malloc_trim()
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return result, {"kind": "rss", "baseline_bytes": base, "peak_bytes": peak[0], "increase_bytes": peak[0] - base}


# How a decode step holds the cache: "in_place" is the study's decode path (``decode.generate_greedy``:
# preallocated, appended in place, grouped-query attention); "dynamic" is transformers'
# ``DynamicCache`` (a ``torch.cat`` copy of every layer per token) with per-head attention.
CACHE_KINDS: tuple[str, ...] = ("in_place", "dynamic")
# Times a step reads or writes each kept KV byte: attention's read; "dynamic" adds cat's read and write.
KV_PASSES = {"in_place": 1, "dynamic": 3}


def _decode_cache(cache: kl.KVCache, cache_kind: str, room: int) -> tuple[Any, bool]:
    """The transformers cache a decode of ``room`` tokens runs on, and whether attention is grouped."""
    if cache_kind == "in_place":
        return decode.in_place_cache(cache, room), True
    return cache.to_transformers(), False


@torch.inference_mode()
def timed_decode(model: Any, cache: kl.KVCache, first_token: torch.Tensor, n_tokens: int, warmup: int = 2,
                 position_mode: kl.PositionMode = "absolute", cache_kind: str = "in_place") -> dict[str, Any]:
    """Greedy decoding of ``n_tokens`` tokens after ``first_token`` on ``cache``, one forward per
    token, each step timed (device synchronised). The first ``warmup`` steps are run but not
    reported. New tokens are numbered exactly as in ``decode.generate_greedy`` (true positions under
    ``absolute``); ``cache`` itself is never modified; ``cache_kind`` (``CACHE_KINDS``) picks the
    decode path. Returns per-step seconds, their median (TPOT) and the tokens generated."""
    kl._positive_int("n_tokens", n_tokens)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: must be an int >= 0")
    kl._check_choice("cache_kind", cache_kind, CACHE_KINDS)
    cache, position = kl._numbered(cache, model, position_mode)
    dyn, grouped = _decode_cache(cache, cache_kind, warmup + n_tokens)
    token = first_token.to(model.device).view(1, 1)
    times, tokens = [], []
    for _ in range(warmup + n_tokens):
        _sync(model.device)
        t0 = time.perf_counter()
        token = decode.greedy_step(model, dyn, token, position, grouped)
        _sync(model.device)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
        position += 1
    steps = times[warmup:]
    ordered = sorted(steps)
    return {"step_s": steps, "warmup_step_s": times[:warmup], "median_s": ordered[len(ordered) // 2],
            "q25_s": ordered[len(ordered) // 4], "q75_s": ordered[(3 * len(ordered)) // 4],
            "min_s": ordered[0], "max_s": ordered[-1], "tokens": torch.cat(tokens, dim=1)[0].cpu().tolist()}


def _check_policies(policies: Sequence[str]) -> None:
    """Prefill policies scored from the cache alone: kvpress presses also read the prefill's hidden
    states, which the speed study does not keep (at 8k tokens they would outweigh the cache)."""
    for p in policies:
        kl.check_policy("policies", p, "prefill")
        kl._require(not kl.needs_layer_inputs(p), "policies", p,
                    "a policy scored from the cache alone (kvpress presses and knorm_prenorm need the prefill's "
                    "hidden states)")


@torch.inference_mode()
def time_ttft(model: Any, input_ids: torch.Tensor, keep_ratios: Sequence[float], policies: Sequence[str] = ("knorm",),
              skip_layers: Sequence[int] = (0, 1), repeats: int = 5, warmup: int = 1) -> tuple[dict[str, Any], kl.Prefill]:
    """Time-to-first-token pieces for one context: each repeat runs one prefill (the first token is
    the argmax of its last logits) and then compresses that same cache under every
    (policy, keep_ratio); TTFT of a configuration in a repeat = that prefill + that compression.
    ``keep_ratio`` 1.0 means no compression (0 s). ``warmup`` untimed prefills run first; the first
    of them is watched by ``peak_memory``. Returns the timings (seconds per repeat) and the last prefill."""
    kl._positive_int("repeats", repeats)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: must be an int >= 0")
    ratios = [kl._check_keep_ratio(r) for r in keep_ratios]
    if not ratios or not policies:
        raise ValueError("keep_ratios, policies: need at least one of each")
    _check_policies(policies)
    input_ids = kl._check_ids(input_ids).to(model.device)
    device = model.device
    pre, memory = peak_memory(lambda: kl.prefill(model, input_ids), device=str(device)) if warmup else (None, None)
    for _ in range(max(warmup - 1, 0)):
        pre = kl.prefill(model, input_ids)
    prefill_s: list[float] = []
    compress_s: dict[str, list[float]] = {f"{p}@{r}": [] for p in policies for r in ratios}
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        pre = kl.prefill(model, input_ids)
        pre.last_logits.argmax(-1).item()
        _sync(device)
        prefill_s.append(time.perf_counter() - t0)
        for p in policies:
            for r in ratios:
                if r == 1.0:
                    compress_s[f"{p}@{r}"].append(0.0)
                    continue
                _sync(device)
                t0 = time.perf_counter()
                kl.compress_cache(pre.cache, r, p, skip_layers)
                _sync(device)
                compress_s[f"{p}@{r}"].append(time.perf_counter() - t0)
    ttft_s = {k: [a + b for a, b in zip(prefill_s, v)] for k, v in compress_s.items()}
    return {"n_tokens": int(input_ids.shape[1]), "prefill_s": prefill_s, "compress_s": compress_s, "ttft_s": ttft_s,
            "prefill_peak_memory": memory}, pre


def memory_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """This machine's memory bandwidth (bytes/s, median over ``repeats`` after one warm-up) three
    ways, on float32 buffers of ``n_bytes`` (far larger than a CPU cache): ``read`` (a sum),
    ``copy`` (read + write counted) and ``gemv`` (a matrix-vector product streaming the matrix,
    which is what a decode step does with every weight)."""
    kl._positive_int("n_bytes", n_bytes)
    kl._positive_int("repeats", repeats)
    n = n_bytes // 4
    cols = 4096
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    w = x[: (n // cols) * cols].view(-1, cols)
    v = torch.rand(cols, device=device)
    out: dict[str, Any] = {"n_bytes": n * 4}
    for name, fn, moved in [("read", lambda: x.sum(), n * 4), ("copy", lambda: y.copy_(x), 2 * n * 4),
                            ("gemv", lambda: w @ v, w.numel() * 4)]:
        t = timed(fn, repeats=repeats, warmup=1, device=device)
        out[f"{name}_bytes_per_s"] = moved / t["median_s"]
        out[f"{name}_s"] = t["times_s"]
    return out


def matmul_rate(n: int = 1024, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Arithmetic rate of an ``n x n`` matrix product (FLOP/s = 2 n^3 / median time), after one warm-up."""
    kl._positive_int("n", n)
    kl._positive_int("repeats", repeats)
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, repeats=repeats, warmup=1, device=device)
    return {"n": n, "dtype": str(dtype), "flop_per_s": 2 * n**3 / t["median_s"], "times_s": t["times_s"]}


def op_profile(fn: Callable[[], Any], top: int = 10, device: Any = "cpu") -> list[dict[str, Any]]:
    """Run ``fn`` under ``torch.profiler``; the ``top`` operators by self time, with their share of
    the profiled wall time and call counts (where a decode step's time goes). On CUDA the time is
    the kernels' time on the card (``self_device_s``): there the CPU time of an operator is its
    launch, not its work."""
    from torch.profiler import ProfilerActivity, profile

    kl._positive_int("top", top)
    on_cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - t0

    def self_s(e: Any) -> float:
        return (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / 1e6

    events = sorted(prof.key_averages(), key=self_s, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
             **({"self_device_s": self_s(e)} if on_cuda else {}), "share_of_wall": self_s(e) / wall}
            for e in events[:top]]


@torch.inference_mode()
def decode_profile(model: Any, cache: kl.KVCache, first_token: torch.Tensor, n_steps: int = 3, top: int = 10,
                   position_mode: kl.PositionMode = "absolute", cache_kind: str = "in_place") -> list[dict[str, Any]]:
    """``op_profile`` of ``n_steps`` decode steps on ``cache`` (true positions under ``absolute``),
    numbered and run as in ``timed_decode``. The copy into the decode cache happens before the
    profiled region, so the profile holds only what every step pays."""
    kl._positive_int("n_steps", n_steps)
    kl._check_choice("cache_kind", cache_kind, CACHE_KINDS)
    cache, position = kl._numbered(cache, model, position_mode)
    dyn, grouped = _decode_cache(cache, cache_kind, n_steps)
    state = {"token": first_token.to(model.device).view(1, 1), "position": position}

    def steps() -> None:
        for _ in range(n_steps):
            state["token"] = decode.greedy_step(model, dyn, state["token"], state["position"], grouped)
            state["position"] += 1
        _sync(model.device)

    return op_profile(steps, top, model.device)


# The fresh process: its clock starts before anything is imported; it runs ``_cold_child`` below.
_COLD_CHILD = "import time; t_start = time.perf_counter(); from knorm_study import speed; speed._cold_child(t_start)"


def _cold_child(t_start: float) -> None:
    """Body of ``cold_warm_ttft``'s fresh process: read the spec from stdin, load the model, then
    ``time_ttft`` (one repeat, no warm-up) for each keep_ratio in order, ``rounds`` times; print
    one ``COLD_JSON`` line with the import and load times and the rows."""
    import sys

    spec = json.loads(sys.stdin.read())
    t_import = time.perf_counter()
    if spec["model_config"] is not None:
        model = random_llama(seed=0, dtype=getattr(torch, spec["dtype"]), device=spec["device"], **spec["model_config"])
    else:
        model, _ = kl.load_model(spec["model_name"], device=spec["device"], dtype=spec["dtype"])
    ids = torch.tensor([spec["input_ids"]])
    t_load = time.perf_counter()
    rows = []
    for rnd in range(spec["rounds"]):
        for r in spec["keep_ratios"]:
            t, _ = time_ttft(model, ids, [r], [spec["policy"]], spec["skip_layers"], repeats=1, warmup=0)
            rows.append({"round": rnd, "keep_ratio": r, "ttft_s": t["ttft_s"][f"{spec['policy']}@{r}"][0]})
    print("COLD_JSON " + json.dumps({"import_s": t_import - t_start, "load_s": t_load - t_import, "rows": rows}))


def cold_warm_ttft(input_ids: torch.Tensor, keep_ratios: Sequence[float] = (1.0, 0.25), rounds: int = 3,
                   model_name: str | None = None, model_config: dict[str, Any] | None = None,
                   device: str = "cpu", dtype: str = "float32", policy: str = "knorm",
                   skip_layers: Sequence[int] = (0, 1), timeout_s: float = 600) -> dict[str, Any]:
    """The TTFT trap, measured: in a *fresh* Python process, load the model and time
    prefill + compression + first token for each keep_ratio in order, ``rounds`` times. Round 0's
    first configuration (put the baseline first) is the process's first call: it pays lazy
    initialisation, allocator and kernel warm-up. Returns the child's rows (round, keep_ratio,
    ttft_s) and its import and load times. ``model_config`` builds a random-weight Llama instead."""
    import subprocess
    import sys

    ratios = [kl._check_keep_ratio(r) for r in keep_ratios]
    kl._positive_int("rounds", rounds)
    if not ratios:
        raise ValueError("keep_ratios: need at least one")
    if model_config is not None and not isinstance(model_config, dict):
        raise ValueError(f"model_config={model_config!r}: must be None or a dict of LlamaConfig fields")
    ids = kl._check_ids(input_ids)
    spec = {"input_ids": ids[0].tolist(), "keep_ratios": ratios, "rounds": rounds, "model_name": model_name,
            "model_config": model_config, "device": device, "dtype": dtype, "policy": policy,
            "skip_layers": list(skip_layers)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(kl.PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _COLD_CHILD], input=json.dumps(spec), capture_output=True,
                          text=True, env=env, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COLD_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"cold_warm_ttft: the fresh process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("COLD_JSON "):])


# ---- the study (06_speed_tradeoffs): shapes, tables, the bandwidth model, the TTFT trap, findings ----

def check_sizes(sizes: dict[str, Any], keep_ratios: Sequence[float], policies: Sequence[str] = ("knorm",)) -> None:
    """The notebook's sizes: the headline context is one of the measured ones, keep_ratio 1.0
    (the uncompressed baseline) is among ``keep_ratios``, and the policies can be timed."""
    _check_policies(policies)
    if sizes["headline_len"] not in sizes["context_lens"]:
        raise ValueError(f"headline_len={sizes['headline_len']}: must be one of context_lens={sizes['context_lens']}")
    if 1.0 not in keep_ratios:
        raise ValueError(f"keep_ratios={list(keep_ratios)}: must include 1.0, the uncompressed baseline")


def load(model_name: str | None, model_config: dict[str, Any] | None, device: str, dtype: str | None,
         max_len: int) -> tuple[Any, Any, dict[str, Any] | None, str]:
    """The model to time: ``model_config`` (LlamaConfig fields) builds a random-weight Llama (speed
    does not depend on the weights; no tokenizer) with room for ``max_len`` positions unless the
    config says otherwise, else ``kl.load_model``. ``dtype=None``: bfloat16 on CUDA, float32 on a
    CPU. Returns the model, the tokenizer (or None), the config actually used (what a fresh process
    must build again) and the device the timings synchronise on (``"auto"`` resolved to the card
    that holds the model's first layers)."""
    kl._check_device(device)
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dtype = runtime.model_dtype(dtype, device)
    if model_config is None:
        model, tokenizer = kl.load_model(model_name, device=device, dtype=dtype)
        return model, tokenizer, None, str(model.device)
    model_config = {"max_position_embeddings": max_len, **model_config}
    device = ("cuda" if on_cuda else "cpu") if device == "auto" else device
    model = random_llama(seed=0, dtype=getattr(torch, dtype), device=device, **model_config)
    return model, None, model_config, str(model.device)


def run_labels(model: Any, model_name: str | None, random_weights: bool, device: str, dtype: str,
               profile: str) -> tuple[str, str, str]:
    """``(card, record_as, model_label)``: the device's name ("cpu" or the CUDA card's), the name the
    results are recorded under (the profile on a CPU; ``gpu-<card>`` on CUDA, kept apart from the
    CPU report) and a one-line description of model, dtype and device."""
    import re

    on_gpu = str(device).startswith("cuda")
    card = torch.cuda.get_device_name(torch.device(device)) if on_gpu else "cpu"
    record_as = ("gpu-" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")) if on_gpu else profile
    cfg = model.config
    label = (f"random Llama {cfg.num_hidden_layers}L×{cfg.hidden_size}" if random_weights
             else (model_name or "SmolLM2-135M-Instruct")) + f", {dtype}, {card if on_gpu else 'CPU'}"
    return card, record_as, label


def text_ids(tokenizer: Any, model: Any, n_tokens: int) -> tuple[torch.Tensor, str]:
    """``(1, n_tokens)`` ids to time on and their title: one long Wikipedia article, or seeded
    random ids when there is no tokenizer (a random-weight model: speed does not depend on the text)."""
    if tokenizer is not None:
        doc = kl.long_documents(tokenizer, "wiki", n_tokens, 1)[0]
        return doc.input_ids, doc.title
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    return ids, "random token ids"


def n_params(model: Any) -> int:
    """Parameters, each shared tensor counted once (what ``model.parameters()`` yields)."""
    return sum(p.numel() for p in model.parameters())


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token adds to ONE layer's KV cache: keys and values of every KV head, in the
    model's dtype."""
    return 2 * model.config.num_key_value_heads * kl._head_dim(model) * (torch.finfo(model.dtype).bits // 8)


def kv_bytes_expected(model: Any, n: int, keep_ratio: float, skip_layers: Sequence[int]) -> int:
    """KV bytes of an ``n``-token cache compressed to ``keep_ratio`` with ``skip_layers`` whole
    (to check the bytes counted from the tensors)."""
    n_layers = model.config.num_hidden_layers
    return kv_bytes_per_token(model) * (len(skip_layers) * n + (n_layers - len(skip_layers)) * kl.n_kept_for(n, keep_ratio))


def model_shape(model: Any) -> dict[str, Any]:
    """The model's sizes that the bandwidth and compute models use."""
    cfg = model.config
    return {"weight_bytes": weight_bytes(model), "n_params": n_params(model), "layers": cfg.num_hidden_layers,
            "kv_heads": cfg.num_key_value_heads, "head_dim": kl._head_dim(model),
            "kv_bytes_per_token_per_layer": kv_bytes_per_token(model)}


def prefill_flops(model: Any, n: int) -> int:
    """A prefill's FLOPs, roughly: 2 per non-embedding parameter per token, the causal attention
    (2·2·layers·query heads·head_dim·n²/2) and one row of logits."""
    cfg = model.config
    n_embed = cfg.vocab_size * cfg.hidden_size
    return (2 * (n_params(model) - n_embed) * n + 2 * cfg.num_hidden_layers * cfg.num_attention_heads
            * kl._head_dim(model) * n * n + 2 * n_embed)


def ttft_tables(model: Any, all_ids: torch.Tensor, context_lens: Sequence[int], keep_ratios: Sequence[float],
                policies: Sequence[str], skip_layers: Sequence[int], repeats: int,
                long_repeats: int) -> tuple[Any, Any, dict[int, kl.Prefill], float]:
    """``time_ttft`` on the first ``n`` tokens of ``all_ids`` for each context length (``long_repeats``
    above 4096 tokens). Returns one row per (context, policy, keep_ratio) with TTFT and compression
    medians, spread and compression's share of TTFT; one row per context with the prefill's timings
    and peak memory (pandas DataFrames); the last prefill per context; the seconds taken."""
    import pandas as pd

    ttft_rows, prefill_rows, prefills = [], [], {}
    t_start = time.perf_counter()
    for n in context_lens:
        reps = repeats if n <= 4096 else long_repeats
        t, prefills[n] = time_ttft(model, all_ids[:, :n], keep_ratios, policies, skip_layers, repeats=reps, warmup=1)
        mem = t["prefill_peak_memory"]
        prefill_rows.append({"context": n, "prefill_median_s": statistics.median(t["prefill_s"]),
                             "prefill_min_s": min(t["prefill_s"]), "prefill_max_s": max(t["prefill_s"]),
                             "prefill_s": t["prefill_s"], "prefill_peak_increase_MB": mem["increase_bytes"] / 1e6,
                             "prefill_peak_MB": mem["peak_bytes"] / 1e6})
        for key, times in t["ttft_s"].items():
            policy, r = key.split("@")
            comp = t["compress_s"][key]
            ttft_rows.append({"context": n, "policy": policy, "keep_ratio": float(r), "repeats": reps,
                              "ttft_median_s": statistics.median(times), "ttft_min_s": min(times),
                              "ttft_max_s": max(times), "compress_median_s": statistics.median(comp),
                              "compress_share_of_ttft": statistics.median([c / x for c, x in zip(comp, times)]),
                              "ttft_s": times, "compress_s": comp})
    return pd.DataFrame(ttft_rows), pd.DataFrame(prefill_rows), prefills, time.perf_counter() - t_start


def with_compute_estimate(prefill_df: Any, model: Any, flop_per_s: float) -> Any:
    """``prefill_df`` plus the compute-bound estimate (``prefill_flops`` / ``flop_per_s``) and the
    measured median over it."""
    out = prefill_df.copy()
    out["predicted_compute_s"] = [prefill_flops(model, n) / flop_per_s for n in out.context]
    out["measured_over_predicted"] = out.prefill_median_s / out.predicted_compute_s
    return out


def comparison_points(context_lens: Sequence[int], keep_ratios: Sequence[float]) -> list[tuple[int, float]]:
    """(context, keep_ratio) where both decode caches are timed: 1k, 4k and 8k tokens (else the
    longest context) at keep_ratio 1.0 and 0.25 (else the smallest)."""
    lens = [n for n in (1024, 4096, 8192) if n in context_lens] or [max(context_lens)]
    ratios = sorted({r for r in (1.0, 0.25 if 0.25 in keep_ratios else min(keep_ratios)) if r in keep_ratios}, reverse=True)
    return [(n, r) for n in lens for r in ratios]


def decode_table(model: Any, prefills: dict[int, kl.Prefill], keep_ratios: Sequence[float], policies: Sequence[str],
                 skip_layers: Sequence[int], headline_len: int, n_tokens: int, device: str) -> tuple[Any, float]:
    """``timed_decode`` (two warm-up steps) under ``peak_memory`` on each prefill's cache compressed
    to every keep_ratio: knorm at every context, other policies at ``headline_len`` only and not at
    1.0 (the same cache as knorm's), all on the in-place decode cache; and knorm again on
    transformers' ``DynamicCache`` at the ``comparison_points``. One row per run with the cache
    kind, exact KV bytes (counted and expected), TPOT quantiles, throughput, peak memory and the
    tokens (a pandas DataFrame); and the seconds taken."""
    import pandas as pd

    rows = []
    compare = comparison_points(list(prefills), keep_ratios)
    t_start = time.perf_counter()
    for n, pre in prefills.items():
        first = pre.last_logits.argmax(-1)
        for policy in policies:
            if policy != "knorm" and n != headline_len:
                continue
            for r in keep_ratios:
                if policy != "knorm" and r == 1.0:
                    continue  # identical to knorm at 1.0: nothing is evicted
                cache = kl.compress_cache(pre.cache, r, policy, skip_layers)
                kinds = CACHE_KINDS if policy == "knorm" and (n, r) in compare else CACHE_KINDS[:1]
                for kind in kinds:
                    d, mem = peak_memory(functools.partial(timed_decode, model, cache, first, n_tokens, warmup=2,
                                                           cache_kind=kind), device=device)
                    rows.append({"context": n, "policy": policy, "keep_ratio": r, "cache": kind,
                                 "n_kept": kl.n_kept_for(n, r), "kv_bytes": cache.nbytes(),
                                 "kv_bytes_formula": kv_bytes_expected(model, n, r, skip_layers),
                                 "tpot_median_s": d["median_s"], "tpot_q25_s": d["q25_s"], "tpot_q75_s": d["q75_s"],
                                 "tpot_min_s": d["min_s"], "tpot_max_s": d["max_s"],
                                 "decode_tokens_per_s": 1 / d["median_s"],
                                 "decode_peak_increase_MB": mem["increase_bytes"] / 1e6,
                                 "decode_peak_MB": mem["peak_bytes"] / 1e6, "step_s": d["step_s"], "tokens": d["tokens"]})
                del cache
    return pd.DataFrame(rows), time.perf_counter() - t_start


def with_bandwidth_model(dec: Any, weight_bytes: int, bandwidth: float) -> Any:
    """``dec`` plus the pure bandwidth model: a step streams the weights and the kept KV once,
    ``predicted_tpot_s = (weights + KV bytes) / bandwidth``, and the measured TPOT over it."""
    out = dec.copy()
    out["predicted_tpot_s"] = (weight_bytes + out.kv_bytes) / bandwidth
    out["measured_over_model"] = out.tpot_median_s / out.predicted_tpot_s
    return out


def with_overhead_models(dec: Any, weight_bytes: int, bandwidth: float, step_overhead_s: float,
                         gemv_bytes_per_s: float) -> Any:
    """``dec`` plus the model's measured terms: a fixed per-step cost, and the kept KV moved
    ``KV_PASSES[cache]`` times (``predicted_with_overhead_s``: everything at ``bandwidth``); and
    the same with the weights streamed at the measured matrix-vector rate, as a decode step's
    matmuls do (``predicted_gemv_s``, the model the 1.3x bar is judged against)."""
    out = dec.copy()
    kv_moved = out.cache.map(KV_PASSES) * out.kv_bytes
    out["predicted_with_overhead_s"] = step_overhead_s + (weight_bytes + kv_moved) / bandwidth
    out["predicted_gemv_s"] = step_overhead_s + weight_bytes / gemv_bytes_per_s + kv_moved / bandwidth
    return out


def step_overhead(model: Any, device: str, n_steps: int = 32) -> float:
    """The fixed cost of a decode step (Python and operator dispatch): median step of a
    random-weight model with the same layers and heads but tiny widths, at a 16-token context."""
    cfg = model.config
    tiny = random_llama(seed=0, dtype=model.dtype, device=device, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                           head_dim=8, hidden_size=8 * cfg.num_attention_heads, intermediate_size=16, vocab_size=256)
    pre = kl.prefill(tiny, torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0)))
    return timed_decode(tiny, pre.cache, pre.last_logits.argmax(-1), n_steps, warmup=4)["median_s"]


@torch.inference_mode()
def attention_step_s(model: Any, buffers: Sequence[tuple[torch.Tensor, torch.Tensor]], lengths: Sequence[int],
                     repeats: int = 5) -> float:
    """One decode step's attention alone: the median time of the registered attention function, in
    the grouped form decoding uses, over every layer's first ``lengths[i]`` keys and values of
    ``buffers[i]`` (views, as in the decode cache), one layer after another as in a step, so the
    kept KV comes from memory, not from the CPU's caches."""
    from types import SimpleNamespace

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS[kl.ATTN_IMPLEMENTATION]
    k0 = buffers[0][0]
    query = torch.randn(1, model.config.num_attention_heads, 1, k0.shape[-1], device=k0.device).to(k0.dtype)
    layers = [(SimpleNamespace(layer_idx=i), k[:, :, :n], v[:, :, :n]) for i, ((k, v), n) in enumerate(zip(buffers, lengths))]

    def step() -> None:
        for module, keys, values in layers:
            attention(module, query, keys, values, None, dropout=0.0, scaling=k0.shape[-1] ** -0.5)

    with kl.grouped_decoding():
        return timed(step, repeats=repeats, warmup=1, device=k0.device)["median_s"]


def with_attention_model(dec: Any, model: Any, skip_layers: Sequence[int], weight_bytes: int, step_overhead_s: float,
                         gemv_bytes_per_s: float, room: int = 64) -> Any:
    """``dec`` plus, for every in-place row, its step's attention timed alone (``attention_step_s``
    at the row's kept lengths: random keys and values, since time does not depend on them) and the
    model that uses it in place of kept KV / bandwidth: fixed cost + weights at the matrix-vector
    rate + that attention time (``predicted_attention_s``). What this model leaves unexplained is
    neither the weights' matmuls, nor attention, nor dispatch."""
    n_kv_heads, head_dim = model.config.num_key_value_heads, kl._head_dim(model)
    out = dec.copy()
    out["attention_s"] = float("nan")
    skip = set(skip_layers)
    for n in sorted(set(out.context[out.cache == "in_place"])):
        gen = torch.Generator().manual_seed(0)
        buffers = [tuple(torch.randn(1, n_kv_heads, n + room, head_dim, generator=gen).to(model.device, model.dtype)
                         for _ in range(2)) for _ in range(kl._n_layers(model))]
        for i in out.index[(out.context == n) & (out.cache == "in_place")]:
            kept = kl.n_kept_for(n, out.at[i, "keep_ratio"])
            lengths = [n if layer in skip else kept for layer in range(len(buffers))]
            out.at[i, "attention_s"] = attention_step_s(model, buffers, lengths)
        del buffers
    out["attention_bytes_per_s"] = out.kv_bytes / out.attention_s
    out["predicted_attention_s"] = step_overhead_s + weight_bytes / gemv_bytes_per_s + out.attention_s
    return out


def tpot_fit(dec: Any, weight_bytes: int, bandwidth: float) -> dict[str, float]:
    """Measured TPOT = a + b * KV bytes over every in-place configuration: a is what a step costs
    whatever the cache (weights, dispatch), b * bandwidth how many bytes move per byte of kept KV
    (1 would be a single read)."""
    import numpy as np

    rows = dec[dec.cache == "in_place"]
    b, a = np.polyfit(rows.kv_bytes.astype(float), rows.tpot_median_s, 1)
    return {"intercept_s": float(a), "seconds_per_kv_byte": float(b), "kv_bytes_moved_per_kv_byte": float(b * bandwidth),
            "intercept_over_weight_time": float(a / (weight_bytes / bandwidth))}


def _long_lens(context_lens: Sequence[int]) -> list[int]:
    """The contexts the 1.3x bar is judged at: 4096 tokens and above, else the longest."""
    return [n for n in context_lens if n >= 4096] or [max(context_lens)]


def long_context_ratios(dec: Any, context_lens: Sequence[int]) -> dict[str, Any]:
    """At the long contexts (knorm on the in-place decode cache, by ``"<context>@<keep_ratio>"``):
    measured TPOT over the pure bandwidth model, over the model with the per-step overhead, and
    over the model with the measured terms (overhead, weights at the matrix-vector rate, KV at
    the bandwidth); whether that last one is within the 1.3x bar everywhere."""
    rows = dec[(dec.policy == "knorm") & (dec.cache == "in_place") & dec.context.isin(_long_lens(context_lens))]
    keyed = lambda values: {f"{int(n)}@{r}": float(v) for n, r, v in zip(rows.context, rows.keep_ratio, values)}
    return {"measured_over_model_long": keyed(rows.measured_over_model),
            "measured_over_overhead_model_long": keyed(rows.tpot_median_s / rows.predicted_with_overhead_s),
            "measured_over_gemv_model_long": keyed(rows.tpot_median_s / rows.predicted_gemv_s),
            **({"measured_over_attention_model_long": keyed(rows.tpot_median_s / rows.predicted_attention_s),
                "attention_bytes_per_s_long": keyed(rows.attention_bytes_per_s)} if "attention_s" in rows else {}),
            "meets_1p3_bar": bool((rows.tpot_median_s <= 1.3 * rows.predicted_gemv_s).all())}


def cache_comparison(dec: Any) -> list[dict[str, Any]]:
    """Where knorm was decoded on both caches: TPOT in place and on ``DynamicCache``, the
    speed-up, each over the pure and the measured-terms models, and whether the tokens agree."""
    rows = []
    for (n, r), sub in dec[dec.policy == "knorm"].groupby(["context", "keep_ratio"]):
        by = {row.cache: row for row in sub.itertuples()}
        if set(by) != set(CACHE_KINDS):
            continue
        new, old = by["in_place"], by["dynamic"]
        rows.append({"context": int(n), "keep_ratio": float(r), "tpot_in_place_s": new.tpot_median_s,
                     "tpot_dynamic_s": old.tpot_median_s, "speedup": old.tpot_median_s / new.tpot_median_s,
                     "in_place_over_model": new.measured_over_model, "dynamic_over_model": old.measured_over_model,
                     "in_place_over_gemv_model": new.tpot_median_s / new.predicted_gemv_s,
                     "dynamic_over_gemv_model": old.tpot_median_s / old.predicted_gemv_s,
                     "same_tokens": list(new.tokens) == list(old.tokens)})
    return rows


def _row(df: Any, n: int, r: float, policy: str = "knorm") -> Any:
    pick = (df.context == n) & (df.keep_ratio == r) & (df.policy == policy)
    if "cache" in df:
        pick &= df.cache == "in_place"
    return df[pick].iloc[0]


def headline_numbers(ttft: Any, dec: Any, headline_len: int, keep_ratios: Sequence[float]) -> dict[str, Any]:
    """TTFT, TPOT, KV bytes and the model's TPOT at the headline context, uncompressed and at
    keep_ratio 0.25 (or the smallest measured), knorm."""
    H, r_lo = headline_len, 0.25 if 0.25 in keep_ratios else min(keep_ratios)
    pick = lambda df, col, cast: {r: cast(_row(df, H, r)[col]) for r in (1.0, r_lo)}
    return {"context": H, "keep_ratio_low": r_lo, "ttft_s": pick(ttft, "ttft_median_s", float),
            "tpot_s": pick(dec, "tpot_median_s", float), "kv_bytes": pick(dec, "kv_bytes", int),
            "predicted_tpot_s": pick(dec, "predicted_tpot_s", float)}


def max_compress_share(ttft: Any, n: int) -> float:
    """The largest median compression share of TTFT at context ``n`` over the compressed configurations."""
    return float(ttft[(ttft.context == n) & (ttft.keep_ratio < 1)].compress_share_of_ttft.max())


def cold_runs(all_ids: torch.Tensor, cold_lens: Sequence[int], n_processes: int, **kwargs: Any) -> tuple[Any, float]:
    """``cold_warm_ttft`` (baseline first, then keep_ratio 0.25, 3 rounds) in ``n_processes`` fresh
    processes per context of ``cold_lens``; ``kwargs`` go to it. One row per timed call with the
    process's import and load times (a pandas DataFrame), and the seconds taken."""
    import pandas as pd

    rows = []
    t_start = time.perf_counter()
    for n in cold_lens:
        for proc in range(n_processes):
            out = cold_warm_ttft(all_ids[:, :n], keep_ratios=(1.0, 0.25), rounds=3, **kwargs)
            for row in out["rows"]:
                rows.append({"context": n, "process": proc, **row, "import_s": out["import_s"], "load_s": out["load_s"]})
    return pd.DataFrame(rows), time.perf_counter() - t_start


def trap_table(cold: Any) -> Any:
    """Per (context, process): the cold baseline (the process's first call) and the compressed run
    right after it, against the warm medians of later rounds; the fake change that comparison
    shows, the warm change, and the fake change with the model load inside the baseline's clock."""
    import pandas as pd

    rows = []
    for (n, proc), sub in cold.groupby(["context", "process"]):
        get = lambda rnd, r: float(sub[(sub["round"] == rnd) & (sub.keep_ratio == r)].ttft_s.iloc[0])
        warm_base = statistics.median(sub[(sub["round"] > 0) & (sub.keep_ratio == 1.0)].ttft_s)
        warm_comp = statistics.median(sub[(sub["round"] > 0) & (sub.keep_ratio == 0.25)].ttft_s)
        load = float(sub.load_s.iloc[0])
        rows.append({"context": n, "process": proc, "cold_baseline_s": get(0, 1.0), "compressed_after_cold_s": get(0, 0.25),
                     "warm_baseline_s": warm_base, "warm_compressed_s": warm_comp,
                     "fake_change": get(0, 0.25) / get(0, 1.0) - 1, "warm_change": warm_comp / warm_base - 1,
                     "cold_over_warm": get(0, 1.0) / warm_base, "baseline_with_load_s": load + get(0, 1.0),
                     "fake_change_with_load": get(0, 0.25) / (load + get(0, 1.0)) - 1})
    return pd.DataFrame(rows)


def trap_medians(trap: Any) -> dict[str, float]:
    """The trap's medians over contexts and processes."""
    tr = trap.median(numeric_only=True)
    return {"trap_fake_change_median": float(tr.fake_change), "trap_warm_change_median": float(tr.warm_change),
            "trap_cold_over_warm_median": float(tr.cold_over_warm),
            "trap_fake_change_with_load_median": float(tr.fake_change_with_load)}


def findings(record: dict[str, Any]) -> str:
    """What the numbers say (Markdown), from a recorded result of 06_speed_tradeoffs (the whole
    JSON record: parameters and results): TTFT against compression, what compression buys (decode
    time, KV bytes, memory), the bandwidth model and what it leaves out, the TTFT trap. The
    notebook's final cell and REPORT.md's section both show this text."""
    p, r = record["parameters"], record["results"]
    s, sizes = r["summary"], p["sizes"]
    h, H = s["headline"], sizes["headline_len"]
    lo = h["keep_ratio_low"]
    g = lambda key, kr: h[key][str(kr)] if str(kr) in h[key] else h[key][kr]
    find = lambda rows, n, kr: next(x for x in rows if x["context"] == n and x["keep_ratio"] == kr and x["policy"] == "knorm"
                                    and x.get("cache", "in_place") == "in_place")
    prefill_H = next(x for x in r["prefill"] if x["context"] == H)
    r_first = min(kr for kr in p["keep_ratios"] if kr < 1)
    tpot_1, tpot_lo = g("tpot_s", 1.0), g("tpot_s", lo)
    fit, probes = s["tpot_fit"], s["bandwidth_probes"]
    ratios = lambda d: ", ".join(f"{k} {v:.2f}×" for k, v in d.items())
    top_ops = lambda ops: ", ".join(f"{o['op']} {o['share_of_wall']:.0%}" for o in ops[:4])
    cat_share = lambda ops: next((o["share_of_wall"] for o in ops if o["op"] == "aten::cat"), None)
    cat_in_place, cat_dynamic = cat_share(s["profile_ops"]), cat_share(s["profile_ops_dynamic"])
    cmp = s["cache_comparison"]
    cmp_text = "; ".join(f"{c['context']} tokens at keep_ratio {c['keep_ratio']}: {c['tpot_dynamic_s'] * 1e3:.1f} → "
                         f"{c['tpot_in_place_s'] * 1e3:.1f} ms ({c['speedup']:.2f}×)" for c in cmp)
    n_same = sum(c["same_tokens"] for c in cmp)
    share_text = lambda x: "is not among the top operators" if x is None else f"takes {x:.0%} of the wall time"
    attention_text = ""
    if "measured_over_attention_model_long" in s:
        over = {k: v for k, v in s["measured_over_attention_model_long"].items() if v > 1.3}
        attention_text = (
            "\nTimed alone at each configuration's kept lengths, attention reads the kept KV at "
            + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in s["attention_bytes_per_s_long"].items())
            + f" GB/s (the read probe: {probes['read_bytes_per_s'] / 1e9:.1f} GB/s). With that time in place of kept KV / bandwidth "
            f"the model gives {ratios(s['measured_over_attention_model_long'])}: "
            + ("every long-context step is within 1.3× of its parts measured alone (fixed cost, weight matmuls, attention)."
               if not over else "a step still costs more than 1.3× its parts measured alone at " + ", ".join(over) + "."))
    ttft_change = g("ttft_s", lo) / g("ttft_s", 1.0) - 1
    ttft_head = ("TTFT does not move with compression." if abs(ttft_change) <= 0.05 else
                 f"TTFT changes by {ttft_change:+.1%} at keep_ratio {lo}, more than 5 %: compare it with the repeats' spread.")
    decode_head = ("What compression buys is decode time and memory." if tpot_lo < tpot_1 else
                   "Compression did not shorten decoding here; what it buys is memory.")
    return f"""**{ttft_head}** At {H} tokens, TTFT is {g('ttft_s', 1.0):.3f} s uncompressed and
{g('ttft_s', lo):.3f} s at keep_ratio {lo} (medians of {int(find(r['ttft'], H, 1.0)['repeats'])} repeats): compression runs after the
prefill and adds {find(r['ttft'], H, r_first)['compress_share_of_ttft']:.2%} of TTFT at keep_ratio {r_first} (at most
{s['compress_share_of_ttft_at_headline_max']:.2%} over the keep_ratios and policies; foundation bar ≤ 2 %). The prefill itself runs at
{prefill_H['measured_over_predicted']:.2f}× the compute-bound estimate from the measured matmul rate.

**{decode_head}** At {H} tokens the KV cache shrinks from
{g('kv_bytes', 1.0) / 1e6:.1f} MB to {g('kv_bytes', lo) / 1e6:.1f} MB at keep_ratio {lo} (layers {tuple(p['skip_layers'])} kept whole), and TPOT
goes from {tpot_1 * 1e3:.1f} ms to {tpot_lo * 1e3:.1f} ms ({tpot_lo / tpot_1 - 1:+.1%}); the weights ({s['weight_bytes'] / 1e6:.0f} MB) are read
every step whatever the keep_ratio, so the gain is bounded by the KV share of the bytes moved. Decoding from the cache needs
+{find(r['decode'], H, 1.0)['decode_peak_increase_MB']:.0f} MB uncompressed and +{find(r['decode'], H, lo)['decode_peak_increase_MB']:.0f} MB at keep_ratio {lo};
the prefill's own peak (+{prefill_H['prefill_peak_increase_MB']:.0f} MB at {H} tokens, activations and the full cache)
comes before any compression and is the same for every keep_ratio.

**The decode cache.** Every decode here appends each new token in place into a cache preallocated for the
tokens to come, and attention reads each kept key once per KV head. On transformers' `DynamicCache` (a `torch.cat` copy of every
layer per token, attention reading the cache once per query head) TPOT was: {cmp_text}. The generated tokens are
{"identical" if n_same == len(cmp) else f"identical in only {n_same} of {len(cmp)} comparisons"}. In the operator profile at {s['profile_context']} tokens,
uncompressed, `aten::cat` {share_text(cat_dynamic)} on `DynamicCache` and {share_text(cat_in_place)} in place; in place the top
operators are {top_ops(s['profile_ops'])} of the wall time.

**Bandwidth model.** With {s['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, (weights + kept KV) / bandwidth predicts
{g('predicted_tpot_s', 1.0) * 1e3:.1f} ms at {H} tokens, keep 1.0; measured/model at {", ".join(str(n) for n in _long_lens(sizes['context_lens']))} tokens:
{ratios(s['measured_over_model_long'])}. Adding the measured fixed cost of a step, {s['step_overhead_s'] * 1e3:.1f} ms (same layers and
heads, tiny widths: Python and operator dispatch), gives {ratios(s['measured_over_overhead_model_long'])}. Streaming the weights at the
measured matrix-vector rate ({probes['gemv_bytes_per_s'] / 1e9:.1f} GB/s, what a decode step's matmuls reach from memory) with the kept KV
read once and the fixed cost gives {ratios(s['measured_over_gemv_model_long'])}: the 1.3× bar is {"met" if s['meets_1p3_bar'] else "**not met**"}.{attention_text}
A straight line through the in-place configurations, TPOT = {fit['intercept_s'] * 1e3:.1f} ms + KV bytes × {fit['seconds_per_kv_byte'] * 1e9:.3f} ns/byte,
says a step costs {fit['intercept_over_weight_time']:.2f}× the time to stream the weights once whatever the cache, and each kept KV byte
costs the time of {fit['kv_bytes_moved_per_kv_byte']:.1f} bytes streamed (a single read would be 1).

**The TTFT trap.** Timing the baseline cold (first call in a fresh process) and the compressed configuration right after
it shows a median TTFT change of {s['trap_fake_change_median']:+.1%} (contexts {sizes['cold_lens']}, {sizes['n_cold_processes']} process(es) each);
warm against warm the change is {s['trap_warm_change_median']:+.1%}. The first call costs {s['trap_cold_over_warm_median']:.2f}× a warm one. With the model
load inside the baseline's clock (a script timed from its start) the fake change becomes {s['trap_fake_change_with_load_median']:+.1%}.
"""


def style_axis(ax: Any, ylabel: str, title: str) -> None:
    """The speed figures' shared axis: context length on a log2 axis, a grid and a small legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
