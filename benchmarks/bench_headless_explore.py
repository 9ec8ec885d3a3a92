"""Headless reliability of the interactive explorer: run 00_explore under papermill N times in a
row (quick profile, fresh kernel each time) and count the runs that hang.

A hang is a cell that runs past ``--cell-timeout`` seconds: the explorer's cells take a few
seconds here, so a cell still waiting after that long is the nbclient/ipywidgets block (nbclient
issue #312), not slow work. No retry: every hang counts. Bar (issue 12): 0 hangs in 30 runs.
``--notebook`` runs another copy (e.g. an older version, to show the harness catches the block).
Prints one JSON line: what, config, numbers, machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from knorm_study import runtime  # noqa: E402
import notebook_runner as runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cell-timeout", type=int, default=120)
    ap.add_argument("--notebook", type=Path, default=ROOT / "notebooks" / "00_explore.ipynb")
    ap.add_argument("--no-record", action="store_true", help="print the line only")
    args = ap.parse_args()
    if args.runs < 1 or args.cell_timeout < 1:
        ap.error("--runs and --cell-timeout must be positive")
    if not args.notebook.is_file():
        ap.error(f"--notebook {args.notebook}: no such file")
    seconds, hangs, failures = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            t0 = time.perf_counter()
            try:
                seconds.append(runner.execute(args.notebook, Path(tmp) / f"run{i}.ipynb", {"profile": "quick"},
                                              cell_timeout_s=args.cell_timeout, retries=0,
                                              results_dir=Path(tmp) / "results"))
                status = "ok"
            except runner.NotebookTimeout as err:
                hangs.append(i)
                status = f"HANG: {err}".splitlines()[0]
            except runner.NotebookFailed as err:
                failures.append(i)
                status = f"FAILED: {err}".splitlines()[0]
            print(f"run {i + 1}/{args.runs}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    line = {
        "what": "headless papermill runs of the explorer notebook that hang (a cell past the timeout)",
        "config": {"notebook": str(args.notebook.relative_to(ROOT) if args.notebook.is_relative_to(ROOT)
                                   else args.notebook), "profile": "quick", "runs": args.runs,
                   "cell_timeout_s": args.cell_timeout, "retries": 0},
        "numbers": {"hangs": len(hangs), "hang_runs": hangs, "failures": len(failures), "completed": len(seconds),
                    "seconds_median": statistics.median(seconds) if seconds else None,
                    "seconds_min": min(seconds, default=None), "seconds_max": max(seconds, default=None),
                    "bar_hangs": 0, "meets_bar": not hangs and not failures},
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    if not args.no_record:
        runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / f"{Path(__file__).stem}.json", line)
    sys.exit(1 if hangs or failures else 0)


if __name__ == "__main__":
    main()
