"""Notebook plumbing: profiles and parameters, result files, figures, atomic JSON, machine info."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import knorm_lib as kl
# quick: what the tests run; full: the committed report, sized for two CPU cores; paper: the
# reference code's and the paper's sizes (README, "Profiles").
PROFILES: tuple[str, ...] = ("quick", "full", "paper")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


# Where notebooks record results and figures. Only `make report` writes the committed ones
# (data/results/, figures/): it sets these variables. Any other run writes under build/.
RESULTS_DIR = Path(os.environ.get("KNORM_RESULTS_DIR", kl.PROJECT_ROOT / "build" / "results"))


FIGURES_DIR: Path | None = Path(os.environ["KNORM_FIGURES_DIR"]) if os.environ.get("KNORM_FIGURES_DIR") else None


def machine_info() -> dict[str, Any]:
    """What ran this: for every recorded result and benchmark line."""
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    return info


PARAMETER_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "profile": lambda n, v: kl._check_choice(n, v, PROFILES),
    "model_name": lambda n, v: kl._require(v is None or isinstance(v, str), n, v,
                                        "None (embedded model) or a Hugging Face id / local path"),
    "device": lambda n, v: kl._check_device(v),
    "dtype": lambda n, v: v is None or kl._check_choice(n, v, DTYPES),
    "keep_ratios": lambda n, v: kl._check_list(n, v, lambda r: kl._check_keep_ratio(r)),
    "policies": lambda n, v: kl._check_list(n, v, lambda p: kl.check_policy(n, p, "prefill")),
    "streaming_policies": lambda n, v: kl._check_list(n, v, lambda p: kl.check_policy(n, p, "streaming")),
    "corpora": lambda n, v: kl._check_list(n, v, lambda c: kl._check_choice(n, c, kl.CORPORA)),
    "position_modes": lambda n, v: kl._check_list(n, v, lambda m: kl._check_choice(n, m, kl.POSITION_MODES)),
    "orders": lambda n, v: kl._check_list(n, v, lambda o: kl._check_choice(n, o, kl.ORDERS)),
    "keep_ratio": lambda n, v: kl._check_keep_ratio(v) and None,
    "policy": lambda n, v: kl.check_policy(n, v, "prefill"),
    "skip_layers": lambda n, v: kl._require(isinstance(v, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in v),
                                         n, v, "a list of layer indices"),
    "position_mode": lambda n, v: kl._check_choice(n, v, kl.POSITION_MODES),
    "schedule_keep_ratios": lambda n, v: kl._check_list(n, v, lambda r: kl._check_keep_ratio(r)),
    "prune_afters": lambda n, v: v is None or kl._check_list(n, v, lambda p: kl._positive_int(n, p)),
    "recent_window": lambda n, v: kl._require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                                           n, v, "None (the profile's) or an int >= 0"),
    "matched_fractions": lambda n, v: v is None or kl._check_list(
        n, v, lambda f: kl._require(isinstance(f, (int, float)) and 0 < f < 1, n, v, "fractions in (0, 1)")),
    "prune_after": lambda n, v: v is None or kl._positive_int(n, v),
    "protocol_policies": lambda n, v: kl._check_list(n, v, lambda p: kl.check_policy(n, p, "prefill")),
    "protocol_keep_ratios": lambda n, v: kl._check_list(n, v, lambda r: kl._check_keep_ratio(r)),
    "protocol_context": lambda n, v: v is None or kl._positive_int(n, v),
    "protocol_seeds": lambda n, v: v is None or kl._positive_int(n, v),
    "protocol_skip_sets": lambda n, v: v is None or kl._check_list(n, v, lambda s: kl._check_layer_list(n, s)),
    "text": lambda n, v: kl._require(v is None or (isinstance(v, str) and bool(v.strip())), n, v,
                                  "None (a wiki article) or non-empty text"),
}


def notebook_parameters(namespace: dict[str, Any], declared: set[str], before: dict[str, Any],
                        defaults: dict[str, dict[str, Any]] | None = None) -> Any:
    """Validate a notebook's parameters; return them as a dict, or with ``defaults`` (per profile,
    the sizes a ``None`` parameter takes) ``(params, sizes)``.

    ``before``: a copy of the globals before the ``parameters`` cell (``dict(globals())``);
    ``declared``: the names at its end. Papermill injects overrides in a cell after it and only
    *warns* on unknown names, so a new global that the parameters cell did not declare, or a
    rebinding of a name defined before it (an import such as ``stats``), is an error here. Names
    starting with ``_`` are IPython's or the notebook's plumbing, never parameters. Known names get
    the checks in ``PARAMETER_CHECKS``; ints named ``n_*``, ``*_len`` or ``*_tokens`` must be positive."""
    names = sorted(n for n in declared - set(before) if not n.startswith("_"))
    unknown = sorted(n for n in set(namespace) - declared if not n.startswith("_"))
    rebound = sorted(n for n, v in before.items() if not n.startswith("_") and namespace.get(n, v) is not v)
    if unknown or rebound:
        raise ValueError(f"unknown parameter(s) {unknown + rebound}: this notebook accepts {names}")
    params = {n: namespace[n] for n in names}
    for name, value in params.items():
        if name in PARAMETER_CHECKS:
            PARAMETER_CHECKS[name](name, value)
        elif (name.startswith("n_") or name.endswith("_len") or name.endswith("_tokens")) and value is not None:
            kl._positive_int(name, value)  # None: take the profile's default
    if defaults is None:
        return params
    profile = params.get("profile")
    kl._require(profile in defaults, "profile", profile, f"one of this notebook's profiles {sorted(defaults)}")
    sizes = {k: (params[k] if params.get(k) is not None else v) for k, v in defaults[profile].items()}
    return params, sizes


def model_dtype(dtype: str | None, device: str) -> str:
    """The dtype a notebook loads its model in: ``dtype``, or (None) bfloat16 on CUDA, float32 on a CPU."""
    kl._require(dtype is None or dtype in DTYPES, "dtype", dtype, f"None or one of {DTYPES}")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return dtype or ("bfloat16" if on_cuda else "float32")


def check_skip_layers(model: Any, skip_layers: Sequence[int]) -> None:
    """A notebook's ``skip_layers`` against the loaded model: valid layer indices, and at least
    one layer left to compress (else every "compressed" number would be the full cache's)."""
    n_layers = kl._n_layers(model)
    kl.EvalConfig(skip_layers=tuple(skip_layers)).validate(n_layers)
    if len(set(skip_layers)) >= n_layers:
        raise ValueError(f"skip_layers={tuple(skip_layers)!r}: leaves none of the model's {n_layers} layers to "
                         "compress; skip fewer layers")


def _finite(obj: Any) -> Any:
    """NaN and infinities become ``null`` (they are not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` via a temporary file and ``os.replace``, so readers never see half a file:
    the one atomic write of the project (results, reports, stamps, the data manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (NaN and infinities as null), written atomically."""
    try:
        text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    except RecursionError as err:
        raise ValueError("obj: circular or too deeply nested to write as JSON") from err
    write_text_atomic(path, text + "\n")


def report_figures_dir(profile: str) -> Path:
    """Where `make report` puts a profile's figures: the committed ``figures/`` for the full
    profile, ``build/figures/<profile>/`` for the others."""
    return kl.PROJECT_ROOT / "figures" if profile == "full" else kl.PROJECT_ROOT / "build" / "figures" / profile


_PENDING_FIGURES: dict[str, dict[Path, tuple[Path, str]]] = {}   # notebook -> {staged file: (base, file name)}


def code_sha256(path: str | os.PathLike) -> str:
    """sha256 of a Python file's code: its syntax tree with every docstring dropped (comments and
    layout never reach the tree), so an edit to prose alone keeps the hash and any edit to code
    changes it."""
    import ast

    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def model_slug(model: Any | None) -> str | None:
    """The folder a model's results and figures go under: ``None`` for the embedded default model
    in float32 on a CPU (its results keep the committed paths) and when no model is given;
    otherwise a file-name-safe form of its Hugging Face id or local folder name, or
    ``random-<type>-<layers>x<width>`` for a model built from a config, followed by the dtype
    unless float32 and ``-cuda`` on a GPU (another dtype or device is another measurement)."""
    import re

    if model is None:
        return None
    name = str(getattr(model, "name_or_path", "") or "")
    dtype = str(getattr(model, "dtype", "torch.float32")).removeprefix("torch.")
    on_cuda = str(getattr(model, "device", "cpu")).startswith("cuda")
    suffix = ("" if dtype == "float32" else f"-{dtype}") + ("-cuda" if on_cuda else "")
    if name and Path(name).expanduser().resolve() == kl.DEFAULT_MODEL_DIR.resolve():
        if not suffix:
            return None
        name = kl.DEFAULT_MODEL_DIR.name
    if not name:
        cfg = model.config
        name = f"random-{cfg.model_type}-{kl._n_layers(model)}x{cfg.hidden_size}"
    elif Path(name).expanduser().is_dir():
        name = Path(name).expanduser().resolve().name
    return (re.sub(r"[^a-z0-9._-]+", "-", name.lower().replace("/", "--")).strip("-.") or "model") + suffix


def model_label(record: dict[str, Any]) -> str:
    """The name of the model a recorded result comes from, for prose: the embedded model's name,
    else the Hugging Face id or local folder name it was loaded from."""
    identity = record.get("identity", {})
    name = identity.get("model_name")
    if not identity.get("model_slug") or not name:
        return "SmolLM2-135M-Instruct"
    return Path(name).name if Path(name).is_absolute() else name


def results_path(notebook: str, profile: str, slug: str | None = None) -> Path:
    """``<RESULTS_DIR>/<notebook>/[<slug>/]<profile>.json``: where a run's results are recorded."""
    return RESULTS_DIR / notebook / (slug or "") / f"{profile}.json"


def record_results(notebook: str, profile: str, parameters: dict[str, Any], results: dict[str, Any],
                   model: Any | None = None) -> Path:
    """Write ``results_path(notebook, profile, model_slug(model))`` atomically, with what produced
    it (its ``identity``: the behavioural fingerprint of the code it ran, ``fingerprint.of_unit``,
    the corpora and the model), then publish the figures this process saved for the notebook (under the model's slug too,
    for any model but the embedded one): a run that fails before recording its results leaves no
    figure behind."""
    from knorm_study import fingerprint

    identity: dict[str, Any] = {"behaviour": fingerprint.of_unit(notebook),
                                "corpora_sha256": {p.stem: kl.file_sha256(p) for p in sorted(kl._VERIFIED_CORPORA)}}
    if model is not None:
        identity.update(model_name=getattr(model, "name_or_path", None), dtype=str(model.dtype), device=str(model.device),
                        n_layers=kl._n_layers(model), n_params=sum(p.numel() for p in model.parameters()))
    slug = model_slug(model)
    identity["model_slug"] = slug
    path = results_path(notebook, profile, slug)
    write_json_atomic(path, {"notebook": notebook, "profile": profile, "parameters": parameters,
                             "identity": identity, "machine": machine_info(),
                             "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results})
    for pending, (base, name) in _PENDING_FIGURES.pop(notebook, {}).items():
        final = base / (slug or "") / notebook / name
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(pending, final)   # a rename within one file system
    return path


def save_figure(fig: Any, notebook: str, name: str, profile: str = "full", dpi: int = 150) -> Path:
    """Save a matplotlib figure as PNG (>= 150 dpi) for ``<FIGURES_DIR>/[<model slug>/]<notebook>/<name>.png``
    (default ``build/figures/<profile>/``; `make report` points it at the committed ``figures/``).
    The file is staged under ``build/`` and only moved there by ``record_results``, which knows
    the model. Returns the staged path."""
    base = FIGURES_DIR if FIGURES_DIR is not None else kl.PROJECT_ROOT / "build" / "figures" / profile
    staged = kl.PROJECT_ROOT / "build" / "staged-figures" / str(os.getpid()) / notebook / f"{name}.png"
    staged.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(staged, dpi=max(dpi, 150), bbox_inches="tight")
    _PENDING_FIGURES.setdefault(notebook, {})[staged] = (base, f"{name}.png")
    return staged
