"""scripts/: the notebook runner, make data's pins, run stamps, the results comparison."""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

import knorm_lib as kl
import make_data
import notebook_runner as runner
import render_report
import run_report
from helpers import ROOT
from knorm_study import attention, norm_distributions, passkey, position_order, quality, runtime, speed


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
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        if path.name in ("notebook_runner.py", Path(__file__).name):
            continue
        assert "execute_notebook" not in path.read_text(encoding="utf-8"), path.name
    assert set(runner.CELL_TIMEOUT_S) == set(runtime.PROFILES)


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


def test_the_ledger_reruns_when_a_result_it_reads_changes():
    """07's stamp covers the recorded results it reads (02, 03, 05, 06 of the same profile);
    another notebook's stamp does not depend on them. No stamp hashes the library's code: the
    records' behavioural identity stands for it."""
    ledger = run_report.notebook_inputs(ROOT / "notebooks" / "07_paper_claims.ipynb", "quick")
    assert run_report.RESULTS / "05_passkey_retrieval" / "quick.json" in ledger
    assert not any(p.parent.name in ("knorm_lib", "knorm_study") for p in ledger)
    quality = run_report.notebook_inputs(ROOT / "notebooks" / "04_quality_tradeoffs.ipynb", "quick")
    assert not any(p.is_relative_to(run_report.RESULTS) for p in quality)


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
    run["results"]["rows"].append({"policy": "random", "ppl": 30.0})   # new numbers: not a reproduction failure
    (tmp_path / "run" / "04_quality_tradeoffs" / "full.json").write_text(json.dumps(run))
    assert compare_results.main(args) == 0
    assert compare_results.compare(run, ref, "04_quality_tradeoffs")["ppl"]["added"] == 1
    del ref["results"]["rows"][0]["kl"]                 # ... but a committed number the run lacks is
    assert compare_results.compare(ref, run, "04_quality_tradeoffs")["kl"]["missing"] == 1
    run["results"]["rows"][0]["ppl"] = 17.01            # 5.9e-4 relative: beyond 1e-4
    (tmp_path / "run" / "04_quality_tradeoffs" / "full.json").write_text(json.dumps(run))
    assert compare_results.main(args) == 1
    assert "04_quality_tradeoffs/ppl" in capsys.readouterr().out


FINDINGS = {"01_norm_distributions": norm_distributions, "02_attention_correlation": attention,
            "03_position_order_ppl": position_order, "04_quality_tradeoffs": quality,
            "05_passkey_retrieval": passkey, "06_speed_tradeoffs": speed}


@pytest.mark.parametrize("notebook", sorted(render_report.SECTIONS))
def test_report_sections_render_from_the_committed_results(notebook):
    """Every REPORT.md section renders from the committed full-profile record, with no unfilled
    placeholder or NaN, and its conclusions are the study module's findings(), the same text the
    notebook's last cell shows: conclusions are generated in one place."""
    record = render_report.load(notebook, "full")
    assert record is not None, f"no committed data/results/{notebook}/full.json"
    body, headline = render_report.SECTIONS[notebook](record)
    assert body.strip()
    for text in (body, headline):   # 00 has no README headline
        assert not re.search(r"\bnan\b|\{[a-z_]+\}", text, re.I), text[:200]
    if notebook in FINDINGS:
        assert FINDINGS[notebook].findings(record).strip() in body



def test_ledger_section_renders_without_04():
    """A ledger recorded before 04 ran (no perplexity rows, no sizes) renders, saying so."""
    record = render_report.load("07_paper_claims", "full")
    record = {**record, "parameters": {**record["parameters"], "sizes": None},
              "results": {**record["results"], "prefill_rows": [], "streaming_rows": []}}
    body, _ = render_report.section_07(record)
    assert "not measured (04 was not run" in body


def test_report_renders_another_models_results(tmp_path):
    """--model SLUG renders that model's results (under <results>/<notebook>/<slug>/) into its own
    file, named after the model, and leaves README.md alone."""
    import subprocess
    import sys

    record = json.loads((ROOT / "data" / "results" / "01_norm_distributions" / "full.json").read_text())
    record["identity"].update(model_slug="org--tiny", model_name="org/tiny")
    target = tmp_path / "01_norm_distributions" / "org--tiny" / "full.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(record))
    readme = (ROOT / "README.md").read_text()
    reports = tmp_path / "reports"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "render_report.py"), "--model", "org--tiny"], check=True,
                   env={**os.environ, "KNORM_RESULTS_DIR": str(tmp_path), "KNORM_REPORTS_DIR": str(reports)},
                   capture_output=True)
    text = (reports / "org--tiny" / "REPORT-full.md").read_text()
    assert text.startswith("# knorm-study report (org/tiny, full profile)") and "figures/org--tiny/01_norm" in text
    link = re.search(r"!\[[^\]]*\]\(([^)]+)\)", text).group(1)   # from the report's folder to the figure
    assert (reports / "org--tiny" / link).resolve() == (ROOT / "figures" / "org--tiny" / "01_norm_distributions"
                                                        / Path(link).name).resolve()
    assert (ROOT / "README.md").read_text() == readme


@pytest.mark.parametrize("path", sorted([*(ROOT / "data" / "results").glob("*/full.json"),
                                          *(ROOT / "data" / "results").glob("*/paper.json"),
                                          *(ROOT / "data" / "results").glob("*/*/full.json"),
                                          *(ROOT / "data" / "results").glob("*/*/paper.json")]),
                         ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_committed_results_come_from_code_that_computes_the_same(path):
    """Nothing lands with stale results: every committed full- or paper-profile record carries the
    behavioural fingerprint of the code that made it (``knorm_study.fingerprint``), and today's
    code computes the same probe numbers within the tolerance. A change to what the code computes
    needs `make report` before it lands; a refactor does not."""
    from knorm_study import fingerprint

    moved = fingerprint.record_moved(path)
    assert not moved, (f"{path.parent.name} ({path.stem}): stale, its probes moved: {fingerprint.describe(moved)}; "
                       "run `make report`")


def test_the_code_identity_ignores_prose_and_sees_code(tmp_path):
    """A docstring, comment or blank-line edit to a library module keeps its code hash; a one-token
    code edit changes it."""
    source = (ROOT / "knorm_lib" / "policies.py").read_text()
    original = runtime.code_sha256(ROOT / "knorm_lib" / "policies.py")
    edits = {"docstring": source.replace("Scores and policies (higher score", "Scores and policies (a higher score", 1),
             "function docstring": source.replace('"""KnormPress: keep the lowest key norms."""',
                                                  '"""KnormPress: the lowest key norms are kept."""', 1),
             "comment": source.replace("# float32 on purpose", "# float32, on purpose", 1),
             "layout": source.replace("\n\n\ndef ", "\n\n\n\ndef ", 1),
             "code": source.replace("return -_norms(kv.keys)", "return _norms(kv.keys)", 1)}
    for what, text in edits.items():
        assert text != source, f"the {what} edit did not apply"
        edited = tmp_path / f"{what}.py"
        edited.write_text(text)
        assert (runtime.code_sha256(edited) == original) == (what != "code"), what


def test_report_renders_each_gpu_record_of_06(tmp_path, monkeypatch):
    """A GPU record of notebook 06 (``06_speed_tradeoffs/<slug>/gpu-<card>.json``) gets its own
    report section, titled with its model and card, with the TPOT-against-models table read from it."""
    record = json.loads((ROOT / "data" / "results" / "06_speed_tradeoffs" / "full.json").read_text())
    record["profile"] = "gpu-test-card"
    record["identity"]["model_slug"] = "random-llama-2x8"
    record["results"]["summary"]["model_label"] = "random Llama 2L×8, bfloat16, Test Card"
    target = tmp_path / "06_speed_tradeoffs" / "random-llama-2x8" / "gpu-test-card.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(record))
    monkeypatch.setattr(render_report, "RESULTS", tmp_path)
    text = render_report.section_06_gpu()
    assert text.startswith("## 06 on a GPU: random Llama 2L×8, bfloat16, Test Card")
    d = next(x for x in record["results"]["decode"] if x["policy"] == "knorm" and x["cache"] == "in_place"
             and x["keep_ratio"] == 0.25)
    assert f"| {d['context']} | 0.250 | {d['tpot_median_s'] * 1e3:.2f} | {d['predicted_tpot_s'] * 1e3:.2f} |" in text
    assert "figures/random-llama-2x8/06_speed_tradeoffs/tpot_bandwidth_model.png" in text


@pytest.mark.parametrize("path", sorted((ROOT / "data" / "results").glob("*/*/*.json")), ids=lambda p: "/".join(p.parts[-3:]))
def test_other_models_records_sit_under_their_own_slug(path):
    """A committed record of a model other than the embedded one (e.g. the GPU run's) lives in the
    folder named after its model's slug, records which notebook and model it is, and a GPU record
    of 06 names the card it ran on."""
    record = json.loads(path.read_text())
    assert record["identity"]["model_slug"] == path.parent.name
    assert record["notebook"] == path.parent.parent.name
    if path.stem.startswith("gpu-"):
        assert record["profile"] == path.stem and record["machine"].get("gpu")


def _notebook_with_profiles(tmp_path, profiles):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"DEFAULTS = {{{', '.join(repr(p) + ': dict(n=1)' for p in profiles)}}}"),
                nbformat.v4.new_code_cell("profile = 'full'\nn = None")]
    path = tmp_path / "99_test.ipynb"
    nbformat.write(nb, path)
    return path


def _args(**kw):
    import argparse

    return argparse.Namespace(**{"profile": "full", "model": None, "device": "cpu", "dtype": None, "yes": False,
                                 "ledger": False, "force": False, "jobs": 1, "no_summary": False, **kw})


def test_the_runner_refuses_bad_input_before_any_notebook_runs(tmp_path):
    """A profile a notebook does not know, a dtype or device that is not there, a model directory
    without a config and an architecture load_model refuses: each stops the runner naming the
    argument, from the config alone (no weights load)."""
    import torch
    from helpers import REFUSED, _save

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for profile in runtime.PROFILES:   # every notebook knows every profile
        run_report.preflight(_args(profile=profile), notebooks)
    with pytest.raises(SystemExit, match="--profile paper: not a profile of 99_test"):
        run_report.preflight(_args(profile="paper"), [_notebook_with_profiles(tmp_path, ["quick", "full"])])
    with pytest.raises(SystemExit, match="--dtype float8"):
        run_report.preflight(_args(dtype="float8"), notebooks)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device: .*no CUDA device"):
            run_report.preflight(_args(device="cuda"), notebooks)
    with pytest.raises(SystemExit, match="--device: .*'cpu', 'cuda'"):
        run_report.preflight(_args(device="tpu"), notebooks)
    with pytest.raises(SystemExit, match="--model .*no model directory with a config.json"):
        run_report.preflight(_args(model=str(tmp_path / "nowhere")), notebooks)
    overrides, feature = REFUSED["gemma2"]
    refused = _save(tmp_path, "gemma2", overrides)
    with pytest.raises(SystemExit, match=f"--model {refused}: .*({feature})"):
        run_report.preflight(_args(model=refused), notebooks)


def test_the_runner_knows_the_slug_before_loading(tmp_path):
    """The slug the runner stamps and compares under is the one the notebooks record under: None
    only for the embedded model in float32 on a CPU."""
    assert run_report.model_slug(_args()) is None
    assert run_report.model_slug(_args(dtype="bfloat16")) == "smollm2-135m-instruct-bfloat16"
    assert run_report.model_slug(_args(model="org/Tiny-1B", dtype="float32")) == "org--tiny-1b"
    local = tmp_path / "my model"
    local.mkdir()
    assert run_report.model_slug(_args(model=str(local), dtype="float16")) == "my-model-float16"


@pytest.mark.parametrize("profile", runtime.PROFILES)
def test_every_notebook_has_a_forward_token_count(profile):
    """The runner's estimate covers every notebook in every profile, and paper > full > quick."""
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    est = run_report.estimate(notebooks, profile, 1.0)
    assert set(est) == {nb.stem for nb in notebooks}
    if profile != "quick":
        smaller = run_report.estimate(notebooks, {"full": "quick", "paper": "full"}[profile], 1.0)
        assert sum(est.values()) > sum(smaller.values())


def test_a_long_cpu_paper_run_needs_yes(tmp_path, monkeypatch, capsys):
    """The runner prints the estimate from one measured forward; a CPU paper run estimated over an
    hour stops unless --yes."""
    from helpers import _save

    path = _save(tmp_path, "llama", dict(num_hidden_layers=2))
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    monkeypatch.setattr(run_report, "measured_forward_s_per_token", lambda model: 1e-3)
    with pytest.raises(SystemExit, match="--profile paper on cpu: estimated .* h; rerun with --yes"):
        run_report.confirm_estimate(_args(model=path, profile="paper", yes=False), notebooks)
    assert "estimated time for the paper profile on cpu" in capsys.readouterr().out
    run_report.confirm_estimate(_args(model=path, profile="paper", yes=True), notebooks)
    run_report.confirm_estimate(_args(model=path, profile="quick", yes=False), notebooks)


@pytest.fixture
def report_in_tmp(tmp_path, monkeypatch):
    """run_report.main with its results, stamps and build under ``tmp_path`` and no HTML, compare or
    report rendering (the tests below give it a fake notebook executor)."""
    import compare_results

    monkeypatch.setattr(run_report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(run_report, "BUILD", tmp_path / "build")
    monkeypatch.setattr(run_report, "write_html", lambda *a, **k: None)
    monkeypatch.setattr(compare_results, "main", lambda argv: 0)
    monkeypatch.setattr(render_report, "main", lambda argv: 0)


def test_every_run_but_a_jobs_child_estimates_first(tmp_path, monkeypatch, capsys, report_in_tmp):
    """`make report` on the embedded model estimates the notebooks it will run too (before: only
    other models and --ledger), and prints each finished notebook's time beside its estimate; a
    --jobs child (its parent estimated) and a run with nothing to rerun do not estimate."""
    calls = []
    monkeypatch.setattr(run_report, "confirm_estimate", lambda args, nbs, last_runs: calls.append(args.model) or
                        ({nb.stem: 12.0 for nb in nbs}, 0.005))

    def fake_execute(nb, out, parameters, results_dir, **_):
        record = {"notebook": nb.stem, "profile": parameters["profile"], "parameters": parameters,
                  "identity": {"behaviour": fingerprint.of_unit(nb.stem)}}
        runtime.write_json_atomic(results_dir / nb.stem / f"{parameters['profile']}.json", record)

    from knorm_study import fingerprint

    monkeypatch.setattr(runner, "execute", fake_execute)
    assert run_report.main(["--profile", "quick", "--only", "07", "--force"]) == 0
    assert calls == [None]   # the embedded model
    assert re.search(r"07_paper_claims \(quick\): done in \d+ s \(estimated 12 s\)", capsys.readouterr().out)
    assert run_report.main(["--profile", "quick", "--only", "07", "--force", "--no-summary"]) == 0
    assert calls == [None]
    stamps, nb07 = run_report.stamp_dir("quick"), ROOT / "notebooks" / "07_paper_claims.ipynb"
    assert run_report.last_run(stamps, nb07, {"profile": "quick"}) is None   # a child not given its parent's rate
    assert run_report.main(["--profile", "quick", "--only", "07", "--force", "--no-summary",
                            "--forward-s-per-token", "0.004"]) == 0
    assert calls == [None] and run_report.last_run(stamps, nb07, {"profile": "quick"})[1] == 0.004
    # the run's stamp lies beside the results (committed with them), so the next run, here or on a
    # fresh clone, skips the notebook
    assert (tmp_path / "stamps" / "quick" / "07_paper_claims.json").exists()
    assert run_report.main(["--profile", "quick", "--only", "07"]) == 0
    assert "07_paper_claims (quick): unchanged, skipped" in capsys.readouterr().out
    assert calls == [None]   # nothing to run: no model loaded, no estimate
    # a record whose probes today's code no longer computes reruns, named with the probe that moved
    path = tmp_path / "results" / "07_paper_claims" / "quick.json"
    record = json.loads(path.read_text())
    record["identity"]["behaviour"]["claims.ledger_views"] = {"moved": 1}
    runtime.write_json_atomic(path, record)
    assert run_report.main(["--profile", "quick", "--only", "07", "--no-summary"]) == 0
    out = capsys.readouterr().out
    assert "the code no longer computes its record's numbers: claims.ledger_views" in out and "done in" in out
    # the stamp keeps what the next estimate scales: the run's time, parameters and forward rate
    assert run_report.main(["--profile", "quick", "--only", "07", "--force"]) == 0
    seconds, rate = run_report.last_run(stamps, nb07, {"profile": "quick"})
    assert seconds > 0 and rate == 0.005
    assert run_report.last_run(stamps, nb07, {"profile": "quick", "x": 1}) is None   # other parameters
    nb04 = ROOT / "notebooks" / "04_quality_tradeoffs.ipynb"
    assert run_report.estimate([nb04], "full", 0.002, last_runs={nb04.stem: (1000.0, 0.001)}) == {nb04.stem: 2000.0}


def test_a_run_counts_what_it_wrote_not_the_file_clock(tmp_path, monkeypatch, capsys, report_in_tmp):
    """A notebook's run is checked for a record it wrote. The file clock is coarser than
    ``time.time()``, so a record written just after the start can carry an earlier mtime (CI failed
    on that once); a run that writes nothing still fails, even beside an older record."""
    monkeypatch.setattr(run_report, "confirm_estimate", lambda args, nbs, last_runs: ({}, None))
    record = tmp_path / "results" / "07_paper_claims" / "quick.json"

    def writes_with_an_earlier_mtime(nb, out, parameters, results_dir, **_):
        runtime.write_json_atomic(record, {"profile": "quick", "parameters": parameters})
        os.utime(record, (time.time() - 1, time.time() - 1))

    monkeypatch.setattr(runner, "execute", writes_with_an_earlier_mtime)
    for _ in range(2):   # new, then replacing the last run's record
        assert run_report.main(["--profile", "quick", "--only", "07", "--force", "--no-summary"]) == 0
        assert "07_paper_claims (quick): done in" in capsys.readouterr().out
    monkeypatch.setattr(runner, "execute", lambda *a, **k: None)
    assert run_report.main(["--profile", "quick", "--only", "07", "--force", "--no-summary"]) == 1
    assert "FAILED: it did not record" in capsys.readouterr().out


def test_run_stamps_read_python_files_by_their_code(tmp_path, monkeypatch):
    """A docstring or comment edit to the notebook runner keeps the stamps (nothing reruns); a code
    edit changes them."""
    import shutil

    for name in ("notebooks/01_norm_distributions.ipynb", *run_report.HASHED_INPUTS):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(run_report, "ROOT", tmp_path)
    nb = tmp_path / "notebooks" / "01_norm_distributions.ipynb"
    module = tmp_path / "scripts" / "notebook_runner.py"
    assert module in run_report.notebook_inputs(nb, "full")
    source = module.read_text()
    before = run_report.input_hash(nb, "full")
    module.write_text(source.replace('"""', '"""Edited prose. ', 1) + "\n# a comment\n")
    assert run_report.input_hash(nb, "full") == before
    module.write_text(source + "\nEXTRA = 1\n")
    assert run_report.input_hash(nb, "full") != before


def test_the_measured_forward_rate_is_positive(tiny32):
    assert 0 < run_report.measured_forward_s_per_token(tiny32, n_tokens=32) < 1


def test_every_notebook_takes_the_paper_profile_at_its_documented_sizes():
    """The paper profile's sizes, read from the notebooks without running them, are the ones the
    README's table documents with their sources: 3,000-token LM chunks (2,000 + 1,000 prefill),
    prune_after 1000, skip (0, 1), >= 20 chunks and documents, passkey lengths 1k-32k with 10
    samples a cell and the reference's skip sets, speed at 4k-32k."""
    nbs = {nb.stem[:2]: run_report.notebook_sizes(nb, "paper") for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert all(s is not None for s in nbs.values())
    s01, s02, s04, s05, s06 = nbs["01"], nbs["02"], nbs["04"], nbs["05"], nbs["06"]
    assert s01["n_tokens"] == s02["n_tokens"] == s04["stream_tokens"] == s04["context_len"] + s04["continuation_len"] == 3000
    assert (s04["context_len"], s04["continuation_len"], s04["prune_afters"], s04["skip_layers"]) == (2000, 1000, [1000], [0, 1])
    assert min(len(s["corpora"]) * s["n_docs"] for s in (s01, s02, s04)) >= 20
    assert len(s04["corpora"]) * s04["n_stream_docs"] >= 20
    assert s05["contexts"] == [1000, 2000, 4000, 8000, 16000, 32000] and set(s05["seeds"]) == {10}
    assert s05["protocol_seeds"] == 10 and s05["protocol_skip_sets"] == [[0], [0, 1], [0, 1, 12]] and s05["gen_new_tokens"] == 50
    assert s06["context_lens"] == [4096, 8192, 16384, 32768]
    table = (ROOT / "README.md").read_text().split("The `paper` profile, number by number")[1].split("\n\n")[1]
    for documented in ("3,000 tokens", "| 1,000 |", "`(0, 1)`", "| 20 (10 wiki + 10 news)", "32,000 tokens", "| 10 |",
                       "`(0)`, `(0, 1)`, `(0, 1, 12)`", "50 new tokens", "20 documents × 3,000 tokens", "4k, 8k, 16k, 32k"):
        assert documented in table, documented


def test_the_ledger_run_sets_only_parameters_its_notebooks_declare():
    """``--ledger`` overrides parameters by name; papermill only warns on a name a notebook does not
    declare, so each must be one of its notebook's (and 04 keeps every variant the ledger reads).
    It costs less than the whole profile, and is refused where it would replace the committed
    full results."""
    notebooks = {nb.stem[:2]: nb for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    for key, overrides in run_report.LEDGER_PARAMETERS.items():
        assert set(overrides) <= set(run_report.notebook_sizes(notebooks[key], "paper")), key
    s04 = run_report.LEDGER_PARAMETERS["04"]
    assert {"knorm", "random", "high_norm"} <= set(s04["policies"]) and "knorm" in s04["streaming_policies"]
    assert 0.5 in s04["keep_ratios"] and 0.5 in s04["schedule_keep_ratios"]
    chosen = [notebooks[k] for k in run_report.LEDGER_PARAMETERS]
    assert sum(run_report.estimate(chosen, "paper", 1.0, run_report.LEDGER_PARAMETERS).values()) \
        < sum(run_report.estimate(chosen, "paper", 1.0).values())
    with pytest.raises(SystemExit, match="--ledger --profile full: it would replace"):
        run_report.main(["--ledger", "--profile", "full"])


def test_parallel_jobs_take_one_card_each_and_the_ledger_runs_last(tmp_path, monkeypatch):
    """``--jobs N`` (CUDA only) runs N notebooks at once, each in its own process with its own
    ``CUDA_VISIBLE_DEVICES``, and 07 (it reads the others' results) after all of them; on a CPU,
    or with more jobs than cards, it stops before any notebook runs."""
    import threading

    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match="--jobs 2 with --device cpu"):
        run_report.check_jobs(_args(jobs=2))
    with pytest.raises(SystemExit, match="--jobs 3: this machine has 2 CUDA"):
        run_report.check_jobs(_args(jobs=3, device="cuda"))
    run_report.check_jobs(_args(jobs=2, device="cuda"))
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    events, busy, lock = [], set(), threading.Lock()

    def launch(cmd, env, log):
        nb, card = cmd[cmd.index("--only") + 1], env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert card not in busy, "two jobs on one card"
            busy.add(card)
            events.append(("start", nb, card))
        time.sleep(0.05)
        with lock:
            busy.discard(card)
            events.append(("end", nb, card))
        assert cmd[cmd.index("--jobs") + 1] == "1" and "--no-summary" in cmd and "--ledger" in cmd
        assert cmd[cmd.index("--forward-s-per-token") + 1] == "0.003"   # the parent's rate, for the stamp
        return 1 if nb.startswith("03") else 0

    failed = run_report.run_jobs(_args(jobs=2, device="cuda", ledger=True, model="org/m"), notebooks, tmp_path, launch,
                                 forward_s_per_token=0.003)
    assert failed == ["03_position_order_ppl"]
    starts = [e for e in events if e[0] == "start"]
    assert sorted(e[1] for e in starts) == [nb.stem for nb in notebooks] and {e[2] for e in starts} == {"0", "1"}
    last_other_end = max(i for i, e in enumerate(events) if e[0] == "end" and not e[1].startswith("07"))
    assert events.index(next(e for e in starts if e[1].startswith("07"))) > last_other_end
    concurrent = max(sum(1 for e in events[:i + 1] if e[0] == "start") - sum(1 for e in events[:i + 1] if e[0] == "end")
                     for i in range(len(events)))
    assert concurrent == 2


def test_check_results_names_each_stale_record_and_the_probe_that_moved(tmp_path, capsys):
    """`make check-results`: 0 while every record's behavioural identity is what today's code
    computes; 1 naming the record and the probe once one moved; records without one are listed."""
    import check_results

    source = ROOT / "data" / "results" / "01_norm_distributions" / "full.json"
    target = tmp_path / "01_norm_distributions" / "full.json"
    target.parent.mkdir()
    target.write_text(source.read_text())
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench.json").write_text('{"what": "a timing"}')
    assert check_results.main(["--results", str(tmp_path)]) == 0
    assert "1/1 records valid" in capsys.readouterr().out
    record = json.loads(target.read_text())
    record["identity"]["behaviour"]["norm_distributions.analyses"]["sink_ratio"] = "moved"
    runtime.write_json_atomic(target, record)
    assert check_results.main(["--results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "STALE 01_norm_distributions/full.json: norm_distributions.analyses" in out
    assert "0/1 records valid" in out and "benchmarks/bench.json" in out


def test_the_report_index_links_what_ran_and_names_what_was_skipped(tmp_path):
    """On a fresh clone nothing runs: the index says so and names the notebooks skipped as unchanged."""
    run_report.write_html(tmp_path / "executed", tmp_path / "html", ["01_norm_distributions", "02_attention_correlation"])
    index = (tmp_path / "html" / "index.html").read_text()
    assert "No executed notebook here yet" in index and "01_norm_distributions, 02_attention_correlation" in index
    assert "make report FORCE=1" in index


def test_the_verdict_matrix_figure_is_written_from_the_ledgers(tmp_path, monkeypatch):
    """render_report writes README's top figure from the committed ledger and every other one
    recorded under the same rules, atomically (no temporary file left), and README links it."""
    record = render_report.load("07_paper_claims", "full")
    monkeypatch.setattr(render_report, "VERDICT_MATRIX", tmp_path / "figures" / "verdict_matrix.png")
    path = render_report.write_verdict_matrix(record)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in path.parent.iterdir()] == [path.name]
    assert "](figures/verdict_matrix.png)" in (ROOT / "README.md").read_text()


def test_only_the_embedded_models_report_shows_the_explorer_screenshot():
    """figures/explore.png is the browser test's shot of the embedded model's explorer: another
    model's 00 section does not link it as its own."""
    import knorm_lib as kl

    own = render_report.load("00_explore", "full")
    other = render_report.load("00_explore", "full", kl.EMBEDDED_MODELS[1])
    assert "](figures/explore.png)" in render_report.section_00(own)[0]
    assert "explore.png" not in render_report.section_00(other)[0]


def test_other_embedded_models_add_their_findings_only_where_recorded(tmp_path, monkeypatch):
    """README's findings gain the other embedded models' lines from the records they have (02's
    QK-norm and per-layer-type lines, 03's position-bug line, naming the model), and nothing where
    a model has none."""
    import knorm_lib as kl

    monkeypatch.setattr(render_report, "RESULTS", tmp_path)
    assert render_report.other_models_headlines() == ""
    short = kl.EMBEDDED_MODELS[1]
    for notebook in ("02_attention_correlation", "03_position_order_ppl"):
        target = tmp_path / notebook / short / "full.json"
        target.parent.mkdir(parents=True)
        target.write_text((ROOT / "data" / "results" / notebook / short / "full.json").read_text())
    text = render_report.other_models_headlines()
    assert text.count(f"({short},") == 2 and text.count(f"On {short} (prefill protocol") == 1
    assert "norm–attention link under QK-norm" in text and "perplexity jump is a position bug" in text
    assert "beat random eviction on each layer type" in text
    assert "Passkey retrieval" not in text and "Does KnormPress beat random" not in text
    assert "KnormPress with true positions" not in text   # 03's line that does not name its model


def test_a_cell_may_run_three_times_its_notebooks_estimate():
    """The per-cell timeout is the profile's, or three times the whole notebook's estimate where that
    is longer (a slow model's long cell is not a hang); without an estimate, the profile's."""
    import notebook_runner as runner

    assert run_report.cell_timeout("full", None) == runner.CELL_TIMEOUT_S["full"]
    assert run_report.cell_timeout("full", 100.0) == runner.CELL_TIMEOUT_S["full"]
    assert run_report.cell_timeout("full", 4440.0) == 3 * 4440 > runner.CELL_TIMEOUT_S["full"]
    assert run_report.cell_timeout("quick", 30.0) == runner.CELL_TIMEOUT_S["quick"]
