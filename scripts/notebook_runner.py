"""Headless notebook execution for `make report`, the tests and the benchmarks: one place for the
rules every papermill call follows.

* Every cell runs under a per-cell execution timeout sized to the profile (``CELL_TIMEOUT_S``).
* A run that times out is retried once; a second timeout raises ``NotebookTimeout`` naming the
  notebook and the cell (its index and first line), never a silent hang.
* A cell that fails raises ``NotebookFailed`` naming the notebook, the cell and the error.
* ``results_dir`` / ``figures_dir`` go to the kernel as ``KNORM_RESULTS_DIR`` / ``KNORM_FIGURES_DIR``
  (see knorm_lib: only `make report` points them at the committed data/results/ and figures/).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "knorm-study"
# Far above any cell of the profile on a quiet 2-core machine (quick cells take seconds to about a
# minute, full ones up to ~12 minutes), so only a blocked or pathologically contended cell hits it.
CELL_TIMEOUT_S = {"quick": 600, "full": 2400, "paper": 14400}


class NotebookFailed(RuntimeError):
    """A cell raised an error."""


class NotebookTimeout(NotebookFailed):
    """A cell ran past its execution timeout on every try."""


def _last_started_cell(executed: Path) -> str:
    """Index and first line of the last cell papermill started, read from the executed copy
    (indices count papermill's injected-parameters cell)."""
    import nbformat

    try:
        cells = nbformat.read(executed, as_version=4).cells
    except (OSError, ValueError):
        return "an unknown cell"
    started = [i for i, c in enumerate(cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not started:
        return "an unknown cell"
    i = started[-1]
    first = next((line for line in cells[i].source.splitlines() if line.strip()), "")
    return f"cell {i} ({first[:60]!r})"


def execute(notebook: Path, output: Path, parameters: dict[str, Any], *, profile: str | None = None,
            cell_timeout_s: int | None = None, retries: int = 1, progress: bool = False,
            results_dir: Path | None = None, figures_dir: Path | None = None) -> float:
    """Run ``notebook`` headless into ``output``; return the seconds it took (the successful try).

    ``cell_timeout_s`` defaults to the profile's (``parameters["profile"]`` unless ``profile``)."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    profile = profile or parameters.get("profile", "full")
    # an unknown profile gets the longest timeout: the notebook itself rejects it, naming it
    timeout = cell_timeout_s or CELL_TIMEOUT_S.get(profile, max(CELL_TIMEOUT_S.values()))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if results_dir is not None:
        env["KNORM_RESULTS_DIR"] = str(results_dir)
    if figures_dir is not None:
        env["KNORM_FIGURES_DIR"] = str(figures_dir)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # the kernel inherits this process's environment
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in range(retries + 1):
            t0 = time.perf_counter()
            try:
                pm.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=KERNEL,
                                    cwd=str(notebook.parent), progress_bar=progress, log_output=False,
                                    execution_timeout=timeout,
                                    # the kernel's "running over TCP without encryption" warning says
                                    # nothing about the run; its errors still reach the screen
                                    extra_arguments=["--IPKernelApp.log_level=ERROR"])
                return time.perf_counter() - t0
            except (CellTimeoutError, TimeoutError) as err:
                where = _last_started_cell(output)
                if attempt < retries:
                    print(f"{notebook.stem}: {where} ran past {timeout} s; retrying the notebook once", flush=True)
                    continue
                raise NotebookTimeout(f"{notebook.stem}: {where} ran past its {timeout} s execution timeout "
                                      f"on {retries + 1} tries ({err})") from err
            except pm.PapermillExecutionError as err:
                where = _last_started_cell(output)
                raise NotebookFailed(f"{notebook.stem}: {where} failed: {err.ename}: {err.evalue}") from err
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    raise AssertionError("unreachable")
