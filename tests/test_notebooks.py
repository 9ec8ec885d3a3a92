"""Every study notebook: committed clean, parameterized, validated, and executed headless in the
quick profile; the numbers each one records are asserted here (types, ranges, invariants)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
KERNEL = "knorm-study"


def _execute(notebook: Path, out_dir: Path, **parameters) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    pm.execute_notebook(str(notebook), str(out_dir / notebook.name), parameters=parameters, kernel_name=KERNEL,
                        cwd=str(notebook.parent), progress_bar=False)


def _results(name: str) -> dict:
    return json.loads((ROOT / "data" / "results" / name / "quick.json").read_text())


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
    """papermill only warns on unknown names; the notebook itself must stop, naming the parameter."""
    with pytest.raises(pm.PapermillExecutionError, match="keep_ratioz"):
        _execute(ROOT / "notebooks" / "03_position_order_ppl.ipynb", tmp_path, profile="quick", keep_ratioz=[0.5])


def test_bad_parameter_value_is_an_error(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="profile"):
        _execute(ROOT / "notebooks" / "01_norm_distributions.ipynb", tmp_path, profile="medium")
    with pytest.raises(pm.PapermillExecutionError, match="keep_ratio"):
        _execute(ROOT / "notebooks" / "02_attention_correlation.ipynb", tmp_path, profile="quick", keep_ratios=[1.5])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
