"""Probes of knorm_study/runtime.py (see knorm_study/fingerprint.py): what a notebook's parameters
and sizes become, which dtype its model loads in, where its results are written (model slug,
results path, figures folder) and what the written record holds (JSON text, NaN as null, the
identity's model fields)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from knorm_study.fingerprint import probe
from knorm_study.probes import _models


def _outcome(fn) -> object:
    """What ``fn()`` returns, or the name of the error it raises (not its message: a message is prose)."""
    try:
        return fn()
    except (ValueError, TypeError, KeyError) as err:
        return f"raises {type(err).__name__}"


_DEFAULTS = {"quick": {"n_docs": 2, "context_len": 64, "prune_afters": [16], "recent_window": 16},
             "full": {"n_docs": 6, "context_len": 1024, "prune_afters": [256, 512], "recent_window": 64}}


def _notebook(overrides: dict, defaults: dict | None = _DEFAULTS, extra: dict | None = None) -> object:
    """A notebook's globals as papermill leaves them: imports and ``DEFAULTS`` before the
    parameters cell, the declared parameters, then the injected ``overrides`` (and ``extra``,
    names the parameters cell did not declare)."""
    from knorm_study import runtime

    before = {"json": json, "DEFAULTS": defaults, "_ih": [], "NOTEBOOK": "04_x"}
    declared_values = {"profile": "full", "model_name": None, "device": "cpu", "dtype": None, "keep_ratios": [1.0, 0.5],
                       "policies": ["knorm", "random"], "skip_layers": [0, 1], "n_docs": None, "context_len": None,
                       "prune_afters": None, "recent_window": None, "stream_tokens": 128, "_private": 3}
    declared = set(before) | set(declared_values)
    namespace = {**before, **declared_values, **overrides, **(extra or {})}
    return _outcome(lambda: runtime.notebook_parameters(namespace, declared, before, defaults))


@probe("runtime")
def parameters_and_sizes() -> dict:
    """``notebook_parameters``: the params dict and the profile's sizes (``None`` takes the
    profile's size, a value overrides it, 0 too), without defaults, and which values are rejected
    (unknown and rebound names, the per-name checks, the positive-int rule for ``n_*``,
    ``*_len``, ``*_tokens``)."""
    out = {
        "full": _notebook({}),
        "quick_override": _notebook({"profile": "quick", "context_len": 32, "n_docs": None}),
        "zero_override": _notebook({"recent_window": 0}),
        "no_defaults": _notebook({}, None),
        "unknown_name": _notebook({}, extra={"n_doc": 3}),
        "rebound_import": _notebook({"json": "x"}),
        "underscore_extra": _notebook({}, extra={"_papermill": 1}),
        "profile_without_sizes": _notebook({"profile": "paper"}),
    }
    bad = {"profile": "huge", "dtype": "float64", "device": "tpu", "keep_ratios": [1.5], "policies": ["nope"],
           "skip_layers": [-1], "n_docs": 0, "context_len": -4, "stream_tokens": 0, "prune_afters": [0],
           "model_name": 3}
    out["rejected"] = {k: _notebook({k: v}) for k, v in bad.items()}
    return out


@probe("runtime")
def parameter_checks() -> dict:
    """``PARAMETER_CHECKS``: accepted or rejected, value by value."""
    from knorm_study import runtime

    values = {
        "profile": ["quick", "full", "paper", "fast"], "dtype": [None, "float32", "bfloat16", "float16", "float64"],
        "keep_ratio": [1.0, 0.05, 0.0, 1.2], "keep_ratios": [[1.0, 0.1], [0.5, 2.0]],
        "policy": ["knorm", "streaming", "h2o"], "streaming_policies": [["knorm", "h2o"], ["snapkv"]],
        "corpora": [["wiki", "news"], ["books"]], "position_modes": [["absolute", "cache_relative"], ["relative"]],
        "orders": [["original"], ["sorted"]], "skip_layers": [[0, 1], [], (2,), [-1], [1.0], "0,1"],
        "recent_window": [None, 0, 64, -1, True, 1.5], "matched_fractions": [None, [0.3, 0.45], [0.0], [1.0]],
        "prune_after": [None, 1, 0], "prune_afters": [None, [256], [0]], "protocol_context": [None, 1024, 0],
        "protocol_seeds": [None, 8, -1], "protocol_skip_sets": [None, [[0, 1], [0, 1, 12]], [[-1]]],
        "text": [None, "some text", "   ", 3], "model_name": [None, "org/model", 7], "device": ["cpu", "cuda:0", "gpu"],
        "position_mode": ["absolute", "cache_relative", "x"], "schedule_keep_ratios": [[0.5, 0.25], [0.0]],
        "protocol_policies": [["knorm"], ["h2o"]], "protocol_keep_ratios": [[0.1], [3]],
        "policies": [["knorm", "snapkv"], ["h2o"]],
    }
    out = {}
    for name, vals in values.items():
        check = runtime.PARAMETER_CHECKS[name]
        out[name] = [_outcome(lambda: (check(name, v), "accepted")[1]) for v in vals]
    out["checked_names"] = sorted(runtime.PARAMETER_CHECKS)
    out["profiles"], out["dtypes"] = list(runtime.PROFILES), list(runtime.DTYPES)
    return out


@probe("runtime")
def dtype_slug_and_paths() -> dict:
    """``model_dtype`` (explicit, CPU, CUDA devices, ``"auto"`` with CUDA stubbed present and absent);
    ``model_slug`` for the embedded model in float32 on a CPU, in another dtype, on CUDA, a Hugging
    Face id, a local folder, a random-weight model, odd characters; ``results_path`` and
    ``report_figures_dir`` relative to their roots; ``model_label`` of records."""
    import knorm_lib as kl
    from knorm_study import runtime

    dtypes = {f"{d}@{dev}": _outcome(lambda: runtime.model_dtype(d, dev))
              for d in (None, "float32", "float16", "bfloat16", "float64") for dev in ("cpu", "cuda", "cuda:1")}
    available = torch.cuda.is_available
    try:   # "auto" follows the host: both hosts, stubbed
        for cuda in (False, True):
            torch.cuda.is_available = lambda cuda=cuda: cuda
            dtypes[f"None@auto cuda={cuda}"] = runtime.model_dtype(None, "auto")
            dtypes[f"float16@auto cuda={cuda}"] = runtime.model_dtype("float16", "auto")
    finally:
        torch.cuda.is_available = available
    fake = lambda name, dtype=torch.float32, device="cpu": SimpleNamespace(name_or_path=name, dtype=dtype,
                                                                          device=torch.device(device))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "My Model_v2.1"
        local.mkdir()
        models = {
            "none": None,
            "embedded": fake(str(kl.DEFAULT_MODEL_DIR)),
            "embedded_bf16": fake(str(kl.DEFAULT_MODEL_DIR), torch.bfloat16),
            "embedded_cuda": fake(str(kl.DEFAULT_MODEL_DIR), torch.float32, "cuda:0"),
            "hub_id": fake("HuggingFaceTB/SmolLM2-360M-Instruct"),
            "hub_id_f16_cuda": fake("meta-llama/Llama-3.2-1B", torch.float16, "cuda"),
            "local_folder": fake(str(local)),
            "odd_chars": fake("Org/Weird Name!!  v3."),
            "random_weights": _models.tiny_llama(),
        }
        slugs = {k: runtime.model_slug(m) for k, m in models.items()}
    paths = {f"{nb}|{prof}|{slug}": str(runtime.results_path(nb, prof, slug).relative_to(runtime.RESULTS_DIR))
             for nb, prof, slug in (("06_speed_tradeoffs", "full", None), ("04_quality_tradeoffs", "quick", "m-x"),
                                    ("07_paper_claims", "gpu-h100", ""))}
    figures = {p: str(runtime.report_figures_dir(p).relative_to(kl.PROJECT_ROOT)) for p in runtime.PROFILES}
    labels = [runtime.model_label(r) for r in (
        {}, {"identity": {"model_slug": None, "model_name": "x/y"}},
        {"identity": {"model_slug": "org--m", "model_name": "org/m"}},
        {"identity": {"model_slug": "m", "model_name": "/abs/path/to/LocalModel"}},
        {"identity": {"model_slug": "m", "model_name": None}})]
    return {"model_dtype": dtypes, "model_slug": slugs, "results_path": paths, "report_figures_dir": figures,
            "model_label": labels}


@probe("runtime")
def written_record() -> dict:
    """``write_json_atomic``'s text (sorted keys, indent, NaN and infinities as null, tuples as
    lists) and ``record_results`` into a temporary results folder, for a random-weight model and
    for none: the path, the record's fields and the identity's model fields (not the corpora, the
    host or the behavioural identity, which is ``fingerprint.of_unit``'s, stubbed here: provenance,
    not recorded numbers)."""
    from knorm_study import runtime

    from knorm_study import fingerprint

    obj = {"b": [1.5, float("nan"), (2, float("inf"))], "a": {"z": -float("inf"), "y": 3, "x": "s"}, "c": None}
    old, of_unit = runtime.RESULTS_DIR, fingerprint.of_unit
    # the record's behavioural identity is this module's fingerprint: not computed inside a probe
    fingerprint.of_unit = lambda unit: {"unit": unit}
    with tempfile.TemporaryDirectory() as tmp:
        runtime.write_json_atomic(Path(tmp) / "sub" / "x.json", obj)
        text = (Path(tmp) / "sub" / "x.json").read_text()
        runtime.RESULTS_DIR = Path(tmp) / "results"
        try:
            model = _models.tiny_llama()
            path = runtime.record_results("probe_runtime_nb", "quick", {"keep_ratio": 0.5, "nan": float("nan")},
                                          {"ppl": [10.5, float("inf")], "t": (1, 2)}, model)
            record = json.loads(path.read_text())
            rel = str(path.relative_to(runtime.RESULTS_DIR))
            path_none = runtime.record_results("probe_runtime_nb", "quick", {}, {"x": 1})
            rel_none = str(path_none.relative_to(runtime.RESULTS_DIR))
        finally:
            runtime.RESULTS_DIR, fingerprint.of_unit = old, of_unit
    identity = record["identity"]
    # which provenance fields the identity holds is not a recorded number: only the model's are probed
    return {"json_text": text, "path": rel, "path_no_model": rel_none, "fields": sorted(record),
            "model_fields": {k: identity[k] for k in ("model_name", "dtype", "device", "n_layers", "n_params",
                                                      "model_slug")},
            "notebook": record["notebook"], "profile": record["profile"], "parameters": record["parameters"],
            "results": record["results"], "finite": runtime._finite([float("nan"), 1.0, {"k": (float("-inf"), 2)}])}


@probe("runtime")
def skip_layers_check() -> dict:
    """``check_skip_layers`` against a 4-layer model: which skip sets a notebook may run."""
    from knorm_study import runtime

    model = _models.tiny_llama()
    return {str(s): _outcome(lambda: runtime.check_skip_layers(model, s) or "accepted")
            for s in ([0, 1], [], [3], [0, 1, 2], [0, 1, 2, 3], [4], [0, 0, 1, 1, 2, 2], [0, 1, 2, 2, 3])}
