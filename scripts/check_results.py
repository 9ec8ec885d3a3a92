"""`make check-results`: is every committed record still what today's code computes?

For each record under ``data/results/`` that carries a behavioural identity (the study notebooks'
and the recording scripts' records, every model and profile), recompute the probes of the modules
its unit imports (``knorm_study.fingerprint``) and compare them with the record's. Exit 0 when all
are valid; otherwise exit 1, naming each stale record and the probes that moved. Records without
an identity (benchmark lines, the browser test's latencies) are listed as not covered.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from knorm_study import fingerprint  # noqa: E402

RESULTS = Path(os.environ.get("KNORM_RESULTS_DIR", ROOT / "data" / "results")).resolve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default data/results)")
    args = ap.parse_args(argv)
    t0, stale, checked, uncovered = time.time(), [], 0, []
    for path in sorted(args.results.glob("**/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        shown = path.relative_to(args.results)
        if not isinstance(record, dict) or "behaviour" not in record.get("identity", {}):
            uncovered.append(str(shown))
            continue
        checked += 1
        moved = fingerprint.moved(record["identity"]["behaviour"], record["notebook"])
        if moved:
            stale.append(shown)
            print(f"STALE {shown}: {fingerprint.describe(moved)}", flush=True)
    print(f"{checked - len(stale)}/{checked} records valid ({time.time() - t0:.1f} s); no behavioural identity "
          f"(not checked): {', '.join(uncovered) or 'none'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
