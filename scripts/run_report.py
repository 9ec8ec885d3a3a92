"""`make report`: run every study notebook headless with papermill, resumably.

For each ``notebooks/NN_*.ipynb`` in order: skip it when its inputs (the notebook, knorm_lib.py,
the knorm_study modules it imports, the notebook runner, data/manifest.json, the corpora's bytes,
requirements.txt and the profile) hash the same as at its last successful run and its results file records the profile's default
parameters; otherwise execute it in the project's kernel (``notebook_runner``: a per-cell timeout,
one retry for a timeout, papermill's cell progress on screen), with the executed copy written to
``build/notebooks/<profile>/``. This is the only writer of the committed ``data/results/`` and (full
profile) ``figures/``. A failing notebook is reported with its failing cell and the run exits
non-zero; every finished notebook keeps its (atomically written) results. At the end, the results
are compared field by field with the committed ones (``compare_results.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from knorm_study import runtime  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"
HASHED_INPUTS = ("knorm_lib.py", "knorm_study/__init__.py", "knorm_study/runtime.py", "scripts/notebook_runner.py",
                 "data/manifest.json", "requirements.txt")
RESULTS = ROOT / "data" / "results"
_STUDY_IMPORT = re.compile(r"from\s+knorm_study\s+import[ \t]+([\w \t,]+)|knorm_study\.(\w+)|from\s+knorm_study\.(\w+)\s+import")


def study_modules(source: str) -> set[str]:
    """The knorm_study modules ``source`` imports, and those they import in turn."""
    found: set[str] = set()
    todo = [source]
    while todo:
        for names, dotted, from_dotted in _STUDY_IMPORT.findall(todo.pop()):
            for name in [n.strip() for n in names.split(",") if n.strip()] + [dotted, from_dotted]:
                path = ROOT / "knorm_study" / f"{name}.py"
                if name and name not in found and path.exists():
                    found.add(name)
                    todo.append(path.read_text(encoding="utf-8"))
    return found


def notebook_inputs(notebook: Path, profile: str) -> list[Path]:
    """What a notebook's results depend on: itself, the core and the runner, the study modules it
    imports (so a change to the speed probes reruns 06 only), the data manifest and the pins; for
    the claims ledger also the recorded results it reads (so it reruns after any of them)."""
    import nbformat

    code = "\n".join(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    modules = sorted(study_modules(code) - {"runtime"})
    read = []
    if "claims" in modules:
        from knorm_study import claims

        read = [RESULTS / nb / f"{profile}.json" for nb in claims.SOURCES.values()]
    return [notebook, *(ROOT / p for p in HASHED_INPUTS), *(ROOT / "knorm_study" / f"{m}.py" for m in modules), *read]


def input_hash(notebook: Path, profile: str) -> str:
    """The notebook's inputs (``notebook_inputs``), the corpora's bytes included (a damaged corpus
    is never "unchanged")."""
    import knorm_lib as kl

    h = hashlib.sha256(profile.encode())
    for path in notebook_inputs(notebook, profile):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    for name in kl.CORPORA:
        h.update(kl.verified_corpus_path(name).name.encode())
        h.update(kl.file_sha256(kl.verified_corpus_path(name)).encode())
    return h.hexdigest()


def recorded_defaults(results: Path, profile: str) -> bool:
    """The results file exists and records a run of ``profile`` with the notebook's defaults."""
    if not results.exists():
        return False
    res = json.loads(results.read_text(encoding="utf-8"))
    return res.get("profile") == profile and res.get("parameters", {}).get("profile") == profile


def write_html(executed_dir: Path, html_dir: Path) -> None:
    """An HTML page per executed notebook (code folded away) and an index linking them."""
    import nbformat
    from nbconvert import HTMLExporter

    html_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True)
    links = []
    for nb_path in sorted(executed_dir.glob("*.ipynb")):
        body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
        target = html_dir / f"{nb_path.stem}.html"
        runtime.write_text_atomic(target, body)
        links.append(f'<li><a href="{target.name}">{nb_path.stem}</a></li>')
    (html_dir / "index.html").write_text("<html><body><h1>knorm-study: executed notebooks</h1><ul>"
                                         + "".join(links) + "</ul></body></html>\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", choices=list(runtime.PROFILES))
    ap.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    ap.add_argument("--force", action="store_true", help="rerun even when inputs are unchanged")
    args = ap.parse_args()

    import notebook_runner as runner

    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(p) for p in args.only)]
    out_dir = BUILD / "notebooks" / args.profile
    stamp_dir = BUILD / "stamps" / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_dir.mkdir(parents=True, exist_ok=True)
    figures = runtime.report_figures_dir(args.profile)
    t_start = time.time()
    failures = []
    for i, nb in enumerate(notebooks, 1):
        digest = input_hash(nb, args.profile)
        stamp = stamp_dir / f"{nb.stem}.json"
        results = RESULTS / nb.stem / f"{args.profile}.json"
        prefix = f"[{i}/{len(notebooks)}] {nb.stem} ({args.profile})"
        if not args.force and stamp.exists() and recorded_defaults(results, args.profile) \
                and json.loads(stamp.read_text())["hash"] == digest:
            print(f"{prefix}: unchanged, skipped", flush=True)
            continue
        print(f"{prefix}: running (elapsed so far {time.time() - t_start:.0f} s) ...", flush=True)
        t0 = time.time()
        try:
            runner.execute(nb, out_dir / nb.name, {"profile": args.profile}, progress=True,
                           results_dir=RESULTS, figures_dir=figures)
        except runner.NotebookFailed as exc:   # report it with its cell, keep going
            failures.append(nb.stem)
            print(f"{prefix}: FAILED after {time.time() - t0:.0f} s: {exc}\n"
                  f"    executed copy: {out_dir / nb.name}", flush=True)
            continue
        if not results.exists():
            failures.append(nb.stem)
            print(f"{prefix}: FAILED: it did not record {results.relative_to(ROOT)}", flush=True)
            continue
        runtime.write_json_atomic(stamp, {"hash": digest, "seconds": time.time() - t0})
        print(f"{prefix}: done in {time.time() - t0:.0f} s", flush=True)
    write_html(out_dir, BUILD / "html" / args.profile)
    print(f"report ({args.profile}): {len(notebooks) - len(failures)}/{len(notebooks)} notebooks ok "
          f"in {time.time() - t_start:.0f} s; HTML: {(BUILD / 'html' / args.profile).relative_to(ROOT)}/index.html",
          flush=True)
    import compare_results

    compare_results.main(["--profile", args.profile])
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
