"""knorm_study.speed: the speed study's probes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import knorm_lib as kl
from helpers import CONTEXT, N_LAYERS
from knorm_study import decode, speed


def test_weight_bytes_counts_tied_weights_once():
    """Decode streams every weight once per step: a tied embedding / lm_head is one tensor."""
    tied = speed.random_llama(seed=0, tie_word_embeddings=True)
    untied = speed.random_llama(seed=0, tie_word_embeddings=False)
    assert speed.weight_bytes(untied) == sum(p.numel() * 4 for p in untied.parameters())
    embed = tied.config.vocab_size * tied.config.hidden_size * 4
    assert speed.weight_bytes(tied) == speed.weight_bytes(untied) - embed
    assert speed.weight_bytes(speed.random_llama(seed=0, dtype=torch.bfloat16)) * 2 == speed.weight_bytes(untied)


def test_peak_memory_sees_an_allocation():
    """A 64 MB tensor created (and kept) inside ``fn`` raises the peak by at least that much."""
    assert speed.rss_bytes() > 0
    out, mem = speed.peak_memory(lambda: torch.ones(16 * 2**20))
    assert out.numel() == 16 * 2**20 and mem["kind"] == "rss"
    assert mem["increase_bytes"] >= 0.9 * 64 * 2**20
    assert mem["peak_bytes"] == mem["baseline_bytes"] + mem["increase_bytes"]
    with pytest.raises(ValueError, match="interval_s"):
        speed.peak_memory(lambda: None, interval_s=0)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_timed_decode_equals_generate_greedy(keep_ratio, tiny32, ids):
    """The timed decode loop generates exactly what generate_greedy does (true positions for new
    tokens on the compressed cache), leaves the cache untouched, and reports one time per step."""
    pre = kl.prefill(tiny32, ids[:, :CONTEXT])
    cache = kl.compress_cache(pre.cache, keep_ratio)
    lengths = cache.lengths()
    out = speed.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 6, warmup=2)
    ref = decode.generate_greedy(tiny32, ids[:, :CONTEXT], 9, keep_ratio=keep_ratio, pre=pre)
    assert out["tokens"] == ref[1:].tolist()
    assert cache.lengths() == lengths
    assert len(out["step_s"]) == 6 and len(out["warmup_step_s"]) == 2 and all(t > 0 for t in out["step_s"])
    assert out["min_s"] <= out["q25_s"] <= out["median_s"] <= out["q75_s"] <= out["max_s"]
    old = speed.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 6, warmup=2, cache_kind="dynamic")
    assert old["tokens"] == out["tokens"]  # transformers' own cache, the same tokens
    wrong = speed.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 6, warmup=2, position_mode="cache_relative")
    if keep_ratio < 1:  # numbering from the compressed length is the bug: different tokens
        assert wrong["tokens"] != out["tokens"]
    with pytest.raises(ValueError, match="n_tokens"):
        speed.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 0)
    with pytest.raises(ValueError, match="warmup"):
        speed.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 2, warmup=-1)
    with pytest.raises(ValueError, match="cache_kind"):
        speed.timed_decode(tiny32, cache, pre.last_logits.argmax(-1), 2, cache_kind="static")


def test_time_ttft_pieces_add_up(tiny32, ids):
    """TTFT of a configuration = its repeat's prefill + that cache's compression; keep 1.0 is no
    compression; the returned prefill is the uncompressed cache."""
    t, pre = speed.time_ttft(tiny32, ids[:, :CONTEXT], [1.0, 0.5], ["knorm", "streaming"], repeats=3, warmup=1)
    assert t["n_tokens"] == CONTEXT and len(t["prefill_s"]) == 3
    assert set(t["ttft_s"]) == {"knorm@1.0", "knorm@0.5", "streaming@1.0", "streaming@0.5"}
    assert t["compress_s"]["knorm@1.0"] == [0.0] * 3
    for key, times in t["ttft_s"].items():
        assert times == [p + c for p, c in zip(t["prefill_s"], t["compress_s"][key])]
    assert all(c > 0 for c in t["compress_s"]["knorm@0.5"])
    assert t["prefill_peak_memory"]["increase_bytes"] >= 0
    assert pre.cache.lengths() == [CONTEXT] * N_LAYERS
    with pytest.raises(ValueError, match="repeats"):
        speed.time_ttft(tiny32, ids, [1.0], repeats=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        speed.time_ttft(tiny32, ids, [1.5])
    with pytest.raises(ValueError, match="policies='nope'"):
        speed.time_ttft(tiny32, ids, [0.5], ["nope"])
    with pytest.raises(ValueError, match="policies='snapkv'.*hidden states"):
        speed.time_ttft(tiny32, ids, [0.5], ["snapkv"])


def test_check_sizes_names_the_parameter():
    """06's checks, before the model loads: the headline among the contexts, the baseline among the
    keep_ratios, and only policies the speed study can time (no kvpress press, no dynamic policy)."""
    good = {"headline_len": 512, "context_lens": [256, 512]}
    speed.check_sizes(good, [1.0, 0.5], ["knorm", "streaming"])
    for sizes, ratios, policies, name in [({**good, "headline_len": 300}, [1.0], ["knorm"], "headline_len"),
                                          (good, [0.5], ["knorm"], "keep_ratios"),
                                          (good, [1.0], ["tova"], "policies='tova'"),
                                          (good, [1.0], ["h2o"], "policies='h2o'")]:
        with pytest.raises(ValueError, match=name):
            speed.check_sizes(sizes, ratios, policies)


def test_machine_rates_and_profile(tiny32, ids):
    """Bandwidth and matmul probes return positive rates over the bytes/FLOPs they moved; the
    operator profile of a decode names the matrix products."""
    bw = speed.memory_bandwidth(8 * 2**20, repeats=2)
    assert bw["n_bytes"] == 8 * 2**20
    assert all(bw[f"{k}_bytes_per_s"] > 0 and len(bw[f"{k}_s"]) == 2 for k in ("read", "copy", "gemv"))
    mm = speed.matmul_rate(64, repeats=2)
    assert mm["flop_per_s"] > 0 and len(mm["times_s"]) == 2
    for fn, arg in [(speed.memory_bandwidth, "n_bytes"), (speed.matmul_rate, "n")]:
        with pytest.raises(ValueError, match=arg):
            fn(0)
    pre = kl.prefill(tiny32, ids[:, :CONTEXT])
    ops = speed.op_profile(lambda: speed.timed_decode(tiny32, pre.cache, pre.last_logits.argmax(-1), 2, warmup=0), top=25)
    assert 0 < len(ops) <= 25 and any(o["op"] in ("aten::mm", "aten::addmm", "aten::linear") for o in ops)
    assert all(o["calls"] >= 1 and o["self_cpu_s"] >= 0 for o in ops)
    cats = {kind: next((o["calls"] for o in speed.decode_profile(tiny32, pre.cache, pre.last_logits.argmax(-1), n_steps=2,
                                                                 top=100, cache_kind=kind) if o["op"] == "aten::cat"), 0)
            for kind in speed.CACHE_KINDS}
    # two steps: on DynamicCache each layer concatenates one key and one value per step (the cache
    # copy itself is outside the profile); in place nothing is concatenated for the cache
    assert cats["dynamic"] - cats["in_place"] == 2 * 2 * N_LAYERS
    assert pre.cache.lengths() == [CONTEXT] * N_LAYERS
    with pytest.raises(ValueError, match="n_steps"):
        speed.decode_profile(tiny32, pre.cache, pre.last_logits.argmax(-1), n_steps=0)


def test_cold_warm_ttft_runs_in_a_fresh_process(ids):
    """The child process times the configurations in the given order (baseline first), every round."""
    out = speed.cold_warm_ttft(ids[:, :16], keep_ratios=(1.0, 0.5), rounds=2, model_config={"num_hidden_layers": 2},
                            skip_layers=(0,))
    assert [(r["round"], r["keep_ratio"]) for r in out["rows"]] == [(0, 1.0), (0, 0.5), (1, 1.0), (1, 0.5)]
    assert all(r["ttft_s"] > 0 for r in out["rows"]) and out["import_s"] > 0 and out["load_s"] > 0
    with pytest.raises(ValueError, match="model_config"):
        speed.cold_warm_ttft(ids, model_config=[("hidden_size", 8)])
    with pytest.raises(ValueError, match="rounds"):
        speed.cold_warm_ttft(ids, rounds=0)


def test_kv_bytes_bookkeeping_matches_the_tensors():
    """kv_bytes_per_token (one layer) and kv_bytes_expected agree with the compressed cache's bytes."""
    model = speed.random_llama(seed=0)
    cfg = model.config
    assert speed.kv_bytes_per_token(model) == 2 * cfg.num_key_value_heads * kl._head_dim(model) * 4
    shape = speed.model_shape(model)
    assert shape["n_params"] == sum(p.numel() for p in model.parameters())
    assert shape["kv_bytes_per_token_per_layer"] == speed.kv_bytes_per_token(model)
    pre = kl.prefill(model, torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0)))
    for r in (1.0, 0.5, 0.1):
        assert kl.compress_cache(pre.cache, r, "knorm", (0,)).nbytes() == speed.kv_bytes_expected(model, 40, r, (0,))
    assert speed.prefill_flops(model, 2) > 2 * speed.prefill_flops(model, 1) - 2 * cfg.vocab_size * cfg.hidden_size


def test_trap_table_and_medians():
    cold = pd.DataFrame([{"context": 16, "process": 0, "round": rnd, "keep_ratio": r, "ttft_s": t,
                          "import_s": 1.0, "load_s": 2.0}
                         for rnd, r, t in [(0, 1.0, 0.4), (0, 0.25, 0.2), (1, 1.0, 0.2), (1, 0.25, 0.2),
                                           (2, 1.0, 0.2), (2, 0.25, 0.2)]])
    trap = speed.trap_table(cold)
    t = trap.iloc[0]
    assert t.fake_change == pytest.approx(-0.5) and t.warm_change == pytest.approx(0.0)
    assert t.cold_over_warm == pytest.approx(2.0) and t.baseline_with_load_s == pytest.approx(2.4)
    assert speed.trap_medians(trap)["trap_fake_change_median"] == pytest.approx(-0.5)



def test_attention_timed_alone_at_the_kept_lengths(tiny32):
    """Every in-place row gains its step's attention time (positive; skip layers at full length) and
    the model that adds it to the fixed cost and the weights' matmuls; DynamicCache rows get none.
    kvpress, once imported, wraps every registered attention function: the probe must call it as
    transformers does."""
    import kvpress  # noqa: F401
    kv_per_token = speed.kv_bytes_per_token(tiny32)
    rows = [{"context": 40, "keep_ratio": r, "cache": kind, "tpot_median_s": 0.01,
             "kv_bytes": kv_per_token * (40 + (N_LAYERS - 1) * kl.n_kept_for(40, r))}
            for r, kind in ((1.0, "in_place"), (0.5, "in_place"), (0.5, "dynamic"))]
    out = speed.with_attention_model(pd.DataFrame(rows), tiny32, (0,), weight_bytes=1000, step_overhead_s=0.002,
                                     gemv_bytes_per_s=1e6)
    in_place = out[out.cache == "in_place"]
    assert (in_place.attention_s > 0).all() and out[out.cache == "dynamic"].attention_s.isna().all()
    pd.testing.assert_series_equal(in_place.predicted_attention_s, 0.002 + 1000 / 1e6 + in_place.attention_s,
                                   check_names=False)
    pd.testing.assert_series_equal(in_place.attention_bytes_per_s, in_place.kv_bytes / in_place.attention_s,
                                   check_names=False)
    ratios = speed.long_context_ratios(out.assign(policy="knorm", measured_over_model=1.0, predicted_with_overhead_s=0.01,
                                                  predicted_gemv_s=0.01), [40])
    assert set(ratios["measured_over_attention_model_long"]) == {"40@1.0", "40@0.5"}
