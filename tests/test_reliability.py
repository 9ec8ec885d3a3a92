"""Issue 12: headless runs that never hang, data that cannot go bad silently, committed results
that only `make report` writes, and parameter checks without holes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch

import knorm_lib as kl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_data  # noqa: E402
import notebook_runner as runner  # noqa: E402
import run_report  # noqa: E402


# --- headless runs: every papermill call has a timeout, a retry, and a loud failure ----------------

def test_a_blocked_cell_times_out_is_retried_once_and_named(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'quick'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import time\nn_tries = 1\ntime.sleep(60)")]
    nb.metadata["kernelspec"] = {"name": runner.KERNEL, "display_name": runner.KERNEL, "language": "python"}
    path = tmp_path / "blocks.ipynb"
    nbformat.write(nb, path)
    t0 = time.perf_counter()
    with pytest.raises(runner.NotebookTimeout, match=r"blocks: cell \d+ \('import time'\).*2 s .*2 tries"):
        runner.execute(path, tmp_path / "out" / "blocks.ipynb", {"profile": "quick"}, cell_timeout_s=2)
    assert time.perf_counter() - t0 < 50   # two tries of 2 s plus kernel starts, never the 60 s sleep


def test_every_papermill_call_goes_through_the_runner():
    """One place sets the timeout: no script, test or benchmark calls papermill directly."""
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]:
        if path.name in ("notebook_runner.py", Path(__file__).name):
            continue
        assert "execute_notebook" not in path.read_text(encoding="utf-8"), path.name
    assert set(runner.CELL_TIMEOUT_S) == set(kl.PROFILES)


# --- the data: pinned, verified, and every error names its file ---------------------------------------

def test_a_damaged_model_file_is_detected(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(make_data, "MODEL_DIR", tmp_path)
    monkeypatch.setattr(make_data, "MODEL_FILES_SHA256", {"model.safetensors": make_data.sha256(tmp_path / "model.safetensors")})
    assert make_data.model_mismatches() == []
    (tmp_path / "model.safetensors").write_bytes(b"weightz")   # one byte changed
    assert make_data.model_mismatches() == ["model.safetensors"]


def test_the_real_model_files_are_the_pinned_bytes():
    assert make_data.model_mismatches() == []


def test_a_damaged_archive_is_named(tmp_path):
    wheel = tmp_path / "gensim-4.4.0-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gensim/test/test_data/lee_background.cor", "x" * 10_000)
    assert make_data.archive_ok(wheel)
    data = bytearray(wheel.read_bytes())
    data[100] ^= 0xFF                       # inside the member's compressed bytes
    wheel.write_bytes(bytes(data))
    assert not make_data.archive_ok(wheel)
    tarball = tmp_path / "gensim-4.4.0.tar.gz"
    tarball.write_bytes(b"not a tarball at all")
    with pytest.raises(SystemExit, match="gensim-4.4.0.tar.gz"):
        make_data.extract_member(tarball, "lee_background.cor", tmp_path / "out.cor", "0" * 64)
    assert not (tmp_path / "out.cor").exists() and not (tmp_path / "out.cor.tmp").exists()


@pytest.fixture
def corpus_copy(tmp_path, monkeypatch):
    """A private copy of data/ (manifest + corpora) that the library reads instead."""
    (tmp_path / "corpora").mkdir()
    for name in kl.CORPORA:
        shutil.copy(kl.CORPUS_DIR / f"{name}.jsonl", tmp_path / "corpora" / f"{name}.jsonl")
    shutil.copy(kl.DATA_DIR / "manifest.json", tmp_path / "manifest.json")
    monkeypatch.setattr(kl, "DATA_DIR", tmp_path)
    monkeypatch.setattr(kl, "CORPUS_DIR", tmp_path / "corpora")
    monkeypatch.setattr(kl, "_VERIFIED_CORPORA", set())
    return tmp_path / "corpora"


@pytest.mark.parametrize("cut", ["line", "mid-line"])
def test_a_cut_corpus_is_refused_naming_the_file(corpus_copy, cut):
    path = corpus_copy / "wiki.jsonl"
    assert len(kl.load_corpus("wiki")) == 104
    kl._VERIFIED_CORPORA.clear()
    data = path.read_bytes()
    end = data.rindex(b"\n", 0, len(data) - 1) + 1 if cut == "line" else len(data) - 100
    path.write_bytes(data[:end])
    with pytest.raises(ValueError, match=r"wiki\.jsonl has sha256 .* `make data`"):
        kl.load_corpus("wiki")


def test_run_stamps_cover_the_corpora(corpus_copy, monkeypatch):
    monkeypatch.setattr(run_report, "ROOT", ROOT)
    nb = ROOT / "notebooks" / "01_norm_distributions.ipynb"
    before = run_report.input_hash(nb, "full")
    kl._VERIFIED_CORPORA.clear()
    path = corpus_copy / "news.jsonl"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="news.jsonl"):   # a damaged corpus never reads as "unchanged"
        run_report.input_hash(nb, "full")
    assert len(before) == 64


# --- results and figures: only `make report` writes the committed ones --------------------------------

def test_ad_hoc_runs_write_under_build():
    env = {k: v for k, v in os.environ.items() if k not in ("KNORM_RESULTS_DIR", "KNORM_FIGURES_DIR")}
    out = subprocess.run([sys.executable, "-c", "import knorm_lib as kl; print(kl.RESULTS_DIR); print(kl.FIGURES_DIR)"],
                         capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, check=True)
    results_dir, figures_dir = out.stdout.split()
    assert Path(results_dir) == ROOT / "build" / "results" and figures_dir == "None"


def test_figures_appear_only_with_their_results(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(kl, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(kl, "FIGURES_DIR", tmp_path / "figures")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    final = kl.save_figure(fig, "99_test", "line", "full")
    plt.close(fig)
    assert final == tmp_path / "figures" / "99_test" / "line.png" and not final.exists()  # the notebook may still fail
    kl.record_results("99_test", "full", {"profile": "full"}, {"x": 1})
    assert final.exists() and (tmp_path / "results" / "99_test" / "full.json").exists()
    assert kl._PENDING_FIGURES.get("99_test") is None


# --- parameter checks --------------------------------------------------------------------------------

def test_notebook_parameters_catch_rebinding_and_skip_plumbing():
    import math as stats
    before = {"stats": stats, "kl": kl}
    declared = {"stats", "kl", "profile", "_before", "_i2"}
    ns = {"stats": stats, "kl": kl, "profile": "quick", "_before": before, "_i2": "profile = 'full'"}
    assert kl.notebook_parameters(ns, declared, before) == {"profile": "quick"}
    with pytest.raises(ValueError, match="stats"):
        kl.notebook_parameters({**ns, "stats": 5}, declared, before)
    with pytest.raises(ValueError, match=r"policies='h2o'.*streaming protocol only"):
        kl.notebook_parameters({**ns, "policies": ["h2o"]}, declared | {"policies"}, before)
    with pytest.raises(ValueError, match="streaming_policies='snapkv'"):
        kl.notebook_parameters({**ns, "streaming_policies": ["snapkv"]}, declared | {"streaming_policies"}, before)


def test_explorer_setting_checks(tiny32):
    ok = dict(keep_ratio=0.5, policy="knorm", skip_layers=[0, 1], position_mode="absolute", layer=2, kv_head=0,
              max_tokens=512)
    kl.Explorer.check_setting(tiny32, **ok)
    for bad, match in ((dict(keep_ratio=0.01), "keep_ratio"), (dict(keep_ratio=0.33), "keep_ratio"),
                       (dict(policy="h2o"), "policy"), (dict(skip_layers=[5]), "skip_layers"),
                       (dict(skip_layers=None), "skip_layers"), (dict(layer=4), "layer"), (dict(kv_head=2), "kv_head"),
                       (dict(max_tokens=100_000), "max_tokens")):
        with pytest.raises(ValueError, match=match):
            kl.Explorer.check_setting(tiny32, **{**ok, **bad})


def test_library_argument_checks(tiny32):
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="n_sink"):
        kl.streaming_ppl(tiny32, ids, "streaming", keep_ratio=0.5, n_sink=-1)
    with pytest.raises(ValueError, match="n_sink"):
        kl.prefill_ppl(tiny32, ids, 16, 0.5, "streaming", n_sink=-1)
    with pytest.raises(ValueError, match="seed"):
        kl.prefill_ppl(tiny32, ids, 16, 0.5, "random", seed="x")
    with pytest.raises(ValueError, match="skip_layers"):
        kl.prefill_ppl(tiny32, ids, 16, 0.5, skip_layers=None)
    with pytest.raises(ValueError, match="skip_layers"):
        kl.streaming_ppl(tiny32, ids, keep_ratio=0.5, skip_layers=None)
    with pytest.raises(ValueError, match="configs"):
        kl.sweep(tiny32, ids, 16, [0.5])
    bad_ids = ids.clone()
    bad_ids[0, 3] = 256
    with pytest.raises(ValueError, match="input_ids.*vocabulary"):
        kl.prefill_ppl(tiny32, bad_ids, 16, 0.5)
    with pytest.raises(ValueError, match="input_ids.*vocabulary"):
        kl.streaming_ppl(tiny32, bad_ids, keep_ratio=0.5)
    # every layer skipped: nothing is compressed, and n_kept says so
    every = tuple(range(4))
    assert kl.prefill_ppl(tiny32, ids, 16, 0.5, skip_layers=every).n_kept == 16
    assert kl.streaming_ppl(tiny32, ids, keep_ratio=0.5, skip_layers=every).n_kept == 32


def test_unknown_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("org/unknown", "models/mine"):
        t0 = time.perf_counter()
        with pytest.raises(FileNotFoundError, match=name):
            kl.load_model(name)
        assert time.perf_counter() - t0 < 15


# --- the results comparison ----------------------------------------------------------------------------

def test_compare_results_families_and_check(tmp_path, capsys):
    import compare_results

    run = {"profile": "full", "identity": {"knorm_lib_sha256": "a"}, "results": {
        "rows": [{"policy": "knorm", "keep_ratio": 0.5, "ppl": 17.0, "kl": 0.05, "next_token_acc": 0.4,
                  "prefill_s": 3.0}]}}
    ref = json.loads(json.dumps(run))
    ref["identity"]["knorm_lib_sha256"] = "b"          # provenance is not compared
    ref["results"]["rows"][0]["prefill_s"] = 4.0       # timings differ: shown, never fatal
    fams = compare_results.compare(run, ref, "04_quality_tradeoffs")
    assert fams["ppl"]["max_rel"] == 0 and fams["kl"]["max_rel"] == 0 and fams["accuracy"]["max_rel"] == 0
    assert fams["timing"]["max_rel"] == pytest.approx(0.25)
    for name, obj in (("run", run), ("ref", ref)):
        (tmp_path / name / "04_quality_tradeoffs").mkdir(parents=True)
        (tmp_path / name / "04_quality_tradeoffs" / "full.json").write_text(json.dumps(obj))
    args = ["--run", str(tmp_path / "run"), "--reference", str(tmp_path / "ref"), "--check"]
    assert compare_results.main(args) == 0
    run["results"]["rows"][0]["ppl"] = 17.01            # 5.9e-4 relative: beyond 1e-4
    (tmp_path / "run" / "04_quality_tradeoffs" / "full.json").write_text(json.dumps(run))
    assert compare_results.main(args) == 1
    assert "04_quality_tradeoffs/ppl" in capsys.readouterr().out
