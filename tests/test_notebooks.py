"""Every study notebook: committed clean, parameterized, validated, and executed headless in the
quick profile; the numbers each one records are asserted here (types, ranges, invariants)."""
from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import notebook_runner as runner  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KERNEL = runner.KERNEL
# the tests' own results directory: the committed data/results/ stay untouched
RESULTS = Path(tempfile.mkdtemp(prefix="knorm-test-results-"))


def _execute(notebook: Path, out_dir: Path, **parameters) -> None:
    runner.execute(notebook, out_dir / notebook.name, parameters, results_dir=RESULTS)


def _kept_fraction(row: dict) -> float:
    """The mean kept fraction a streaming row's schedule implies (tokens held / tokens seen)."""
    import torch

    import knorm_lib as kl

    n = row["n_tokens"]
    prune_after = int(row["prune_after"]) if row["prune_after"] else None   # JSON: 16.0, or null
    budget = kl.budget_schedule(n, row["keep_ratio"], prune_after=prune_after)
    return (budget.double() / torch.arange(1, n + 1)).mean().item()


def _results(name: str) -> dict:
    return json.loads((RESULTS / name / "quick.json").read_text())


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run every notebook once in the quick profile (module-scoped: shared by the asserts)."""
    out = tmp_path_factory.mktemp("executed")
    for nb in NOTEBOOKS:
        _execute(nb, out, profile="quick")
    return out


def test_there_are_notebooks():
    assert {nb.stem for nb in NOTEBOOKS} >= {"01_norm_distributions", "02_attention_correlation",
                                             "03_position_order_ppl"}


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_parameterized(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert 'profile = "full"' in tagged[0].source and "model_name = None" in tagged[0].source
    assert nb.metadata["kernelspec"]["name"] == KERNEL


def test_unknown_parameter_is_an_error(tmp_path):
    """papermill only warns on unknown names; the notebook itself must stop, naming the parameter,
    also for a name the notebook imports (papermill's injected cell would silently rebind it)."""
    with pytest.raises(runner.NotebookFailed, match="keep_ratioz"):
        _execute(ROOT / "notebooks" / "03_position_order_ppl.ipynb", tmp_path, profile="quick", keep_ratioz=[0.5])
    with pytest.raises(runner.NotebookFailed, match="stats"):
        _execute(ROOT / "notebooks" / "04_quality_tradeoffs.ipynb", tmp_path, profile="quick", stats=5)


def test_bad_parameter_value_is_an_error(tmp_path):
    with pytest.raises(runner.NotebookFailed, match="profile"):
        _execute(ROOT / "notebooks" / "01_norm_distributions.ipynb", tmp_path, profile="medium")
    with pytest.raises(runner.NotebookFailed, match="keep_ratio"):
        _execute(ROOT / "notebooks" / "02_attention_correlation.ipynb", tmp_path, profile="quick", keep_ratios=[1.5])
    with pytest.raises(runner.NotebookFailed, match="streaming_policies"):
        _execute(ROOT / "notebooks" / "04_quality_tradeoffs.ipynb", tmp_path, profile="quick",
                 streaming_policies=["snapkv"])
    with pytest.raises(runner.NotebookFailed, match="policies.*h2o"):
        _execute(ROOT / "notebooks" / "02_attention_correlation.ipynb", tmp_path, profile="quick", policies=["h2o"])
    with pytest.raises(runner.NotebookFailed, match="keep_ratio"):
        _execute(ROOT / "notebooks" / "00_explore.ipynb", tmp_path, profile="quick", keep_ratio=0.01)


def test_recorded_parameters_are_the_parameters_only(executed):
    """No IPython plumbing (``_i2``, the parameters cell's source) or ``_before`` in the results."""
    for nb in NOTEBOOKS:
        params = _results(nb.stem)["parameters"]
        assert not [k for k in params if k.startswith("_")], nb.stem
        assert params["profile"] == "quick"


def test_explorer_uses_no_output_widgets():
    """The cause of the headless hang (nbclient #312): Output widgets and clear_output in the
    explorer (the notebook and ``explore.controls``, which builds its widgets). Its displays are
    HTML widgets whose value is replaced."""
    sources = [c.source for c in nbformat.read(ROOT / "notebooks" / "00_explore.ipynb", as_version=4).cells
               if c.cell_type == "code"] + [(ROOT / "knorm_study" / "explore.py").read_text()]
    code = "\n".join(line.split("#")[0] for source in sources for line in source.splitlines())
    assert "widgets.Output(" not in code and "clear_output" not in code
    assert "widgets.HTML(" in code and "explore.controls(" in code


def test_explorer_runs_headless_repeatedly(tmp_path):
    """Three more headless runs of the explorer (one more in `executed`), each under a short
    per-cell timeout without retry: a run blocked in the widget cell fails here, naming the cell.
    The 30-run count lives in benchmarks/bench_headless_explore.py."""
    for i in range(3):
        runner.execute(ROOT / "notebooks" / "00_explore.ipynb", tmp_path / f"run{i}" / "00.ipynb",
                       {"profile": "quick"}, cell_timeout_s=120, retries=0, results_dir=tmp_path / "results")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_00_records_a_read_from_the_grid_and_a_full_recompute(executed):
    """The explorer's headless run waits for the default policy's grid, then records each read's
    latency apart from the full recompute's; a read does no model work, so it is the faster."""
    r = _results("00_explore")["results"]
    assert len(r["read_seconds"]) >= 10 and len(r["update_seconds"]) == 3
    assert max(r["read_seconds"]) < min(r["update_seconds"])
    assert "knorm" in r["grid_seconds_by_policy"] and r["grid_seconds_by_policy"]["knorm"] > 0
    assert r["summary"]["n_kept"] == r["kept_in_view"]


def test_01_recorded_numbers(executed):
    res = _results("01_norm_distributions")
    s = res["results"]["summary"]
    assert res["profile"] == "quick" and s["n_documents"] == 2
    assert _finite(s["sink_ratio_median_all"]) and s["sink_ratio_median_all"] > 0
    assert 0 <= s["fraction_heads_sink_below_median"] <= 1
    assert -1 <= s["key_value_norm_spearman"] <= 1
    assert set(s["median_norm_by_kind_relative"]) <= {"first", "newline", "punctuation", "stop_word", "other"}
    assert len(s["key_norm_by_layer"]) == 30 and all(v > 0 for v in s["key_norm_by_layer"].values())
    assert (ROOT / "build" / "figures" / "quick" / "01_norm_distributions" / "key_norm_violins.png").exists()


def test_02_recorded_numbers(executed):
    res = _results("02_attention_correlation")
    s = res["results"]["summary"]
    assert all(-1 <= v <= 1 for v in s["spearman_mean_by_layer"].values())
    assert len(s["spearman_mean_by_layer"]) == 30
    lost = s["fraction_lost"]
    ratios = res["parameters"]["keep_ratios"]
    for r in ratios:
        assert lost[f"oracle@{r}"] <= min(lost[f"{p}@{r}"] for p in ("knorm", "random", "high_norm")) + 1e-9
    assert all(abs(lost[f"{p}@1.0"]) < 1e-9 for p in ("knorm", "random", "high_norm", "oracle"))
    assert lost["knorm@0.1"] > lost["knorm@0.9"]  # evicting more loses more


def test_03_recorded_numbers(executed):
    """The position/order invariants the study rests on, as recorded by the notebook."""
    res = _results("03_position_order_ppl")
    inv = res["results"]["invariants"]
    assert inv["order_max_rel_diff_absolute"] <= 1e-4
    assert inv["cache_relative_min_inflation_when_evicting"] > 1.0
    assert inv["cache_relative_equals_absolute_at_keep_1"] <= 1e-6
    assert inv["order_max_rel_diff_rerotated"] > 1e-3
    assert inv["plan_b_constant_across_keep_ratios"] is True
    rows = res["results"]["rows"]
    assert {r["position_mode"] for r in rows} == {"absolute", "cache_relative", "rerotated"}
    assert all(_finite(r["ppl"]) and r["ppl"] > 1 and 0 <= r["next_token_acc"] <= 1 and r["kl"] >= 0 for r in rows)
    assert all(r["kl"] == 0 for r in rows if r["keep_ratio"] == 1.0 and r["position_mode"] == "absolute"
               and r["order"] == "original")
    assert all(_finite(x["ppl"]) for x in res["results"]["reference_full_model_ppl"])
    stream = res["results"]["invariants_streaming"]
    assert stream["order_max_rel_diff_absolute"] <= 1e-4
    by_ratio = {float(k): v for k, v in stream["cache_relative_inflation_by_keep_ratio"].items()}
    assert by_ratio[1.0] == pytest.approx(1.0, abs=1e-6)
    # the position drift is the number of evictions so far: clear harm once a third or more is evicted
    assert all(v > 1.0 for k, v in by_ratio.items() if k <= 0.7)
    assert stream["order_max_rel_diff_rerotated"] > 1e-3
    engines = {(r["position_mode"], r["engine"]) for r in res["results"]["streaming_rows"]}
    assert ("absolute", "one_pass") in engines and ("rerotated", "sequential") in engines


def test_04_recorded_numbers(executed):
    """Quality sweep: every configuration present in both protocols, the full cache exact, the sweep
    identical to re-prefilling, thresholds drawn from the measured keep_ratios."""
    res = _results("04_quality_tradeoffs")
    r, p = res["results"], res["parameters"]
    ratios = p["keep_ratios"]
    rows = r["rows"]
    assert res["profile"] == "quick" and len(r["prefill_documents"]) == 2 and len(r["stream_documents"]) == 2
    prefill_variants = {label for label, _, _ in r["variants"]["prefill"]}
    stream_variants = {label for label, _, _ in r["variants"]["streaming"]}
    # SmolLM2 has no QK-norm (knorm_prenorm would rank as knorm) and no windows (one layer choice)
    assert prefill_variants == {"knorm (all layers)", *p["policies"]} - {"knorm_prenorm"}
    assert stream_variants == {"knorm (all layers)", *p["streaming_policies"]} - {"knorm_prenorm"}
    for proto, variants, docs in (("prefill", prefill_variants, r["prefill_documents"]),
                                  ("streaming", stream_variants, r["stream_documents"])):
        sub = [x for x in rows if x["protocol"] == proto]
        assert len(sub) == len(docs) * (1 + len(variants) * (len(ratios) - 1))
        assert {x["variant"] for x in sub} == variants | {"full cache"}
        assert all(_finite(x["ppl"]) and x["ppl"] > 1 and x["kl"] >= 0 and 0 <= x["top1_agree"] <= 1 for x in sub)
        full = [x for x in sub if x["variant"] == "full cache"]
        assert all(x["kl"] == 0 and x["top1_agree"] == 1 for x in full)
        for doc in docs:  # knorm beats the high-norm ablation by a wide margin at half the cache and below
            for keep in (0.5, 0.25):
                ppl = {x["variant"]: x["ppl"] for x in sub if x["document"] == doc["title"] and x["keep_ratio"] == keep}
                assert ppl["knorm"] < ppl["high_norm"]
    assert {x["engine"] for x in rows if x["protocol"] == "streaming" and x["variant"] == "h2o"} == {"one_pass"}
    speed = r["sweep_speed"]
    assert speed["max_abs_nll_diff"] <= 1e-6 and speed["max_abs_kl_diff"] <= 1e-6
    assert speed["sweep_s"] > 0 and speed["reprefill_s"] > 0 and speed["speedup"] > 0
    n, c, t = speed["n_configs"], p["sizes"]["context_len"], p["sizes"]["continuation_len"]
    assert speed["token_ceiling"] == pytest.approx((n + 1) * (c + t) / (c + (n + 1) * t))
    th = r["thresholds"]
    assert {(x["protocol"], x["variant"]) for x in th} == \
        {("prefill", v) for v in prefill_variants} | {("streaming", v) for v in stream_variants}
    for x in th:
        for key in ("within_0.01", "within_0.05"):
            assert x[key] is None or x[key] in ratios and x[key] < 1.0
        assert x["within_0.01"] is None or (x["within_0.05"] is not None and x["within_0.05"] <= x["within_0.01"])
    sched = r["schedule_rows"]   # bursts per prune_after and the recent window, at every schedule keep_ratio
    n_sched = len(p["schedule_keep_ratios"]) * (len(p["sizes"]["prune_afters"]) + 1)
    assert len(sched) == len(r["stream_documents"]) * n_sched
    for x in sched:
        assert 0 < x["mean_kept_fraction"] < 1 and x["ppl"] > 1
        assert x["mean_kept_fraction"] == pytest.approx(_kept_fraction(x))
    fractions = p["sizes"]["matched_fractions"]
    mm = r["matched_memory"]
    assert len(mm) == len(fractions) * (3 + len(p["sizes"]["prune_afters"]) + 1)
    assert all(x["n"] == 0 or (x["n"] == 2 and x["ppl_ratio"] > 0) for x in mm)
    assert all(x["n"] == 2 for x in mm if x["variant"] == "knorm")
    for fig in ("ppl_vs_keep_ratio", "kl_heatstrip", "accuracy_agreement", "schedules_matched_memory"):
        assert (ROOT / "build" / "figures" / "quick" / "04_quality_tradeoffs" / f"{fig}.png").exists()


def test_06_recorded_numbers(executed):
    """Speed study: exact KV bytes that shrink with keep_ratio, TTFT built from its timed pieces,
    true decode timings, the bandwidth model's inputs, and the cold/warm runs in baseline-first order.
    Nothing here asserts a speed (the machine is shared); only invariants and structure."""
    res = _results("06_speed_tradeoffs")
    r, sizes, p = res["results"], res["parameters"]["sizes"], res["parameters"]
    s = r["summary"]
    assert res["profile"] == "quick" and sizes["context_lens"] == [256, 512] and sizes["headline_len"] == 512
    ratios = sorted(p["keep_ratios"])
    assert s["weight_bytes"] == 4 * s["n_params"] and s["kv_bytes_per_token_per_layer"] == 2 * 3 * 64 * 4
    assert s["bandwidth_bytes_per_s"] > 0 and s["matmul_flop_per_s"] > 0 and s["step_overhead_s"] > 0
    assert set(s["measured_over_gemv_model_long"]) == set(s["measured_over_overhead_model_long"]) != set()
    assert set(s["measured_over_attention_model_long"]) == set(s["attention_bytes_per_s_long"]) == set(s["measured_over_gemv_model_long"])
    # the matrix-vector rate is at most the best streaming rate, so that model predicts longer steps
    assert all(s["measured_over_gemv_model_long"][k] <= s["measured_over_overhead_model_long"][k] + 1e-12
               for k in s["measured_over_gemv_model_long"])
    dec = r["decode"]
    assert {d["cache"] for d in dec} == {"in_place", "dynamic"}
    # the comparison decodes the same cache twice: both decode caches give the same tokens
    cmp = s["cache_comparison"]
    assert [(c["context"], c["keep_ratio"]) for c in cmp] == [(512, 0.25), (512, 1.0)]
    assert all(c["same_tokens"] and c["speedup"] == pytest.approx(c["tpot_dynamic_s"] / c["tpot_in_place_s"]) for c in cmp)
    for d in dec:
        assert d["kv_bytes"] == d["kv_bytes_formula"] > 0
        assert len(d["step_s"]) == sizes["n_decode_tokens"] and all(t > 0 for t in d["step_s"])
        assert 0 < d["tpot_min_s"] <= d["tpot_q25_s"] <= d["tpot_median_s"] <= d["tpot_q75_s"] <= d["tpot_max_s"]
        assert d["decode_tokens_per_s"] == pytest.approx(1 / d["tpot_median_s"])
        assert d["predicted_tpot_s"] == pytest.approx((s["weight_bytes"] + d["kv_bytes"]) / s["bandwidth_bytes_per_s"])
        assert d["measured_over_model"] == pytest.approx(d["tpot_median_s"] / d["predicted_tpot_s"])
        # attention timed alone, in place only, and the model that uses it in place of the KV term
        assert (d["attention_s"] > 0) if d["cache"] == "in_place" else d["attention_s"] is None   # NaN: JSON null
        if d["cache"] == "in_place":
            assert d["predicted_attention_s"] == pytest.approx(
                s["step_overhead_s"] + s["weight_bytes"] / s["bandwidth_probes"]["gemv_bytes_per_s"] + d["attention_s"])
    for n in sizes["context_lens"]:
        kn = sorted((d for d in dec if d["context"] == n and d["policy"] == "knorm" and d["cache"] == "in_place"),
                    key=lambda d: d["keep_ratio"])
        assert [d["keep_ratio"] for d in kn] == ratios
        assert all(a["kv_bytes"] < b["kv_bytes"] for a, b in zip(kn, kn[1:]))  # fewer kept tokens, fewer bytes
        assert kn[-1]["kv_bytes"] == 30 * s["kv_bytes_per_token_per_layer"] * n  # keep 1.0: the whole cache
        # the decode cache is a copy of the kept cache: memory grows by at least half of it
        assert kn[-1]["decode_peak_increase_MB"] * 1e6 >= 0.5 * kn[-1]["kv_bytes"]
    stream = [d for d in dec if d["policy"] == "streaming"]
    assert stream and all(d["context"] == sizes["headline_len"] for d in stream)
    for d in stream:  # same budget, same bytes
        twin = next(k for k in dec if k["policy"] == "knorm" and k["context"] == d["context"]
                    and k["keep_ratio"] == d["keep_ratio"] and k["cache"] == "in_place")
        assert d["kv_bytes"] == twin["kv_bytes"]
    prefill = {x["context"]: x for x in r["prefill"]}
    assert set(prefill) == set(sizes["context_lens"])
    for row in r["ttft"]:
        pre = prefill[row["context"]]["prefill_s"]
        assert len(row["ttft_s"]) == len(pre) == sizes["n_repeats"]
        assert row["ttft_s"] == pytest.approx([a + b for a, b in zip(pre, row["compress_s"])])
        assert (row["compress_median_s"] == 0) == (row["keep_ratio"] == 1.0)
        assert 0 <= row["compress_share_of_ttft"] < 1
    cold = r["cold_warm"]
    assert len(cold) == len(sizes["cold_lens"]) * sizes["n_cold_processes"] * 2 * 3
    firsts = [c for c in cold if c["round"] == 0]
    assert [c["keep_ratio"] for c in firsts][::2] == [1.0] * (len(firsts) // 2)  # the baseline runs first
    assert all(c["ttft_s"] > 0 and c["load_s"] > 0 for c in cold)
    for t in r["trap"]:
        assert t["fake_change"] == pytest.approx(t["compressed_after_cold_s"] / t["cold_baseline_s"] - 1)
        assert t["cold_over_warm"] == pytest.approx(t["cold_baseline_s"] / t["warm_baseline_s"])
        assert t["baseline_with_load_s"] > t["cold_baseline_s"] and t["fake_change_with_load"] < t["fake_change"]
    assert s["trap_cold_over_warm_median"] > 0 and -1 < s["trap_fake_change_median"] and -1 < s["trap_warm_change_median"]
    assert isinstance(s["meets_1p3_bar"], bool) and s["profile_ops"]
    assert s["first_call_memory_increase_bytes"] >= 0 and set(s["tpot_fit"]) == {
        "intercept_s", "seconds_per_kv_byte", "kv_bytes_moved_per_kv_byte", "intercept_over_weight_time"}
    for name in ("tpot_bandwidth_model", "ttft_kv_memory", "ttft_trap"):
        assert (ROOT / "build" / "figures" / "quick" / "06_speed_tradeoffs" / f"{name}.png").exists()


def test_05_recorded_numbers(executed):
    """Passkey retrieval: verdicts are per-sample booleans, keep_ratio 1.0 is the same cache for every
    policy, the one-prefill sweep gives exactly the re-prefill metrics, generation agreement is sane."""
    res = _results("05_passkey_retrieval")
    r = res["results"]
    rows = r["rows"]
    assert res["profile"] == "quick" and rows
    assert all(isinstance(x["correct"], bool) and 0 <= x["digit_acc"] <= 1 and x["key_nll"] >= 0 for x in rows)
    assert all(0 <= a["lo"] <= a["accuracy"] <= a["hi"] <= 1 for a in r["accuracy"])
    full = {}
    for x in rows:
        if x["keep_ratio"] == 1.0:
            full.setdefault((x["context"], x["seed"], x["depth"]), set()).add((x["correct"], round(x["key_nll"], 6)))
    assert all(len(v) == 1 for v in full.values())  # independent of the policy
    assert r["summary"]["policy_independent_at_keep_1"] is True
    # SmolLM2 retrieves the key uncompressed at a few hundred tokens (the quick contexts)
    assert all(a == 1.0 for a in r["summary"]["uncompressed_accuracy_by_context"].values())
    assert r["summary"]["claim_90pct"]["verdict"] in ("holds", "does not hold", "holds only partly", "not resolved", "untestable")
    speed = r["speed"]
    assert speed["metrics_identical"] is True and speed["same_correct_everywhere"] is True
    assert speed["max_abs_nll_diff"] <= 1e-5
    assert speed["ratio"] > 1 and speed["token_ceiling"] > 1  # no timing bar in tests: only that it was recorded
    assert speed["n_configs_reprefill"] < speed["n_configs_sweep"]
    gen = r["generation"]
    n_new = res["parameters"]["sizes"]["gen_new_tokens"]
    assert gen and all(1 <= g["matching_prefix"] <= n_new and 0 < g["token_agreement"] <= 1 for g in gen)
    proto, n = r["protocol_rows"], r["protocol_n_samples"]
    n_configs = 1 + len(res["parameters"]["sizes"]["protocol_skip_sets"]) * len(res["parameters"]["protocol_policies"]) \
        * sum(k < 1 for k in res["parameters"]["protocol_keep_ratios"])
    assert len(proto) == 2 * n * n_configs and {x["protocol"] for x in proto} == {"question-agnostic", "reference"}
    at_1 = {}
    for x in proto:   # uncompressed, both protocols read the same model on the same tokens
        if x["keep_ratio"] == 1.0:
            at_1.setdefault((x["seed"], x["depth"]), set()).add(x["correct"])
    assert len(at_1) == n and all(len(v) == 1 for v in at_1.values())
    assert {(c["protocol"], c["skip"]) for c in r["protocol_claims"]} == {
        (p, f"skip ({', '.join(map(str, s))})") for p in ("question-agnostic", "reference")
        for s in res["parameters"]["sizes"]["protocol_skip_sets"]}
    assert all(c["verdict"] in ("holds", "fails", "not resolved") and c["n"] == n for c in r["protocol_claims"])
    for fig in ("passkey_heatmaps", "protocols"):
        assert (ROOT / "build" / "figures" / "quick" / "05_passkey_retrieval" / f"{fig}.png").exists()


def test_07_recorded_numbers(executed):
    """The ledger: every row carries a verdict from the rules, the perplexity rows count the
    documents measured here, the passkey rows are 05's claims, and when every notebook ran before it
    nothing is "not measured" but the rows the model cannot test (no QK-norm, no windows), saying so."""
    from knorm_study import claims

    res = _results("07_paper_claims")
    r = res["results"]
    rows = r["ledger"]
    assert rows and all(x["verdict"] in claims.VERDICTS and x["claim"] and x["protocol"] for x in rows)
    # only the rows this model cannot test (QK-norm, sliding windows) are not measured, and they say why
    unmeasured = [x for x in rows if x["verdict"] == "not measured"]
    assert {x["key"].split(".")[0] for x in unmeasured} <= {"qk_norm", "layers"}
    assert all("does not apply" in x["measured"] for x in unmeasured)
    n_stream = len({x["document"] for x in r["streaming_rows"]})
    n_prefill = len({x["document"] for x in r["prefill_rows"]})
    lm = [x for x in rows if x["claim"].startswith("Evicting")]
    assert [x["n"] for x in lm] == [n_stream, n_prefill, n_stream]
    assert all(x["verdict"] == "not resolved" for x in lm)   # quick: 2 documents resolve nothing
    burst = [x for x in r["streaming_rows"] if x["prune_after"]]
    assert burst and all(x["mean_kept_fraction"] == pytest.approx(_kept_fraction(x)) for x in burst)
    passkey_rows = [x for x in rows if x["claim"].startswith("Passkey")]
    recorded = _results("05_passkey_retrieval")["results"]["protocol_claims"]
    assert [x["verdict"] for x in passkey_rows] == [c["verdict"] for c in recorded]


def test_one_command_runs_every_notebook_on_another_architecture(tmp_path, monkeypatch, capsys):
    """`make report MODEL=<dir> PROFILE=quick` (run_report.main) on a tiny random-weight Gemma 3
    checkpoint (another architecture, not the embedded model: sliding windows of 64 crossed by the
    notebooks' texts, a global layer with its own RoPE, QK-norm, one KV head): the estimate is printed first, every
    notebook runs to its findings and records under the model's slug (the embedded model's paths
    untouched), names no SmolLM2 in what it prints, the model's report is rendered, README.md is
    left alone, and the kernel's TCP warning never reaches the screen."""
    import render_report
    import run_report
    from helpers import _save

    path = _save(tmp_path, "gemma3_text", dict(num_hidden_layers=4, max_position_embeddings=2048, head_dim=16,
                                                num_key_value_heads=1, query_pre_attn_scalar=16, sliding_window=64,
                                                layer_types=["sliding_attention"] * 3 + ["full_attention"]))
    results, reports = tmp_path / "results", tmp_path / "reports"
    for module, name, value in ((run_report, "RESULTS", results), (render_report, "RESULTS", results),
                                (render_report, "REPORTS", reports)):
        monkeypatch.setattr(module, name, value)
    readme = (ROOT / "README.md").read_text()
    assert run_report.main(["--model", path, "--profile", "quick", "--force"]) == 0
    screen = capsys.readouterr()
    assert "estimated time for the quick profile on cpu" in screen.out
    assert len(re.findall(r"done in \d+ s \(estimated \d+ s\)", screen.out)) == len(NOTEBOOKS)   # each beside its estimate
    assert "without encryption" not in screen.out + screen.err
    for nb in NOTEBOOKS:
        recorded = json.loads((results / nb.stem / "gemma3_text" / "quick.json").read_text())
        assert recorded["identity"]["model_slug"] == "gemma3_text" and recorded["identity"]["model_name"] == path
        assert not (results / nb.stem / "quick.json").exists()
        out = nbformat.read(ROOT / "build" / "notebooks" / "gemma3_text" / "quick" / nb.name, as_version=4)
        printed = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                          for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "SmolLM2" not in printed, nb.stem
    report = (reports / "gemma3_text" / "REPORT-quick.md").read_text()
    assert report.startswith("# knorm-study report (gemma3_text, quick profile)") and "## 07 · The claims ledger" in report
    assert (ROOT / "README.md").read_text() == readme
