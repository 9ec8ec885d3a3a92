"""The behavioural identity (knorm_study/fingerprint.py): it catches what it must and nothing else.

* Mutation testing: each one-line mutation in tests/fingerprint_mutations*.py, applied alone to a
  copy of the code, must move a probe of the mutated module, which flags every unit (notebook or
  recording script) importing that module; each refactor there must move no probe at all. Every
  copy runs in its own process (``python -m knorm_study.fingerprint``), forked from one of two
  servers that imported torch and transformers once (tests/fingerprint_worker.py).
* Host rounding stays far below the tolerance: the probes computed with another host's kernels
  differ by less than ``RTOL / 1000`` (float64) and ``FLOAT32_RTOL / 10``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fingerprint_mutations import ALL_MUTATIONS as MUTATIONS
from fingerprint_mutations import ALL_REFACTORS as REFACTORS
from fingerprint_mutations import Edit
from knorm_study import fingerprint

ROOT = Path(__file__).resolve().parents[2]
UNITS = [*sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), *fingerprint.RECORDING_SCRIPTS]
WORKERS = 2


def _copy_with(edits: tuple[Edit, ...], dest: Path) -> Path:
    """The project's code (knorm_lib/, knorm_study/, notebooks/, scripts/) under ``dest`` with
    ``edits`` applied; data/ stays where it is (``KNORM_DATA_DIR``)."""
    for folder in ("knorm_lib", "knorm_study", "notebooks", "scripts"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for edit in edits:
        path = dest / edit.file
        if not edit.old:
            assert not path.exists(), f"{edit.file}: a new file would replace one"
            path.write_text(edit.new)
            continue
        text = path.read_text()
        assert text.count(edit.old) == edit.count, f"{edit.file}: {edit.old!r} occurs {text.count(edit.old)} times, not {edit.count}"
        path.write_text(text.replace(edit.old, edit.new))
    return dest


def _probes_of(code: Path, modules: list[str] | None, until_moved: Path | None = None) -> dict:
    """The probes' numbers computed by the code under ``code`` in its own process (``until_moved``:
    up to the first that differs from that file's)."""
    cmd = [sys.executable, "-m", "knorm_study.fingerprint"] + (["--modules", *modules] if modules else []) \
        + (["--until-moved", str(until_moved)] if until_moved else [])
    env = {**os.environ, "KNORM_DATA_DIR": str(ROOT / "data"), "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _moved(base: dict, now: dict) -> list[str]:
    return sorted(n for n in base if fingerprint._differences(base[n], now.get(n), fingerprint.tolerance(n)))


def flagged_units(moved_probes: list[str]) -> list[str]:
    """The units whose fingerprint holds one of ``moved_probes``."""
    return [u for u in UNITS if set(fingerprint.unit_probes(u)) & set(moved_probes)]


@pytest.fixture(scope="module")
def baseline():
    """Every probe's numbers from the unmutated code, in a process like the mutants'."""
    return _probes_of(ROOT, None)


class _Server:
    """A ``fingerprint_worker`` process: ``probes(code, args)`` runs the fingerprint CLI on a copy."""

    def __init__(self, tmp: Path):
        env = {**os.environ, "KNORM_DATA_DIR": str(ROOT / "data"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fingerprint_worker.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp)
        assert self.proc.stdout.readline().strip() == "ready"
        self.out = tmp / f"out-{id(self)}.json"

    def probes(self, code: Path, args: list[str]) -> dict:
        self.proc.stdin.write(json.dumps({"code": str(code), "args": args, "out": str(self.out)}) + "\n")
        self.proc.stdin.flush()
        status = self.proc.stdout.readline().strip()
        assert status == "0", f"the fingerprint of {code} failed (exit {status})"
        return json.loads(self.out.read_text().strip().splitlines()[-1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def test_mutations_are_caught_and_refactors_pass(baseline, tmp_path, capsys):
    import queue

    base_file = tmp_path / "baseline.json"
    base_file.write_text(json.dumps(baseline))
    servers: queue.Queue[_Server] = queue.Queue()
    for _ in range(WORKERS):
        servers.put(_Server(tmp_path))

    def run(i_job):
        i, job = i_job
        dest = tmp_path / f"copy{i}"
        dest.mkdir()
        server = servers.get()
        try:
            if hasattr(job, "edit"):   # a mutation: its module's probes must move
                now = server.probes(_copy_with((job.edit,), dest), ["--modules", job.module, "--until-moved", str(base_file)])
            else:                      # a refactor: no probe may move
                now = server.probes(_copy_with(job.edits, dest), ["--until-moved", str(base_file)])
                assert set(now) <= set(baseline)
        finally:
            servers.put(server)
        shutil.rmtree(dest)
        return job, _moved({n: v for n, v in baseline.items() if n in now}, now)

    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(run, enumerate([*MUTATIONS, *REFACTORS])))
    finally:
        while not servers.empty():
            servers.get().close()
    lines, missed, false_alarms = [], [], []
    for job, moved in results:
        if hasattr(job, "edit"):
            expected = [u for u in UNITS if job.module in fingerprint.unit_modules(u)]
            flagged = flagged_units(moved)
            caught = bool(moved) and set(expected) <= set(flagged)
            lines.append(f"{'caught' if caught else 'MISSED'} | {job.edit.file} | {job.what} | "
                         f"{', '.join(u[:2] if u[0].isdigit() else u for u in flagged) or '-'} | {', '.join(moved[:3])}")
            if not caught:
                missed.append(job.what)
        else:
            lines.append(f"{'passed' if not moved else 'FLAGGED'} | refactor | {job.what} | {', '.join(moved) or '-'}")
            if moved:
                false_alarms.append(job.what)
    n_mut, n_ref = len(MUTATIONS), len(REFACTORS)
    score = f"score: mutations caught {n_mut - len(missed)}/{n_mut}, refactors passed {n_ref - len(false_alarms)}/{n_ref}"
    print("\n".join(["", "result | where | mutation | units flagged | probes moved", *lines, score]))
    with capsys.disabled():   # on screen in `make test` too
        print(f"\nmutation test: {score}")
    assert n_mut >= 25 and n_ref >= 6
    assert not missed, f"mutations no probe caught: {missed}"
    assert not false_alarms, f"refactors flagged: {false_alarms}"


def test_host_rounding_stays_far_below_the_tolerance(baseline, capsys):
    """Another host's kernels (torch's unvectorised CPU kernels, MKL limited to SSE4.2, two threads:
    other reduction orders) move every float64 probe by less than RTOL / 1000 and every float32
    one by less than FLOAT32_RTOL / 10, on the tolerance's scale (``max_scaled_difference``)."""
    env = {**os.environ, "KNORM_DATA_DIR": str(ROOT / "data"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    out = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(2); "
                          "from knorm_study import fingerprint; fingerprint.main()"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert not _moved(baseline, other)
    worst = {n: fingerprint.max_scaled_difference(baseline[n], other[n]) for n in baseline}
    f64 = {n: w for n, w in worst.items() if fingerprint.tolerance(n) == fingerprint.RTOL}
    f32 = {n: w for n, w in worst.items() if fingerprint.tolerance(n) != fingerprint.RTOL}
    with capsys.disabled():
        print(f"\nanother host's kernels: float64 probes {max(f64.values()):.1e} ({max(f64, key=f64.get)}), "
              f"float32 probes {max(f32.values()):.1e} ({max(f32, key=f32.get)})")
    assert max(f64.values()) < fingerprint.RTOL / 1000
    assert max(f32.values()) < fingerprint.FLOAT32_RTOL / 10


def test_a_record_answers_for_the_probes_it_holds():
    """A probe added after a record was made does not make it stale (it was written for code the
    record did not run); a probe it holds that moved, or that is no longer the unit's, does."""
    unit = "01_norm_distributions"
    recorded = fingerprint.of_unit(unit)
    assert not fingerprint.moved(recorded, unit)
    older = {n: v for n, v in recorded.items() if n != "knorm_lib.prenorm_policy"}
    assert len(older) == len(recorded) - 1 and not fingerprint.moved(older, unit)
    assert list(fingerprint.moved({**recorded, "attention.gone": {}}, unit)) == ["attention.gone"]
    changed = json.loads(json.dumps(recorded))
    changed["knorm_lib.ties_and_budgets"]["n_kept"][0] += 1
    assert list(fingerprint.moved(changed, unit)) == ["knorm_lib.ties_and_budgets"]
    assert fingerprint.moved(None, unit)   # no identity at all
