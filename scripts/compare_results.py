"""Compare a run's results with the committed ones, field by field.

``python scripts/compare_results.py`` compares ``data/results/*/<profile>.json`` in the working
tree with the same files at ``HEAD`` (what is committed); ``--reference DIR`` compares with
another results directory instead (e.g. a fresh clone's). Every numeric leaf is compared as a
relative difference ``|a - b| / max(|a|, |b|)`` and sorted into a family by its name:

* ``ppl`` (perplexity, NLL, their ratios), ``kl``, ``accuracy`` (accuracy, agreement, correct,
  retrieval): what "behaviour unchanged" means; ``--check`` fails when one differs by more than
  ``--tolerance`` (default 1e-4), or when a committed field is missing from the run (fields only
  in the run are new numbers: counted, never a reproduction failure).
* ``timing`` (seconds, rates, memory, speedups; all of 06 but its exact byte counts): expected to
  move from run to run, shown for information.
* ``other``: the rest (configurations, counts, correlations, norms).

Prints, per notebook and family, the number of fields compared, how many differ at all, and the
largest relative difference with its path. Recorded provenance (identity, machine, timestamps)
is not compared.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "data" / "results"
CHECKED = ("ppl", "kl", "accuracy")
_TIMING = re.compile(r"(_s$|_s_|second|time|speed|tpot|ttft|per_s|bandwidth|flop|overhead|memory|_mb$|rss|peak|"
                     r"cold|warm|fake_change|measured_over|intercept|share|token_ceiling|ratio_sweep|^ratio$)", re.I)
_PPL = re.compile(r"(ppl|nll|perplexity|inflation)", re.I)
_KL = re.compile(r"(^|_)kl($|_)", re.I)
_ACC = re.compile(r"(acc|agree|correct|retriev|matching_prefix|verdict|^lo$|^hi$)", re.I)
_EXACT_06 = re.compile(r"(kv_bytes|n_params|weight_bytes|n_kept|context|keep_ratio|n_bytes)", re.I)
SKIP_TOP = {"identity", "machine", "recorded_at"}


def family(notebook: str, path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    parts = path.split("/")
    if any(_TIMING.search(p) for p in parts) or (notebook.startswith("06") and not _EXACT_06.search(name)):
        return "timing"
    for fam, rx in (("ppl", _PPL), ("kl", _KL), ("accuracy", _ACC)):
        if any(rx.search(p) for p in parts[-2:]):
            return fam
    return "other"


def leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if path == "" and k in SKIP_TOP:
                continue
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def rel_diff(a: Any, b: Any) -> float:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return 0.0 if a == b else float("inf")
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def committed(rel_path: str, rev: str) -> dict | None:
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel_path}"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def compare(run: dict, ref: dict, notebook: str) -> dict[str, dict[str, Any]]:
    a, b = dict(leaves(run)), dict(leaves(ref))
    fams: dict[str, dict[str, Any]] = {}
    for path in sorted(a.keys() | b.keys()):
        fam = family(notebook, path)
        f = fams.setdefault(fam, {"n": 0, "n_differ": 0, "missing": 0, "added": 0, "max_rel": 0.0, "where": ""})
        if path not in b:    # a number the committed run did not have: new, nothing to reproduce
            f["added"] += 1
            continue
        if path not in a:    # a committed number the run did not reproduce
            f["missing"] += 1
            continue
        f["n"] += 1
        d = rel_diff(a[path], b[path])
        if d > 0:
            f["n_differ"] += 1
        if d > f["max_rel"]:
            f["max_rel"], f["where"] = d, f"{path} ({b[path]!r} -> {a[path]!r})"
    return fams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--run", type=Path, default=RESULTS, help="results directory of the run (default data/results)")
    ap.add_argument("--reference", type=Path, help="a results directory to compare with (default: git --rev)")
    ap.add_argument("--rev", default="HEAD", help="the committed revision to compare with (default HEAD)")
    ap.add_argument("--slug", help="another model's results (<run>/<notebook>/<slug>/<profile>.json)")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--check", action="store_true", help="exit 1 when a ppl/kl/accuracy field differs beyond tolerance")
    args = ap.parse_args(argv)
    if not args.run.is_dir():
        ap.error(f"--run {args.run}: no such directory")
    if args.reference is not None and not args.reference.is_dir():
        ap.error(f"--reference {args.reference}: no such directory")
    against = str(args.reference) if args.reference else f"git {args.rev}"
    print(f"results comparison ({args.profile}): {args.run} against {against}; "
          f"relative differences, checked families {CHECKED} at tolerance {args.tolerance:g}")
    worst: dict[str, float] = {}
    bad = []
    sub = f"{args.slug}/" if args.slug else ""
    files = sorted(args.run.glob(f"*/{sub}{args.profile}.json"))
    if not files:
        print(f"  no results of profile {args.profile!r} under {args.run}")
        return 1 if args.check else 0
    for path in files:
        notebook = (path.parent.parent if args.slug else path.parent).name
        if args.reference is not None:
            ref_path = args.reference / notebook / sub / path.name
            ref = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.exists() else None
        else:
            ref = committed(f"data/results/{notebook}/{sub}{path.name}", args.rev)
        if ref is None:
            print(f"  {notebook}: nothing to compare with (new)")
            continue
        for fam, f in sorted(compare(json.loads(path.read_text(encoding="utf-8")), ref, notebook).items()):
            worst[fam] = max(worst.get(fam, 0.0), f["max_rel"] if f["missing"] == 0 else float("inf"))
            flag = ""
            if fam in CHECKED and (f["max_rel"] > args.tolerance or f["missing"]):
                flag = "  <-- beyond tolerance" if not f["missing"] else "  <-- committed fields missing from the run"
                bad.append(f"{notebook}/{fam}")
            print(f"  {notebook:26s} {fam:9s} {f['n']:6d} fields, {f['n_differ']:5d} differ, "
                  f"{f['missing']} missing, {f['added']} new, max {f['max_rel']:.2e}{flag}"
                  + (f"\n      at {f['where'][:160]}" if f["max_rel"] > 0 else ""))
    print("summary, largest relative difference by family: "
          + ", ".join(f"{fam} {v:.2e}" for fam, v in sorted(worst.items())))
    if bad:
        print(f"beyond tolerance: {', '.join(bad)}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
