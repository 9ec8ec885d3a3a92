"""A recorded result's identity by what the code computes, not by its text.

Each recording unit (a notebook ``notebooks/NN_*.ipynb`` or a recording script) imports knorm_lib
and some knorm_study modules. Every such module has *probes* (``knorm_study/probes/``): small
functions that call its entry points at tiny sizes, in float64, on random-weight models built from
configs, and return plain numbers. A unit's fingerprint is the numbers of the probes of every
module it imports; a record keeps them (``identity["behaviour"]``). The record stays valid while
today's code computes the same numbers: ``moved`` recomputes them and names each probe whose
numbers differ beyond ``RTOL`` / ``ATOL`` (integers, strings and booleans exactly).

How to choose the tolerance: float64 on models this small agrees across hosts to about 1e-15
relative (``tests/study/test_fingerprint.py`` measures it against another host's kernels:
torch's unvectorised CPU kernels, MKL limited to SSE4.2, two threads: 2.7e-15 here); a change to
what the code computes moves a kept set, a count or a formula, which moves some probe by far more
than 1e-6 (the mutation test in the same file shows each). ``RTOL = 1e-9`` sits six orders of
magnitude above the first. The few probes whose numbers pass through float32 inside the library
moved by up to 3.9e-6 there and take ``FLOAT32_RTOL = 1e-4``.

What it does not cover, on purpose: timings (they move from run to run; 06's recorded speeds are
measurements of the host, not of the code) and the model's own weights and tokenizer (the
record's model fields and the data manifest say which). The notebook's own code, the runner, the
data manifest, the pins, the parameters and the model stay in ``run_report``'s input hash."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

RTOL = 1e-9
ATOL = 1e-12
FLOAT32_RTOL = 1e-4   # the probes whose numbers pass through float32 inside the library

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# the recording scripts, by the ``notebook`` name their records carry
RECORDING_SCRIPTS = {"foundation": "scripts/foundation_numbers.py", "streaming": "scripts/streaming_numbers.py"}
# knorm_lib's probes carry this module name; every unit imports it. They also cover the modules whose
# names knorm_lib re-exports (kl.load_model, kl.long_documents).
CORE = "knorm_lib"
CORE_PARTS = ("models", "texts")

Probe = Callable[[], dict[str, Any]]
PROBES: dict[str, tuple[str, Probe]] = {}   # "<module>.<probe>" -> (module, function)
PROBE_RTOL: dict[str, float] = {}            # a probe's own tolerance, where it is not RTOL

_STUDY_IMPORT = re.compile(r"from\s+knorm_study\s+import[ \t]+([\w \t,]+)|knorm_study\.(\w+)|from\s+knorm_study\.(\w+)\s+import")


def probe(module: str, rtol: float = RTOL) -> Callable[[Probe], Probe]:
    """Register a probe of ``module`` (``"knorm_lib"`` or a knorm_study module's name): a function
    of no arguments returning a dict of numbers, strings, booleans or lists of them. ``rtol``:
    ``FLOAT32_RTOL`` for a probe whose numbers pass through float32 inside the library even for a
    float64 model (norm scores, the recorded attention probabilities): float32 reductions differ
    across hosts in the last bits, and sums of them by up to about 4e-6 (measured)."""
    def register(fn: Probe) -> Probe:
        PROBES[f"{module}.{fn.__name__}"] = (module, fn)
        if rtol != RTOL:
            PROBE_RTOL[f"{module}.{fn.__name__}"] = rtol
        return fn
    return register


def tolerance(name: str) -> float:
    """The relative tolerance of probe ``name``: ``RTOL``, or the one it registered."""
    _load_probes()
    return PROBE_RTOL.get(name, RTOL)


def study_modules(source: str) -> set[str]:
    """The knorm_study modules ``source`` imports, and those they import in turn."""
    found: set[str] = set()
    todo = [source]
    while todo:
        for names, dotted, from_dotted in _STUDY_IMPORT.findall(todo.pop()):
            for name in [n.strip() for n in names.split(",") if n.strip()] + [dotted, from_dotted]:
                path = PROJECT_ROOT / "knorm_study" / f"{name}.py"
                if name and name not in found and path.exists():
                    found.add(name)
                    todo.append(path.read_text(encoding="utf-8"))
    return found


def unit_source(unit: str) -> str:
    """The code of a recording unit: a notebook's code cells (``"02_attention_correlation"``) or a
    recording script's source (``"foundation"``)."""
    if unit in RECORDING_SCRIPTS:
        return (PROJECT_ROOT / RECORDING_SCRIPTS[unit]).read_text(encoding="utf-8")
    path = PROJECT_ROOT / "notebooks" / f"{unit}.ipynb"
    if not path.exists():
        raise ValueError(f"unit={unit!r}: neither a notebook in notebooks/ nor one of {sorted(RECORDING_SCRIPTS)}")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def unit_modules(unit: str) -> list[str]:
    """knorm_lib and the knorm_study modules ``unit`` imports (directly or through another)."""
    return [CORE, *sorted(study_modules(unit_source(unit)))]


def unit_probes(unit: str) -> list[str]:
    """The probes a unit's fingerprint holds: those of every module it imports."""
    _load_probes()
    modules = set(unit_modules(unit))
    return sorted(name for name, (module, _) in PROBES.items() if module in modules)


@functools.cache
def _load_probes() -> None:
    from knorm_study import probes  # noqa: F401  (registers them)


def _plain(obj: Any) -> Any:
    """``obj`` as JSON would store it (tuples as lists, NaN and infinities as null, ints stay ints)."""
    from knorm_study import runtime

    return json.loads(json.dumps(runtime._finite(obj), default=str, allow_nan=False))


@functools.cache
def _computed(name: str) -> str:
    """One probe's numbers (as JSON text: cached, never shared mutably), with the caller's global
    RNG, default dtype and thread count left as they were."""
    import torch

    _load_probes()
    if name not in PROBES:
        raise KeyError(f"probe {name!r}: not registered (known: {len(PROBES)} probes)")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(0)
            out = PROBES[name][1]()
        finally:
            torch.set_default_dtype(dtype)
            torch.set_num_threads(threads)
    return json.dumps(_plain(out), sort_keys=True)


def compute(names: list[str]) -> dict[str, Any]:
    """The numbers of each named probe, computed once per process."""
    return {name: json.loads(_computed(name)) for name in names}


def is_unit(unit: str) -> bool:
    """``unit`` is a notebook in notebooks/ or a recording script."""
    return unit in RECORDING_SCRIPTS or (PROJECT_ROOT / "notebooks" / f"{unit}.ipynb").exists()


def of_unit(unit: str) -> dict[str, Any]:
    """The fingerprint a record of ``unit`` carries: ``{probe: numbers}``. For a name that is no
    unit (an ad-hoc ``record_results`` call): the probes of knorm_lib and of every knorm_study
    module this process imported."""
    if is_unit(unit):
        return compute(unit_probes(unit))
    import sys

    _load_probes()
    imported = {CORE, *(n.split(".")[1] for n in sys.modules if n.startswith("knorm_study.") and n.count(".") == 1)}
    return compute(sorted(n for n, (m, _) in PROBES.items() if m in imported))


def _differences(recorded: Any, now: Any, rtol: float = RTOL, path: str = "") -> list[str]:
    """Where ``now`` differs from ``recorded``: floats beyond the tolerance, anything else at all."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = [f"{path}/{k}: {'gone' if k not in now else 'new'}" for k in sorted(set(recorded) ^ set(now))]
        for k in sorted(set(recorded) & set(now)):
            out += _differences(recorded[k], now[k], rtol, f"{path}/{k}")
        return out
    if isinstance(recorded, list) and isinstance(now, list):
        if len(recorded) != len(now):
            return [f"{path}: {len(recorded)} values, now {len(now)}"]
        return [d for i, (a, b) in enumerate(zip(recorded, now)) for d in _differences(a, b, rtol, f"{path}[{i}]")]
    if isinstance(recorded, float) or isinstance(now, float):
        if (isinstance(recorded, (int, float)) and isinstance(now, (int, float)) and not isinstance(recorded, bool)
                and not isinstance(now, bool)
                and abs(recorded - now) <= ATOL + rtol * max(abs(recorded), abs(now))):
            return []
        return [f"{path}: {recorded!r} -> {now!r}"]
    return [] if type(recorded) is type(now) and recorded == now else [f"{path}: {recorded!r} -> {now!r}"]


def probes_moved(recorded: dict[str, Any] | None, names: list[str]) -> dict[str, list[str]]:
    """``{probe: differences}`` for each of the probes ``names`` whose numbers today's code no
    longer computes as ``recorded`` (a record's ``identity["behaviour"]``) or that it lacks."""
    recorded = recorded or {}
    now = compute(names)
    out = {}
    for name in names:
        if name not in recorded:
            out[name] = ["not in the record"]
        elif diffs := _differences(recorded[name], now[name], tolerance(name)):
            out[name] = diffs
    return out


def moved(recorded: dict[str, Any] | None, unit: str) -> dict[str, list[str]]:
    """``probes_moved`` for every probe the record holds; empty when the record is valid. A probe
    the record holds that is no longer one of the unit's counts as moved (its evidence is gone);
    a probe added since the record was made does not: it was written for code the record did not
    run (a new policy), while the probes it holds vouch for the code it did."""
    if not recorded:
        return {"(no behavioural identity recorded)": ["run `make report`"]}
    if not is_unit(unit):   # an ad-hoc record: the probes it holds
        return probes_moved(recorded, sorted(recorded))
    names = unit_probes(unit)
    out = {name: ["no longer a probe of this unit"] for name in sorted(set(recorded) - set(names))}
    return {**out, **probes_moved(recorded, sorted(set(recorded) & set(names)))}


def module_probes(module: str) -> list[str]:
    """The probes of one module."""
    _load_probes()
    return sorted(name for name, (m, _) in PROBES.items() if m == module)


def record_moved(path: str | Path) -> dict[str, list[str]]:
    """``moved`` for a committed record file (its unit is its ``notebook`` field)."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if "notebook" not in record:
        return {"(no unit named)": [f"{path} records no notebook; run `make report`"]}
    return moved(record.get("identity", {}).get("behaviour"), record["notebook"])


def describe(moves: dict[str, list[str]], limit: int = 3) -> str:
    """One line per moved probe, its first ``limit`` differences."""
    return "; ".join(f"{name} ({', '.join(d[:limit])}{', ...' if len(d) > limit else ''})" for name, d in moves.items())


def max_scaled_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest ``|x - y| / (ATOL / RTOL + max(|x|, |y|))`` between two fingerprints' floats (same
    shape): how far host rounding moves them, on the scale of the tolerance (a float passes while
    this is at most ``RTOL``; values that are rounding noise around 0 count against ``ATOL``)."""
    worst = 0.0

    def walk(x: Any, y: Any) -> None:
        nonlocal worst
        if isinstance(x, dict):
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, list):
            for u, v in zip(x, y):
                walk(u, v)
        elif isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y):
            worst = max(worst, abs(x - y) / (ATOL / RTOL + max(abs(x), abs(y))))
    walk(a, b)
    return worst


def main(argv: list[str] | None = None) -> None:
    """``python -m knorm_study.fingerprint [--modules M ...] [--until-moved FILE]``: print the
    numbers of every probe (or of those modules' probes) as JSON; ``--until-moved``: stop at the
    first probe that differs from FILE's (a previous output) and print only what was computed. The
    mutation test runs it on mutated copies of the code."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--modules", nargs="*", help="only these modules' probes (knorm_lib, attention, ...)")
    parser.add_argument("--until-moved", type=Path, help="a previous output: stop at the first probe that moved")
    args = parser.parse_args(argv)
    _load_probes()
    names = sorted(n for n, (m, _) in PROBES.items() if not args.modules or m in args.modules)
    before = json.loads(args.until_moved.read_text()) if args.until_moved else None
    out = {}
    for name in names:
        try:
            out[name] = json.loads(_computed(name))
        except Exception as err:   # a mutation may make a probe fail: that is a moved probe
            out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        if before is not None and _differences(before.get(name), out[name], tolerance(name)):
            break
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":   # the registry lives in the imported module, not in __main__
    from knorm_study import fingerprint

    fingerprint.main()
