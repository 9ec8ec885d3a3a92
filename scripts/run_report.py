"""`make report`: run every study notebook headless with papermill, resumably, on any model.

For each ``notebooks/NN_*.ipynb`` in order: skip it when its inputs (the notebook, the notebook
runner by its code, data/manifest.json, the corpora's bytes, requirements.txt, the profile and the
model, device and dtype) hash the same as at its last successful run, its results file records the
profile's default parameters, and the library code still computes what that record's behavioural
identity holds (``knorm_study.fingerprint``: the probes of knorm_lib and of every knorm_study
module it imports, within their tolerance; a refactor reruns nothing, a change to what the code
computes reruns the notebooks whose probes moved). That run's stamp is committed beside the
results (``data/stamps/``), so a fresh clone reruns only what an edit changed, not the whole
profile; ``--force`` (``make report FORCE=1``) reruns everything; otherwise execute
it in the project's kernel (``notebook_runner``: a per-cell timeout, one retry for a timeout,
papermill's cell progress on screen), with the executed copy written to
``build/notebooks/[<slug>/]<profile>/``. This is the only writer of the committed ``data/results/``
and (full profile) ``figures/``. A failing notebook is reported with its failing cell and the run
exits non-zero; every finished notebook keeps its (atomically written) results. At the end, the
results are compared field by field with the committed ones (``compare_results.py``) and the
report is rendered (``render_report.py``).

``--model`` (a Hugging Face id or local path), ``--device`` and ``--dtype`` run the same notebooks
on another model: its results, figures, stamps and executed notebooks go under its slug
(``runtime.model_slug``: the embedded model's own committed paths are only ever written by the
embedded model in float32 on a CPU), its report to ``reports/<slug>/REPORT-<profile>.md``. Before
any notebook runs: the profile must be one every notebook knows, the device must be there, and
the model must exist and be supported (its config is checked without loading weights); then one
forward is timed and the profile's estimated time printed (``estimate``: from each notebook's last
stamped run where there is one; for the embedded model too, and beside each notebook's measured
time); a CPU ``paper`` run estimated over an hour needs ``--yes``.

``--ledger`` runs only what the claims ledger reads (02, 04 and 07 with the variants its rows use:
``LEDGER_PARAMETERS``), so the paper profile's ledger fits a CPU session. ``--jobs N`` (CUDA only)
runs N notebooks at once, each in its own process on its own card, 07 after the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from knorm_study import runtime  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"
# the library code (knorm_lib/, knorm_study/) is not hashed: the records' behavioural identity covers it
HASHED_INPUTS = ("scripts/notebook_runner.py", "data/manifest.json", "requirements.txt")
# ... and, for a run on the embedded Gemma (``--model gemma-3-270m``), its own data manifest (only
# there: the embedded SmolLM2's stamps keep the inputs they had)
MODEL_MANIFESTS = {"gemma-3-270m": "data/manifest-gemma-3-270m.json"}
# the committed results (KNORM_RESULTS_DIR elsewhere: what the tests use)
RESULTS = Path(os.environ.get("KNORM_RESULTS_DIR", ROOT / "data" / "results")).resolve()
# `--ledger`: only the notebooks and variants the claims ledger (07) reads, so a paper-scale ledger
# fits a CPU session; the records say so (their parameters) and 07 and REPORT label the column.
LEDGER_PARAMETERS: dict[str, dict[str, Any]] = {
    "02": dict(policies=["knorm", "sink_random", "streaming"]),
    "04": dict(policies=["knorm", "random", "high_norm"], streaming_policies=["knorm"], knorm_all_layers=False,
               keep_ratios=[1.0, 0.5], schedule_keep_ratios=[0.5], recent_window=0),
    "07": {}}


def _shown(path: Path) -> str:
    """``path`` relative to the project when it lies inside it (results may live elsewhere)."""
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def model_manifest(model_name: str | None) -> Path | None:
    """The data manifest of the embedded model ``model_name`` names (its short name or its folder),
    if it has one of its own (``MODEL_MANIFESTS``)."""
    import knorm_lib as kl

    if model_name is None:
        return None
    for short, manifest in MODEL_MANIFESTS.items():
        folder = kl.embedded_model_dir(short)
        name = str(model_name)
        if name == short or (kl._looks_like_path(name) and Path(name).expanduser().resolve() == folder.resolve()):
            return ROOT / manifest
    return None


def notebook_inputs(notebook: Path, profile: str, slug: str | None = None, model_name: str | None = None) -> list[Path]:
    """What a notebook's results depend on besides the library code: itself, the runner, the data
    manifest and the pins (and the manifest of the embedded model ``model_name`` names, where it
    has its own: ``model_manifest``); for the claims ledger also the recorded results it reads (so
    it reruns after any of them)."""
    import nbformat

    from knorm_study import fingerprint

    code = "\n".join(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    read = []
    if "claims" in fingerprint.study_modules(code):
        from knorm_study import claims

        read = [RESULTS / nb / (slug or "") / f"{profile}.json" for nb in claims.SOURCES.values()]
    own = model_manifest(model_name)
    return [notebook, *(ROOT / p for p in HASHED_INPUTS), *([own] if own is not None else []), *read]


def input_hash(notebook: Path, profile: str, parameters: dict[str, Any] | None = None, slug: str | None = None) -> str:
    """The notebook's inputs (``notebook_inputs``), the corpora's bytes included (a damaged corpus
    is never "unchanged"), and the parameters it runs with."""
    import knorm_lib as kl

    h = hashlib.sha256(profile.encode())
    if parameters and set(parameters) != {"profile"}:
        h.update(json.dumps(parameters, sort_keys=True).encode())
    for path in notebook_inputs(notebook, profile, slug, (parameters or {}).get("model_name")):
        h.update(_shown(path).encode())
        if not path.exists():
            h.update(b"<missing>")
        else:
            h.update(runtime.code_sha256(path).encode() if path.suffix == ".py" else path.read_bytes())
    for name in kl.CORPORA:
        h.update(kl.verified_corpus_path(name).name.encode())
        h.update(kl.file_sha256(kl.verified_corpus_path(name)).encode())
    return h.hexdigest()


def stamp_dir(profile: str, slug: str | None = None) -> Path:
    """Where a profile's run stamps live: ``data/stamps/[<slug>/]<profile>/`` beside the committed
    ``data/results/`` (beside ``RESULTS`` wherever it points), committed with the results."""
    return RESULTS.with_name("stamps") / (slug or "") / profile


def recorded_defaults(results: Path, profile: str) -> bool:
    """The results file exists and records a run of ``profile`` with the notebook's defaults."""
    if not results.exists():
        return False
    res = json.loads(results.read_text(encoding="utf-8"))
    return res.get("profile") == profile and res.get("parameters", {}).get("profile") == profile


def notebook_sizes(notebook: Path, profile: str) -> dict[str, Any] | None:
    """A notebook's parameter defaults with its ``DEFAULTS[profile]`` sizes filled in (read from
    its source, nothing executed but literal assignments); ``None`` when it has no entry for the
    profile. Notebooks without ``DEFAULTS`` (07) know every profile."""
    import ast

    import nbformat

    cells = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    namespace: dict[str, Any] = {}
    for source in cells[:1]:   # the import cell: its upper-case constants and DEFAULTS
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
                value = eval(compile(ast.Expression(node.value), str(notebook), "eval"), {"dict": dict}, namespace)
                namespace.update({t.id: value for t in node.targets})
    params: dict[str, Any] = {}
    for source in cells[1:3]:   # the parameters cell: plain assignments
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and not node.targets[0].id.startswith("_"):
                try:
                    params[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    defaults = namespace.get("DEFAULTS")
    if defaults is None:
        return params
    if profile not in defaults:
        return None
    return {**params, **{k: v for k, v in defaults[profile].items() if params.get(k) is None}}


def _prefill_sweep_tokens(docs: int, context: int, continuation: int, configs: int) -> int:
    return docs * (context + configs * continuation)


# Tokens through the model's forwards per notebook under its sizes ``s``: the dominant terms only
# (each prefill, each scored continuation, each streaming pass, each timed prefill or decode
# step). An estimate, not a measurement: the runner prints it and says so.
FORWARD_TOKENS: dict[str, Callable[[dict[str, Any]], int]] = {
    "00": lambda s: 4 * s["max_tokens"],
    "01": lambda s: len(s["corpora"]) * s["n_docs"] * s["n_tokens"],
    "02": lambda s: len(s["corpora"]) * s["n_docs"] * (2 * s["n_tokens"] + len(s["keep_ratios"]) * len(s["policies"])
                                                       * (s["n_tokens"] - s["context_len"])),
    "03": lambda s: (_prefill_sweep_tokens(len(s["corpora"]) * s["n_docs"], s["context_len"], s["continuation_len"],
                                           len(s["keep_ratios"]) * (6 + len(s["policies"])))
                     + len(s["corpora"]) * s["n_docs"] * s["stream_tokens"] * len(s["keep_ratios"]) * 6
                     + s["n_reference_docs"] * s["reference_tokens"]),
    "04": lambda s: (_prefill_sweep_tokens(len(s["corpora"]) * s["n_docs"], s["context_len"], s["continuation_len"],
                                           (len(s["policies"]) + 1) * len(s["keep_ratios"]))
                     + len(s["corpora"]) * s["n_stream_docs"] * s["stream_tokens"]
                     * ((len(s["streaming_policies"]) + 1) * len(s["keep_ratios"])
                        + len(s["schedule_keep_ratios"]) * (len(s["prune_afters"]) + 1))),
    "05": lambda s: (sum(n * len(s["depths"] if c <= 2048 else s["long_depths"]) * c
                         for c, n in zip(s["contexts"], s["seeds"]))
                     + s["protocol_seeds"] * 5 * s["protocol_context"] * (1 + len(s["protocol_skip_sets"])
                                                                          * len(s["protocol_policies"]))
                     + 3 * s["speed_context"] * len(s["policies"]) * len(s["keep_ratios"])
                     + s["n_gen_prompts"] * (1 + len(s["gen_keep_ratios"])) * (s["gen_prompt_tokens"] + s["gen_new_tokens"])),
    "06": lambda s: (sum(((s["n_long_repeats"] if n > 4096 else s["n_repeats"]) + 1) * n for n in s["context_lens"])
                     * len(s["policies"]) + sum(s["cold_lens"]) * s["n_cold_processes"] * 2),
    "07": lambda s: 0,
}


def estimate(notebooks: list[Path], profile: str, forward_s_per_token: float,
             overrides: dict[str, dict[str, Any]] | None = None,
             last_runs: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Seconds per notebook: its last run's time scaled by the forward rate now over that run's
    (``last_runs``: ``(seconds, forward_s_per_token)`` by notebook, from its stamp), else its forward
    tokens (``FORWARD_TOKENS``) at the measured rate, with ``overrides`` (by notebook number, e.g.
    ``LEDGER_PARAMETERS``) in place of its defaults."""
    out = {}
    for nb in notebooks:
        key = nb.stem[:2]
        sizes = {**notebook_sizes(nb, profile), **(overrides or {}).get(key, {})}
        if nb.stem in (last_runs or {}):
            seconds, rate = last_runs[nb.stem]
            out[nb.stem] = seconds * forward_s_per_token / rate
        else:
            out[nb.stem] = FORWARD_TOKENS[key](sizes) * forward_s_per_token if key in FORWARD_TOKENS else 0.0
    return out


def last_run(stamps: Path, notebook: Path, parameters: dict[str, Any]) -> tuple[float, float] | None:
    """``(seconds, forward_s_per_token)`` of the notebook's stamped run, if it ran with ``parameters``
    and its runner measured the forward rate (``run_sequentially``)."""
    path = stamps / f"{notebook.stem}.json"
    stamp = json.loads(path.read_text()) if path.exists() else {}
    if stamp.get("seconds") and stamp.get("forward_s_per_token") \
            and stamp.get("parameters") == json.loads(json.dumps(parameters)):
        return stamp["seconds"], stamp["forward_s_per_token"]
    return None


def measured_forward_s_per_token(model: Any, n_tokens: int = 1024) -> float:
    """Seconds per token of one forward of ``n_tokens`` random ids (after a warm-up), on the model's device."""
    import torch

    n_tokens = min(n_tokens, getattr(model.config, "max_position_embeddings", n_tokens))
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(ids[:, :64])
        sync()
        t0 = time.perf_counter()
        model(ids)
        sync()
    return (time.perf_counter() - t0) / n_tokens


def preflight(args: argparse.Namespace, notebooks: list[Path]) -> None:
    """Every error before heavy work: a profile a notebook does not know, a dtype or device that is
    not there, a model that does not exist or that knorm_lib refuses (from its config alone)."""
    import knorm_lib as kl
    import torch

    unknown = [nb.stem for nb in notebooks if notebook_sizes(nb, args.profile) is None]
    if unknown:
        raise SystemExit(f"--profile {args.profile}: not a profile of {', '.join(unknown)}")
    if args.dtype is not None and args.dtype not in runtime.DTYPES:
        raise SystemExit(f"--dtype {args.dtype}: choose one of {', '.join(runtime.DTYPES)}")
    try:
        kl._check_device(args.device)
    except ValueError as err:
        raise SystemExit(f"--device: {err}") from None
    if args.device.startswith("cuda:") and int(args.device.split(":")[1]) >= torch.cuda.device_count():
        raise SystemExit(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.model is None:
        return
    from transformers import AutoConfig

    name = str(args.model)
    embedded = kl.embedded_model_dir(name)
    if embedded is not None and not (embedded / "model.safetensors").is_file():
        raise SystemExit(f"--model {name}: the embedded model is not at {embedded}; run `make data` first")
    if kl._looks_like_path(name) and not (Path(name).expanduser() / "config.json").is_file():
        raise SystemExit(f"--model {name}: no model directory with a config.json there")
    source = (str(embedded) if embedded is not None
              else str(Path(name).expanduser()) if kl._looks_like_path(name) else name)
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        if kl._looks_like_path(name) or not kl._hub_reachable():
            raise SystemExit(f"--model {name}: not a local model directory and not in the Hugging Face cache, "
                             f"and the hub is not reachable ({err})") from None
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False)
    try:
        kl._check_config(cfg, (getattr(cfg, "architectures", None) or [cfg.model_type])[0])
    except (ValueError, NotImplementedError) as err:
        raise SystemExit(f"--model {name}: {err}") from None


def model_slug(args: argparse.Namespace) -> str | None:
    """The slug the notebooks will record this model's results under (``runtime.model_slug``),
    worked out before any weights load."""
    import types

    import knorm_lib as kl
    import torch

    if args.model is None and args.device == "cpu" and args.dtype in (None, "float32"):
        return None
    embedded = kl.embedded_model_dir(args.model)   # None: the default; "gemma-3-270m": its folder
    name = str(embedded) if embedded is not None else str(args.model)
    source = str(Path(name).expanduser()) if kl._looks_like_path(name) else name
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    stand_in = types.SimpleNamespace(name_or_path=source, dtype=getattr(torch, runtime.model_dtype(args.dtype, args.device)),
                                     device="cuda" if on_cuda else "cpu")
    return runtime.model_slug(stand_in)


def write_html(executed_dir: Path, html_dir: Path, skipped: list[str] | None = None) -> None:
    """An HTML page per executed notebook there is (code folded away; from this run or an earlier
    one) and an index linking them that names the notebooks this run ``skipped`` as unchanged."""
    import html

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
    note = (f"<p>Skipped as unchanged in this run (their committed results stand; <code>make report FORCE=1</code> "
            f"reruns them): {html.escape(', '.join(skipped))}</p>" if skipped else "")
    listing = f"<ul>{''.join(links)}</ul>" if links else "<p>No executed notebook here yet.</p>"
    runtime.write_text_atomic(html_dir / "index.html", "<html><body><h1>knorm-study: executed notebooks</h1>"
                              + listing + note + "</body></html>\n")


def confirm_estimate(args: argparse.Namespace, notebooks: list[Path],
                     last_runs: dict[str, tuple[float, float]] | None = None) -> tuple[dict[str, float], float]:
    """Load the model once, time one forward, print the profile's estimated time per notebook
    (``estimate``) and return it (seconds by notebook) with the forward rate; stop a CPU ``paper``
    run estimated over an hour unless ``--yes``."""
    import knorm_lib as kl

    try:   # load_model's own refusals (a layout it cannot evaluate) stop the run here, named
        model, _ = kl.load_model(args.model, device=args.device, dtype=runtime.model_dtype(args.dtype, args.device))
    except (ValueError, NotImplementedError, FileNotFoundError) as err:
        raise SystemExit(f"--model {args.model}: {err}") from None
    rate = measured_forward_s_per_token(model)
    del model
    if args.device != "cpu":   # the notebooks (or --jobs children) need the card's memory
        import torch

        torch.cuda.empty_cache()
    last_runs = last_runs or {}
    est = estimate(notebooks, args.profile, rate, LEDGER_PARAMETERS if args.ledger else None, last_runs)
    total = sum(est.values())
    print(f"estimated time for the {args.profile} profile on {args.device}: {total / 60:.0f} min "
          f"(one measured forward: {rate * 1e3:.2f} ms per token; * its last run's time × this rate / that run's, "
          "else its forward tokens at this rate, which leaves out per-step overheads): "
          + ", ".join(f"{nb[:2]} {sec / 60:.0f} min{'*' if nb in last_runs else ''}" for nb, sec in est.items()),
          flush=True)
    if args.profile == "paper" and not args.device.startswith("cuda") and args.device != "auto" \
            and total > 3600 and not args.yes:
        raise SystemExit(f"--profile paper on {args.device}: estimated {total / 3600:.1f} h; "
                         "rerun with --yes (make report ... YES=1) to go ahead")
    return est, rate


# notebooks that read other notebooks' recorded results: with --jobs they run after the rest
READS_OTHERS = ("07",)


def check_jobs(args: argparse.Namespace) -> None:
    """``--jobs N`` runs N notebooks at once, one per CUDA card; on a CPU notebooks run one at a
    time (two at once would distort every timing they record)."""
    import torch

    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: give 1 or more")
    if args.jobs == 1:
        return
    if args.device not in ("cuda", "auto"):
        raise SystemExit(f"--jobs {args.jobs} with --device {args.device}: parallel jobs take one CUDA card each "
                         "(cards 0 … N-1); use --device cuda or auto, or --jobs 1 (on a CPU notebooks run one at a time)")
    if args.jobs > torch.cuda.device_count():
        raise SystemExit(f"--jobs {args.jobs}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _child_command(args: argparse.Namespace, notebook: Path, forward_s_per_token: float | None = None) -> list[str]:
    """This script for one notebook, with the same choices (one card: CUDA_VISIBLE_DEVICES) and the
    forward rate its parent measured, for its stamp."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", notebook.stem, "--profile", args.profile,
           "--device", args.device, "--jobs", "1", "--no-summary"]
    if forward_s_per_token is not None:
        cmd += ["--forward-s-per-token", repr(forward_s_per_token)]
    for flag, value in (("--model", args.model), ("--dtype", args.dtype)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + [f for f, on in (("--yes", args.yes), ("--ledger", args.ledger), ("--force", args.force)) if on]


def run_jobs(args: argparse.Namespace, notebooks: list[Path], log_dir: Path,
             launch: Callable[[list[str], dict[str, str], Path], int] | None = None,
             forward_s_per_token: float | None = None) -> list[str]:
    """Run ``notebooks`` ``args.jobs`` at a time, each in its own process on its own card
    (``CUDA_VISIBLE_DEVICES``), its screen output in ``log_dir/<notebook>.log``; those in
    ``READS_OTHERS`` after all the others. Return the notebooks that failed."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    def default_launch(cmd: list[str], env: dict[str, str], log: Path) -> int:
        import subprocess

        with log.open("w") as fh:
            return subprocess.run(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT).returncode

    launch = launch or default_launch
    log_dir.mkdir(parents=True, exist_ok=True)
    cards: queue.Queue[int] = queue.Queue()
    for card in range(args.jobs):
        cards.put(card)

    def one(nb: Path) -> str | None:
        card = cards.get()
        try:
            t0, log = time.time(), log_dir / f"{nb.stem}.log"
            print(f"{nb.stem} ({args.profile}): running on card {card}; log {_shown(log)}", flush=True)
            env = {"CUDA_VISIBLE_DEVICES": str(card), "KNORM_RESULTS_DIR": str(RESULTS)}
            rc = launch(_child_command(args, nb, forward_s_per_token), env, log)
            print(f"{nb.stem} ({args.profile}): {'done' if rc == 0 else 'FAILED'} in {time.time() - t0:.0f} s "
                  f"on card {card}", flush=True)
            return None if rc == 0 else nb.stem
        finally:
            cards.put(card)

    independent = [nb for nb in notebooks if nb.stem[:2] not in READS_OTHERS]
    readers = [nb for nb in notebooks if nb.stem[:2] in READS_OTHERS]
    failed = []
    for batch in (independent, readers):
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            failed += [f for f in pool.map(one, batch) if f]
    return failed


def notebook_parameters(args: argparse.Namespace, notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """What ``notebook`` runs with: the run's ``parameters`` and, with ``--ledger``, its overrides."""
    return {**parameters, **(LEDGER_PARAMETERS[notebook.stem[:2]] if args.ledger else {})}


def results_file(notebook: Path, profile: str, slug: str | None) -> Path:
    """Where a run of ``notebook`` records its results (under ``RESULTS``)."""
    return RESULTS / notebook.stem / (slug or "") / f"{profile}.json"


def up_to_date(args: argparse.Namespace, notebook: Path, digest: str, slug: str | None, stamps: Path) -> bool:
    """Its stamp records ``digest`` (the hash its inputs have now: ``input_hash``), its results the
    profile's defaults, and today's code computes its results' behavioural identity (never with
    ``--force``). A record whose probes moved is named with them."""
    from knorm_study import fingerprint

    stamp, results = stamps / f"{notebook.stem}.json", results_file(notebook, args.profile, slug)
    if args.force or not stamp.exists() or not recorded_defaults(results, args.profile) \
            or json.loads(stamp.read_text())["hash"] != digest:
        return False
    moved = fingerprint.record_moved(results)
    if moved:
        print(f"{notebook.stem} ({args.profile}): the code no longer computes its record's numbers: "
              f"{fingerprint.describe(moved)}", flush=True)
    return not moved


def _result_files(notebook: Path, slug: str | None) -> dict[Path, tuple[int, int, int]]:
    """The notebook's result files, each with its (inode, mtime in ns, size): a run's atomic write
    replaces the inode. (A file's mtime alone is not enough: the file clock is coarser than
    ``time.time()``, so a record written just after the run started can look older than it.)"""
    files = {}
    for p in (RESULTS / notebook.stem / (slug or "")).glob("*.json"):
        st = p.stat()
        files[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return files


ESTIMATE_MARGIN = 3   # a cell may run this many times its whole notebook's estimate before it counts as hung


def cell_timeout(profile: str, estimated_s: float | None) -> int:
    """The per-cell timeout for a notebook estimated at ``estimated_s``: the profile's
    (``notebook_runner.CELL_TIMEOUT_S``), or ``ESTIMATE_MARGIN`` times the estimate where that is
    longer. A slower model's cell (Gemma 3 270M's streaming cell in 04's full profile: about 70 min
    here) is not a hang; the profile's bar alone cut it off at 40 min, and the retry again."""
    import notebook_runner as runner

    base = runner.CELL_TIMEOUT_S.get(profile, max(runner.CELL_TIMEOUT_S.values()))
    return max(base, int(ESTIMATE_MARGIN * estimated_s)) if estimated_s else base


def run_sequentially(args: argparse.Namespace, notebooks: list[Path], pending: dict[Path, tuple[dict[str, Any], str]],
                     slug: str | None, out_dir: Path, stamps: Path,
                     estimated: dict[str, float] | None = None, forward_s_per_token: float | None = None) -> list[str]:
    """Run the ``pending`` notebooks (each with its parameters and input hash) one after another in
    this process, in the order of ``notebooks``, the others reported unchanged (see the module
    docstring); return those that failed. Each finished notebook's time is printed beside its
    ``estimated`` one, where given; its stamp keeps its time, parameters and the run's
    ``forward_s_per_token``, for the next estimate."""
    import notebook_runner as runner

    figures = runtime.report_figures_dir(args.profile)
    t_start = time.time()
    failures = []
    for i, nb in enumerate(notebooks, 1):
        prefix = f"[{i}/{len(notebooks)}] {nb.stem} ({args.profile})"
        if nb not in pending:
            print(f"{prefix}: unchanged, skipped", flush=True)
            continue
        nb_parameters, digest = pending[nb]
        print(f"{prefix}: running (elapsed so far {time.time() - t_start:.0f} s) ...", flush=True)
        before = _result_files(nb, slug)
        t0 = time.time()
        try:
            runner.execute(nb, out_dir / nb.name, nb_parameters, progress=True, results_dir=RESULTS, figures_dir=figures,
                           cell_timeout_s=cell_timeout(args.profile, (estimated or {}).get(nb.stem)))
        except runner.NotebookFailed as exc:   # report it with its cell, keep going
            failures.append(nb.stem)
            print(f"{prefix}: FAILED after {time.time() - t0:.0f} s: {exc}\n"
                  f"    executed copy: {out_dir / nb.name}", flush=True)
            continue
        recorded = [p for p, identity in _result_files(nb, slug).items() if before.get(p) != identity]
        if not recorded:   # (06 on CUDA records as gpu-<card>.json)
            failures.append(nb.stem)
            print(f"{prefix}: FAILED: it did not record {results_file(nb, args.profile, slug)}", flush=True)
            continue
        runtime.write_json_atomic(stamps / f"{nb.stem}.json", {"hash": digest, "seconds": time.time() - t0,
                                                              "forward_s_per_token": forward_s_per_token,
                                                              "parameters": nb_parameters})
        guess = f" (estimated {estimated[nb.stem]:.0f} s)" if nb.stem in (estimated or {}) else ""
        print(f"{prefix}: done in {time.time() - t0:.0f} s{guess}; recorded "
              + ", ".join(_shown(p) for p in recorded), flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", choices=list(runtime.PROFILES))
    ap.add_argument("--model", help="a Hugging Face id, a local path or an embedded model's short name "
                                    "(gemma-3-270m; default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    ap.add_argument("--dtype", help=f"one of {', '.join(runtime.DTYPES)} (default: float32 on a CPU, bfloat16 on CUDA)")
    ap.add_argument("--yes", action="store_true", help="run a CPU paper profile even when estimated over an hour")
    ap.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    ap.add_argument("--ledger", action="store_true",
                    help="only what the claims ledger reads: 02, 04 and 07 with the variants its rows use (LEDGER_PARAMETERS)")
    ap.add_argument("--force", action="store_true", help="rerun even when inputs are unchanged")
    ap.add_argument("--jobs", type=int, default=1, help="notebooks at once, one per CUDA card (default 1; 07 runs last)")
    ap.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)   # a --jobs child: no HTML, compare or report
    ap.add_argument("--forward-s-per-token", type=float, help=argparse.SUPPRESS)   # a --jobs child: its parent's rate
    args = ap.parse_args(argv)

    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(p) for p in args.only)]
    if args.ledger:
        notebooks = [nb for nb in notebooks if nb.stem[:2] in LEDGER_PARAMETERS]
    preflight(args, notebooks)
    check_jobs(args)
    slug = model_slug(args)
    embedded_default = slug is None
    if args.ledger and embedded_default and args.profile == "full":
        raise SystemExit("--ledger --profile full: it would replace the embedded model's committed full results "
                         "(the whole study) with the ledger's subset; use another profile or model")
    if not embedded_default:
        print(f"model {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {args.device}"
              f"{', ' + args.dtype if args.dtype else ''}: results under {slug}/", flush=True)
    parameters: dict[str, Any] = {"profile": args.profile}
    if not embedded_default:
        parameters.update(model_name=args.model, device=args.device, dtype=args.dtype)
    out_dir = BUILD / "notebooks" / (slug or "") / args.profile
    stamps = stamp_dir(args.profile, slug)
    # the notebooks that will run, estimated first, the embedded model's too (one forward's rate has
    # differed threefold between two 2-core hosts of this project); a --jobs child's parent estimated
    # and passed its rate on
    runs_with = {nb: notebook_parameters(args, nb, parameters) for nb in notebooks}
    digests = {nb: input_hash(nb, args.profile, runs_with[nb], slug) for nb in notebooks}
    pending = {nb: (runs_with[nb], digests[nb]) for nb in notebooks if not up_to_date(args, nb, digests[nb], slug, stamps)}
    last_runs = {nb.stem: run for nb in pending if (run := last_run(stamps, nb, runs_with[nb])) is not None}
    estimated, rate = (({}, args.forward_s_per_token) if args.no_summary or not pending
                       else confirm_estimate(args, list(pending), last_runs))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamps.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.jobs > 1:
        failures = run_jobs(args, notebooks, BUILD / "logs" / (slug or "") / args.profile, forward_s_per_token=rate)
    else:
        failures = run_sequentially(args, notebooks, pending, slug, out_dir, stamps, estimated, rate)
    if args.no_summary:
        return 1 if failures else 0
    write_html(out_dir, BUILD / "html" / (slug or "") / args.profile, [nb.stem for nb in notebooks if nb not in pending])
    print(f"report ({args.profile}): {len(notebooks) - len(failures)}/{len(notebooks)} notebooks ok "
          f"in {time.time() - t_start:.0f} s; HTML: {_shown(BUILD / 'html' / (slug or '') / args.profile)}"
          "/index.html", flush=True)
    import compare_results
    import render_report

    compare_results.main(["--profile", args.profile, "--run", str(RESULTS)] + (["--slug", slug] if slug else []))
    render_report.main(["--profile", args.profile] + (["--model", slug] if slug else []))
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
