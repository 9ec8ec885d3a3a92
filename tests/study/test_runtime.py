"""knorm_study.runtime: parameters, result files, figures, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import knorm_lib as kl
from helpers import ROOT
from knorm_study import runtime, speed


def test_write_json_atomic(tmp_path):
    """write_json_atomic creates parent folders, leaves no temporary file behind, writes valid
    JSON, replaces an existing file, and on a serialisation error keeps the old file intact."""
    path = tmp_path / "results" / "run.json"
    obj = {"ppl": 39.68, "keep_ratios": [1.0, 0.9], "nested": {"a": None}}
    runtime.write_json_atomic(path, obj)
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    assert json.loads(path.read_text(encoding="utf-8")) == obj

    runtime.write_json_atomic(path, {"ppl": 155.91, "path": tmp_path})  # non-JSON types become strings
    assert json.loads(path.read_text(encoding="utf-8")) == {"ppl": 155.91, "path": str(tmp_path)}

    runtime.write_json_atomic(path, {"ppl": 155.91, "path": tmp_path, "acc": float("nan")})  # NaN is not JSON
    assert json.loads(path.read_text(encoding="utf-8"))["acc"] is None

    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        runtime.write_json_atomic(path, circular)
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    assert json.loads(path.read_text(encoding="utf-8"))["ppl"] == 155.91


def test_write_json_atomic_never_exposes_a_partial_file(tmp_path, monkeypatch):
    """The documented mechanism: the complete JSON is written to a temporary file in the same
    folder, then moved over the target with os.replace, so the target holds the old content
    until the new one is whole."""
    path = tmp_path / "run.json"
    runtime.write_json_atomic(path, {"old": True})
    real_replace = runtime.os.replace
    seen = []

    def checking_replace(src, dst):
        src, dst = Path(src), Path(dst)
        seen.append(dst)
        assert src.parent == dst.parent and src != dst
        assert json.loads(src.read_text(encoding="utf-8")) == {"new": [1, 2, 3]}
        assert json.loads(dst.read_text(encoding="utf-8")) == {"old": True}
        real_replace(src, dst)

    monkeypatch.setattr(runtime.os, "replace", checking_replace)
    runtime.write_json_atomic(path, {"new": [1, 2, 3]})
    assert seen == [path]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_ad_hoc_runs_write_under_build():
    env = {k: v for k, v in os.environ.items() if k not in ("KNORM_RESULTS_DIR", "KNORM_FIGURES_DIR")}
    out = subprocess.run([sys.executable, "-c", "from knorm_study import runtime; print(runtime.RESULTS_DIR); print(runtime.FIGURES_DIR)"],
                         capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, check=True)
    results_dir, figures_dir = out.stdout.split()
    assert Path(results_dir) == ROOT / "build" / "results" and figures_dir == "None"


def test_figures_appear_only_with_their_results(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(runtime, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(runtime, "FIGURES_DIR", tmp_path / "figures")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    runtime.save_figure(fig, "99_test", "line", "full")
    final = tmp_path / "figures" / "99_test" / "line.png"
    assert not final.exists()  # the notebook may still fail
    runtime.record_results("99_test", "full", {"profile": "full"}, {"x": 1})
    assert final.exists() and (tmp_path / "results" / "99_test" / "full.json").exists()
    assert runtime._PENDING_FIGURES.get("99_test") is None
    # any model but the embedded one: results and figures under its slug, the committed ones untouched
    model = speed.random_llama(seed=0)
    runtime.save_figure(fig, "99_test", "line", "full")
    plt.close(fig)
    path = runtime.record_results("99_test", "full", {"profile": "full"}, {"x": 2}, model)
    assert path == tmp_path / "results" / "99_test" / "random-llama-4x64" / "full.json"
    assert json.loads(path.read_text())["identity"]["model_slug"] == "random-llama-4x64"
    assert (tmp_path / "figures" / "random-llama-4x64" / "99_test" / "line.png").exists()
    assert json.loads((tmp_path / "results" / "99_test" / "full.json").read_text())["results"] == {"x": 1}


def test_model_slug():
    """None for the embedded model (committed paths); a safe folder name otherwise."""
    class Named:
        def __init__(self, name):
            self.name_or_path = name
    assert runtime.model_slug(None) is None
    assert runtime.model_slug(Named(str(kl.DEFAULT_MODEL_DIR))) is None
    assert runtime.model_slug(Named("meta-llama/Llama-3.2-1B")) == "meta-llama--llama-3.2-1b"
    assert runtime.model_slug(Named("../weird name/")) == "weird-name"


def test_notebook_parameters_catch_rebinding_and_skip_plumbing():
    import math as stats
    before = {"stats": stats, "kl": kl}
    declared = {"stats", "kl", "profile", "_before", "_i2"}
    ns = {"stats": stats, "kl": kl, "profile": "quick", "_before": before, "_i2": "profile = 'full'"}
    assert runtime.notebook_parameters(ns, declared, before) == {"profile": "quick"}
    with pytest.raises(ValueError, match="stats"):
        runtime.notebook_parameters({**ns, "stats": 5}, declared, before)
    with pytest.raises(ValueError, match=r"policies='h2o'.*streaming protocol only"):
        runtime.notebook_parameters({**ns, "policies": ["h2o"]}, declared | {"policies"}, before)
    with pytest.raises(ValueError, match="streaming_policies='snapkv'"):
        runtime.notebook_parameters({**ns, "streaming_policies": ["snapkv"]}, declared | {"streaming_policies"}, before)



def test_check_skip_layers_against_the_model_depth(tiny32):
    """skip_layers must name the model's layers and leave at least one to compress."""
    runtime.check_skip_layers(tiny32, [0, 1])
    with pytest.raises(ValueError, match=r"skip_layers=\(0, 1, 2, 3\): leaves none of the model's 4 layers"):
        runtime.check_skip_layers(tiny32, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="skip_layers"):
        runtime.check_skip_layers(tiny32, [0, 7])
