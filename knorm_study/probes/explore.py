"""Probes of knorm_study/explore.py (see knorm_study/fingerprint.py): what 00_explore records for a
setting (the context split, the point's metrics and kept positions, the continuation and its
agreement with the full cache's), here on the tiny float64 Llama with a byte tokenizer, without
the widgets or the worker's thread; the grid and the policies the explorer computes; the default
text."""

from __future__ import annotations

import threading

import torch

from knorm_study.fingerprint import FLOAT32_RTOL, probe
from knorm_study.probes import _models


class ByteTokenizer:
    """Bytes as token ids (the tiny models' vocabulary is 256): what ``kl.encode`` and the explorer
    call (``tokenizer(text, ...)["input_ids"]``, ``decode``)."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str = "pt") -> dict:
        return {"input_ids": torch.tensor([list(text.encode())])}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


TEXT = " ".join(f"{w}{i % 7}" for i, w in enumerate(("the", "cat", "sat", "on", "a", "mat", "and", "then", "ran",
                                                        "far", "away", "home")) for _ in range(2))


def _explorer(max_tokens: int = 56, score_fraction: float = 0.25, n_generate: int = 5):
    from knorm_study import explore

    return explore.Explorer(_models.tiny_llama(), ByteTokenizer(), TEXT, max_tokens=max_tokens,
                            score_fraction=score_fraction, n_generate=n_generate)


def _point(ex, setting) -> dict:
    p = ex.point(setting)
    return {"summary": p.result.summary(), "kept_per_layer_head": p.kept.sum(-1).tolist(),
            "kept_layer2": [torch.nonzero(p.kept[2, h]).flatten().tolist() for h in range(p.kept.shape[1])]}


def _in_library(fn: object) -> bool:
    """``fn`` (a registered policy, or None for a kvpress press) is knorm_lib's, not a study module's."""
    return getattr(fn, "__module__", "knorm_lib").split(".")[0] == "knorm_lib"


@probe("explore")
def explorer_points() -> dict:
    """``Explorer`` on a 56-token text: the context split (``score_fraction`` 0.25 and 0.4), the
    targets; ``view`` of 00's default setting (metrics, kept positions in the viewed layer and KV
    head, continuation and the full cache's, agreement); ``point`` at settings across policies
    (norm, random, high-norm, a window, a kvpress press), keep_ratios (1.0 too), every skip set of
    the menu and another, both position modes; one more continuation; ``setting``'s key."""
    ex = _explorer()
    view = ex.view(0.5, "knorm", (0, 1), "absolute", layer=2, kv_head=0, cached=True)
    settings = [(0.25, "random", (), "cache_relative"), (0.75, "tova", (0,), "absolute"),
                (1.0, "knorm", (0, 1), "absolute"), (0.1, "streaming", (0, 1), "absolute"),
                (0.3, "high_norm", (0, 1), "cache_relative"), (0.5, "knorm", (2,), "absolute"),
                (0.05, "knorm", (), "absolute")]
    points = {str(s): _point(ex, ex.setting(*s)) for s in settings}
    other = ex.continuation(ex.setting(0.25, "knorm", (), "cache_relative"))
    ex40 = _explorer(score_fraction=0.4)
    return {
        "context_len": ex.context_len, "context_len_04": ex40.context_len,
        "new_ids": ex.new_ids[0].tolist(), "targets": ex.targets.tolist(), "n_tokens": len(ex.tokens),
        "view": {"summary": view.result.summary(), "kept": view.kept, "kept_in_view": sum(view.kept),
                 "continuation": view.continuation, "reference": view.reference_continuation,
                 "agreement": view.agreement},
        "view_layer3_head1": ex.view(0.5, layer=3, kv_head=1, cached=True).kept,
        "default_point": _point(ex, ex.setting(0.5)),
        "points": points,
        "continuation_025_cache_relative": {"text": other.text, "agreement": other.agreement},
        "setting_key": list(ex.setting(0.1 + 0.2, "knorm", [1, 0], "absolute")),
        "point_04": _point(ex40, ex40.setting(0.5)),
    }


@probe("explore", rtol=FLOAT32_RTOL)
def explorer_norms() -> dict:
    """``Explorer.norms`` (float32 key norms, the norm strip's values) of layers 0 and 2."""
    ex = _explorer()
    return {f"layer{i}": ex.norms(i).tolist() for i in (0, 2)}


class _Points(dict):
    """Stand-in for an explorer's ``points``: only membership and ``seconds`` are read."""


@probe("explore")
def grid_and_controls() -> dict:
    """The keep_ratio grid, the skip menu, the policies the explorer's grid covers (``Controls``),
    which policies ``grid_seconds`` reports as full and ``filled``, the worker's task order
    (``GridWorker._tasks``, without its thread: what ``join([policy])`` waits for), and the
    default text (the longest wiki article)."""
    import knorm_lib as kl
    from knorm_study import explore

    E = explore.Explorer
    points = _Points()
    for i, k in enumerate(E.GRID):
        points[(k, "knorm", (0, 1), "absolute")] = explore.GridPoint(None, None, 0.01 * (i + 1))
        if i % 2 == 0:
            points[(k, "random", (0, 1), "absolute")] = explore.GridPoint(None, None, 0.02)
        points[(k, "tova", (), "absolute")] = explore.GridPoint(None, None, 0.03)
    fake = type("FakeExplorer", (), {})()
    fake.points, fake.continuations, fake.GRID, fake.model = points, {}, E.GRID, _models.tiny_llama()
    ui = explore.Controls(fake, "knorm")
    setting = (0.5, "knorm", (0, 1), "absolute")
    grid = ui.grid_seconds(setting)
    filled = {p: ui.filled((0.5, p, (0, 1), "absolute")) for p in ("knorm", "random", "tova")}
    worker = object.__new__(explore.GridWorker)
    worker.explorer, worker.policies, worker._cond = fake, ["knorm", "random", "tova"], threading.Condition()
    fake.points = {}
    worker._current = ((0.35, "random", (0, 1), "absolute"), "knorm")
    tasks = worker._tasks()
    worker._current = ((0.5, "knorm", (), "cache_relative"), None)
    text = explore.default_text()
    # the registry holds what the imported modules registered (attention's ``sink_random`` once
    # knorm_study.attention is imported, as other probes do): 00 imports none of them
    elsewhere = {n for n, fn in kl.POLICIES.items() if not _in_library(fn)}
    return {"grid": list(E.GRID), "step": E.KEEP_RATIO_STEP, "skip_options": [[n, list(s)] for n, s in E.SKIP_OPTIONS],
            "policies": [p for p in ui.policies if p not in elsewhere], "grid_full_policies": sorted(grid),
            "grid_seconds_knorm": grid.get("knorm"),
            "filled": filled,
            "tasks_compare": [[kind, list(s[:2]), list(s[2]), s[3]] for kind, s in tasks[:8]],
            "n_tasks_compare": len(tasks), "n_tasks_single": len(worker._tasks()),
            "pending": [worker.pending(), worker.pending(["random"])],
            "default_text_len": len(text), "default_text_head": text[:80]}


@probe("explore")
def qk_norm_policies() -> dict:
    """The policies the explorer offers beside a model with QK-norm (``knorm_prenorm`` among them)
    and without (not: there it ranks as knorm)."""
    import knorm_lib as kl
    from knorm_study import explore

    def offered(model):
        policies = explore.Controls(type("FakeExplorer", (), {"model": model})(), "knorm").policies
        return [p for p in policies if _in_library(kl.POLICIES.get(p))]
    return {"qk_norm": offered(_models.tiny_qwen3()), "llama": offered(_models.tiny_llama())}
