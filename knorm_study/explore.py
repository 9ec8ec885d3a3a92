"""The interactive explorer (00_explore): prefill once per text, then read every slider move from a grid.

``Explorer`` holds one text's prefill and computes, per setting, the metrics and kept positions
(``point``) and the greedy continuation (``continuation``), each cached; ``GridWorker`` computes
them in a background thread, the current setting first, then the slider's grid nearest first,
policy by policy; ``controls`` builds the notebook's widgets around both (ipywidgets is imported
there only), so that a slider move only reads. ``norm_strip_html``, ``highlight_html`` and
``curve_svg`` render what a setting keeps and where it sits on the quality curve.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

import knorm_lib as kl
from knorm_study import decode, quality


def default_text() -> str:
    """The explorer's default text: the longest wiki article."""
    return sorted(kl.load_corpus("wiki"), key=lambda d: -(d.n_tokens or 0))[0].text


Setting = tuple[float, str, tuple[int, ...], str]   # (keep_ratio, policy, skip_layers, position_mode)


@dataclass(frozen=True)
class GridPoint:
    """One setting's numbers: PPL, accuracy, KL, top-1 against the full cache (``result``) and the
    positions each layer and KV head keeps (``kept``: ``(layers, H_kv, context_len)`` booleans)."""
    result: kl.EvalResult
    kept: torch.Tensor
    seconds: float


@dataclass(frozen=True)
class Continuation:
    """One setting's greedy continuation, its agreement with the full cache's, and its time."""
    text: str
    agreement: dict[str, float]
    seconds: float


@dataclass
class ExplorerView:
    """Everything 00_explore displays for one setting."""
    tokens: list[str]              # decoded context tokens
    kept: list[bool]               # per context token: kept in the chosen layer / KV head
    norms: torch.Tensor            # (H_kv, context_len) key norms of the chosen layer
    result: kl.EvalResult             # PPL, accuracy, KL against the full cache on the scored part
    continuation: str              # greedy continuation from the compressed cache
    reference_continuation: str    # ... and from the full cache
    agreement: dict[str, float]
    seconds: float


class Explorer:
    """Holds one text's prefill so that each setting only re-compresses and re-scores.

    The first ``1 - score_fraction`` of the tokens is the context that gets compressed; the rest
    is scored teacher-forced (prefill protocol) and the continuation is generated after the context."""

    KEEP_RATIO_STEP = 0.05   # the keep_ratio slider's grid (0.05 .. 1.0)
    GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))
    SKIP_OPTIONS = (("(0, 1) paper", (0, 1)), ("() all layers", ()), ("(0,)", (0,)))   # the skip_layers menu

    @staticmethod
    def skip_options(model: Any) -> list[tuple[str, tuple[int, ...]]]:
        """The skip_layers menu: ``SKIP_OPTIONS`` and, on a model with sliding-window layers, the
        global layers only (kvpress's rule for Gemma 3), with and without the paper's (0, 1)."""
        options = list(Explorer.SKIP_OPTIONS)
        if kl.sliding_layers(model):
            options += [("global layers only", kl.layers_to_skip(model, (), "global")),
                        ("global, not (0, 1)", kl.layers_to_skip(model, (0, 1), "global"))]
        return options

    @staticmethod
    def check_setting(model: Any, keep_ratio: float, policy: str, skip_layers: Sequence[int],
                      position_mode: str, layer: int, kv_head: int, max_tokens: int) -> None:
        """Every explorer parameter against the model and the controls, before any prefill: a
        value the widgets would clamp or reject is an error naming the parameter."""
        kl.EvalConfig(keep_ratio, policy, kl._check_layer_list("skip_layers", skip_layers), "original",
                   position_mode).validate(kl._n_layers(model))
        step = Explorer.KEEP_RATIO_STEP
        kl._require(abs(keep_ratio / step - round(keep_ratio / step)) < 1e-9, "keep_ratio", keep_ratio,
                 f"on the slider's grid: a multiple of {step} in [{step}, 1]")
        kl._require(isinstance(layer, int) and 0 <= layer < kl._n_layers(model), "layer", layer,
                 f"a layer index 0..{kl._n_layers(model) - 1}")
        n_kv = model.config.num_key_value_heads
        kl._require(isinstance(kv_head, int) and 0 <= kv_head < n_kv, "kv_head", kv_head, f"a KV head 0..{n_kv - 1}")
        limit = getattr(model.config, "max_position_embeddings", None)
        kl._positive_int("max_tokens", max_tokens)
        kl._require(limit is None or max_tokens <= limit, "max_tokens", max_tokens,
                 f"at most the model's {limit} positions")

    def __init__(self, model: Any, tokenizer: Any, text: str, max_tokens: int = 512,
                 score_fraction: float = 0.25, n_generate: int = 24) -> None:
        if not 0 < score_fraction < 1:
            raise ValueError(f"score_fraction={score_fraction!r}: must be in (0, 1)")
        t0 = time.perf_counter()
        self.model, self.tokenizer, self.n_generate = model, tokenizer, n_generate
        self.text, self.max_tokens = text, max_tokens
        self.ids = kl.encode(tokenizer, text, max_tokens)
        n = self.ids.shape[1]
        if n < 8:
            raise ValueError(f"text: {n} tokens; the explorer needs at least 8")
        self.context_len = max(2, min(n - 2, round(n * (1 - score_fraction))))
        self.pre = kl.prefill(model, self.ids[:, :self.context_len], capture_hidden=True)
        self.new_ids = self.ids[:, self.context_len:-1]
        self.targets = self.ids[0, self.context_len + 1:].to(model.device)
        # with the input of each menu skip set's first compressed layer: its points start there
        self.ref_logits = kl.reference_forward(model, self.new_ids, self.pre.cache,
                                               [kl._first_compressed(skip) for _, skip in self.skip_options(model)])
        self.tokens = [tokenizer.decode([t]) for t in self.ids[0, :self.context_len].tolist()]
        self.prefill_seconds = time.perf_counter() - t0
        self._reference_ids: torch.Tensor | None = None
        self._scores: dict[str, list] = {}
        self._norms: dict[int, torch.Tensor] = {}
        self.points: dict[Setting, GridPoint] = {}
        self.continuations: dict[Setting, Continuation] = {}

    @property
    def reference_ids(self) -> torch.Tensor:
        """The full cache's greedy continuation (computed once, on first use)."""
        if self._reference_ids is None:
            self._reference_ids = decode.generate_greedy(self.model, self.ids[:, :self.context_len], self.n_generate,
                                                         pre=self.pre)
        return self._reference_ids

    def norms(self, layer: int) -> torch.Tensor:
        """``(H_kv, context_len)`` key norms of ``layer``."""
        if layer not in self._norms:
            self._norms[layer] = kl._norms(self.pre.cache.keys[layer])[0].cpu()
        return self._norms[layer]

    def setting(self, keep_ratio: float, policy: str = "knorm", skip_layers: Sequence[int] = (0, 1),
                position_mode: kl.PositionMode = "absolute") -> Setting:
        """The checked key of a setting (what ``point`` and ``continuation`` cache by)."""
        cfg = kl.EvalConfig(keep_ratio, policy, kl._check_layer_list("skip_layers", skip_layers), "original",
                            position_mode)
        cfg.validate(kl._n_layers(self.model))
        return round(keep_ratio, 4), policy, tuple(skip_layers), position_mode

    def point(self, setting: Setting, cached: bool = True) -> GridPoint:
        """The setting's metrics and kept positions (re-compress, re-score)."""
        if cached and setting in self.points:
            return self.points[setting]
        t0 = time.perf_counter()
        keep_ratio, policy, skip_layers, position_mode = setting
        if policy not in self._scores:
            self._scores[policy] = kl.policy_scores(self.pre.cache, policy, kl.PolicyOptions(), self.pre.layer_inputs)
        cfg = kl.EvalConfig(keep_ratio, policy, skip_layers, "original", position_mode)
        result, cache = kl.evaluate(self.model, self.pre, self.new_ids, self.targets, cfg, self.ref_logits,
                                    self._scores[policy])
        kept = torch.zeros(len(cache.positions), cache.positions[0].shape[1], self.context_len, dtype=torch.bool)
        for layer, positions in enumerate(cache.positions):
            kept[layer].scatter_(1, positions[0].cpu(), True)
        point = GridPoint(result, kept, time.perf_counter() - t0)
        self.points[setting] = point
        return point

    def continuation(self, setting: Setting, cached: bool = True) -> Continuation:
        """The setting's greedy continuation from the compressed cache (regenerate)."""
        if cached and setting in self.continuations:
            return self.continuations[setting]
        t0 = time.perf_counter()
        keep_ratio, policy, skip_layers, position_mode = setting
        reference = self.reference_ids
        generated = decode.generate_greedy(self.model, self.ids[:, :self.context_len], self.n_generate, keep_ratio,
                                           policy, skip_layers, "original", position_mode, pre=self.pre)
        out = Continuation(self.tokenizer.decode(generated), quality.generation_agreement(generated, reference),
                           time.perf_counter() - t0)
        self.continuations[setting] = out
        return out

    def view(self, keep_ratio: float, policy: str = "knorm", skip_layers: Sequence[int] = (0, 1),
             position_mode: kl.PositionMode = "absolute", layer: int = 2, kv_head: int = 0,
             cached: bool = False) -> ExplorerView:
        """Everything for one setting; ``cached=False`` recomputes it all (re-compress, re-score,
        regenerate): what a slider move cost before the grid."""
        t0 = time.perf_counter()
        setting = self.setting(keep_ratio, policy, skip_layers, position_mode)
        if not 0 <= layer < kl._n_layers(self.model):
            raise ValueError(f"layer={layer}: outside 0..{kl._n_layers(self.model) - 1}")
        if not 0 <= kv_head < self.pre.cache.keys[0].shape[1]:
            raise ValueError(f"kv_head={kv_head}: outside 0..{self.pre.cache.keys[0].shape[1] - 1}")
        point, cont = self.point(setting, cached), self.continuation(setting, cached)
        return ExplorerView(self.tokens, point.kept[layer, kv_head].tolist(), self.norms(layer), point.result,
                            cont.text, self.tokenizer.decode(self.reference_ids), cont.agreement,
                            time.perf_counter() - t0)


# ---- the model menu: each model loaded once per kernel ----

_LOADED: dict[str, tuple[Any, Any]] = {}   # a menu entry's name -> (model, tokenizer)


def model_choices(model: Any) -> list[tuple[str, str]]:
    """The explorer's model menu, ``(label, name)``: the model it was opened with, then every
    embedded model whose files ``make data`` has built (``kl.EMBEDDED_MODELS``), each once."""
    from pathlib import Path

    opened = str(model.name_or_path)
    out = [(f"{Path(opened).name} (opened)", opened)]
    for short in kl.EMBEDDED_MODELS:
        folder = kl.embedded_model_dir(short)
        if folder is not None and (folder / "config.json").exists() and folder.resolve() != Path(opened).resolve():
            out.append((f"{short} (embedded)", str(folder)))
    return out


def load_cached(name: str, like: Any) -> tuple[Any, Any]:
    """The model and tokenizer ``name`` names (a menu entry), loaded on the device and in the dtype
    of ``like`` the first time and kept for the kernel's life: switching back costs nothing."""
    if name not in _LOADED:
        _LOADED[name] = kl.load_model(name, device=str(like.device), dtype=next(like.parameters()).dtype)
    return _LOADED[name]


def layer_kind_html(model: Any, layer: int) -> str:
    """What kind of attention ``layer`` has: global, or local with its window (the layer picker's label)."""
    if layer in kl.sliding_layers(model):
        return f'<span id="layer-kind">layer {layer}: local (sliding window {model.config.sliding_window})</span>'
    return f'<span id="layer-kind">layer {layer}: global (full attention)</span>'


def policies_for(model: Any) -> list[str]:
    """The explorer's policies on ``model``: every registered fixed-score policy (knorm_prenorm only
    where the model has QK-norm: elsewhere it ranks exactly as knorm), then kvpress's presses."""
    fixed = kl.applicable_policies(model, sorted(kl.POLICIES.keys() - set(kl.DYNAMIC_POLICIES)))
    return fixed + sorted(kl.KVPRESS_POLICIES)


class _Cancelled(Exception):
    """Raised in the worker's thread at the next decoder layer once its task is no longer wanted."""


class GridWorker:
    """Fills an ``Explorer``'s caches in one background thread, in this order: the current setting's
    point (and the compared policy's), its continuation, then the slider's grid for the current
    policy nearest the current keep_ratio first, the compared policy's, then every other policy's.
    ``on_ready(kind, setting)`` is called (in the worker's thread) after each. ``stop`` ends it
    (also at interpreter exit).

    A task nobody wants any more is abandoned at the model's next decoder layer (a pre-hook in this
    thread only), not finished: everything once the worker is stopped (a new text waits
    milliseconds, not for a whole continuation), and a continuation once the setting moved on."""

    def __init__(self, explorer: Explorer, policies: Sequence[str],
                 on_ready: Callable[[str, Setting], None] | None = None) -> None:
        self.explorer, self.policies, self.on_ready = explorer, list(policies), on_ready
        self._cond = threading.Condition()
        self._current: tuple[Setting, str | None] | None = None
        self._stopped = False
        self._paused = False
        self.error: BaseException | None = None
        self._running: tuple[str, Setting] | None = None
        self._thread = threading.Thread(target=self._run, name="knorm-explorer-grid", daemon=True)
        self._hooks = [layer.register_forward_pre_hook(self._abandon_unwanted) for layer in kl._layers(explorer.model)]
        self._thread.start()
        atexit.register(self.stop)

    def _abandon_unwanted(self, *_: Any) -> None:
        if threading.current_thread() is not self._thread:
            return
        if self._stopped or (self._running and self._running[0] == "continuation" and self._current
                             and self._running[1] != self._current[0]):
            raise _Cancelled

    def set_current(self, setting: Setting, compare: str | None = None) -> None:
        with self._cond:
            self._current = (setting, compare)
            self._cond.notify()

    def _tasks(self) -> list[tuple[str, Setting]]:
        """What is left to compute, first first."""
        if self._current is None:
            return []
        (keep, policy, skip, mode), compare = self._current
        ex = self.explorer
        order = [policy] + ([compare] if compare else []) + [p for p in self.policies if p not in (policy, compare)]
        head = [("point", (keep, p, skip, mode)) for p in order[:2 if compare else 1]]
        head.append(("continuation", (keep, policy, skip, mode)))
        grid = [("point", (k, p, skip, mode)) for p in order for k in sorted(ex.GRID, key=lambda k: (abs(k - keep), k))]
        done = lambda kind, s: s in (ex.points if kind == "point" else ex.continuations)
        return [t for t in head + grid if not done(*t)]

    def pending(self, policies: Sequence[str] | None = None) -> int:
        """Grid points and continuations still to compute (for ``policies``' grids only, if given)."""
        with self._cond:
            tasks = self._tasks()
        return sum(1 for kind, s in tasks if policies is None or kind == "continuation" or s[1] in policies)

    def _run(self) -> None:
        try:
            self._fill()
        finally:
            for hook in self._hooks:
                hook.remove()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._paused or not self._tasks()):
                    self._cond.notify_all()
                    self._cond.wait()
                if self._stopped:
                    return
                kind, setting = self._running = self._tasks()[0]
            try:
                try:
                    (self.explorer.point if kind == "point" else self.explorer.continuation)(setting)
                    done = True
                except _Cancelled:   # nothing was cached; a continuation wanted again is computed again
                    done = False
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
                if done and self.on_ready is not None:
                    self.on_ready(kind, setting)
            except BaseException as err:   # kept for join() to raise: a worker never dies silently
                self.error = err
                with self._cond:
                    self._stopped = True
                    self._cond.notify_all()
                return

    def join(self, policies: Sequence[str] | None = None, timeout_s: float = 600.0) -> None:
        """Wait until nothing is left for ``policies``' grids (default: every policy) and the
        current continuation; raise what the worker raised, or ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        while self.pending(policies):
            if self.error is not None:
                raise RuntimeError("the explorer's background worker failed") from self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the explorer's grid is not filled after {timeout_s:.0f} s")
            with self._cond:
                self._cond.wait(timeout=0.05)
        if self.error is not None:
            raise RuntimeError("the explorer's background worker failed") from self.error

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block the worker computes nothing (its task in progress finishes first): for
        timing on a quiet machine."""
        with self._cond:
            self._paused = True
            while self._running is not None and not self._stopped:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


def metrics_html(point: GridPoint | None, label: str, context_len: int) -> str:
    """One policy's metrics line (``"computing…"`` until its grid point is ready)."""
    if point is None:
        return f'<div class="metrics-row">{label}: <i>computing…</i></div>'
    r = point.result
    return (f'<div class="metrics-row">{label}: PPL <b class="ppl">{r.ppl:.3f}</b> · next-token accuracy '
            f"{r.next_token_acc:.3f} · KL to full cache {r.kl_mean:.4f} nats/token · top-1 agreement "
            f'{r.top1_agree:.3f} · kept <b class="n-kept">{r.n_kept}</b> of {context_len} context tokens per head</div>')


def controls(explorer: Explorer, keep_ratio: float, policy: str, skip_layers: Sequence[int],
             position_mode: str, layer: int, kv_head: int) -> tuple[Any, "Controls"]:
    """The explorer's widgets, started at the given setting, and their state (``Controls``: the
    grid worker, the latest read's latency). Every slider move (while dragging too) only reads
    from the grid the worker fills; "prefill this text" builds a new ``Explorer`` for the edited
    text. Returns the widget box (to ``display``) and the state.

    Every display area is an HTML widget whose value is replaced on each update: Output widgets
    that are cleared and refilled can leave a headless papermill run waiting forever for the
    cell's reply (nbclient issue #312)."""
    import ipywidgets as widgets

    ui = Controls(explorer, policy)
    model = explorer.model
    _LOADED.setdefault(str(model.name_or_path), (model, explorer.tokenizer))
    step = Explorer.KEEP_RATIO_STEP
    w_model = widgets.Dropdown(options=model_choices(model), value=str(model.name_or_path), description="model")
    w_keep = widgets.FloatSlider(value=keep_ratio, min=step, max=1.0, step=step, description="keep_ratio",
                                 continuous_update=True, readout_format=".2f")
    w_policy = widgets.Dropdown(options=ui.policies, value=policy, description="policy")
    w_compare = widgets.Dropdown(options=["none"] + ui.policies, value="none", description="compare with")
    skip_options = Explorer.skip_options(model)
    if tuple(skip_layers) not in [value for _, value in skip_options]:
        skip_options.append((str(tuple(skip_layers)), tuple(skip_layers)))
    w_skip = widgets.Dropdown(options=skip_options, value=tuple(skip_layers), description="skip_layers")
    w_mode = widgets.Dropdown(options=list(kl.POSITION_MODES), value=position_mode, description="positions")
    w_layer = widgets.IntSlider(value=layer, min=0, max=kl._n_layers(model) - 1, description="layer")
    w_layer_kind = widgets.HTML(layer_kind_html(model, layer))
    w_head = widgets.IntSlider(value=kv_head, min=0, max=model.config.num_key_value_heads - 1, description="KV head")
    w_text = widgets.Textarea(value=explorer.text[:3000], layout=widgets.Layout(width="100%", height="80px"))
    w_apply = widgets.Button(description="prefill this text")
    status, metrics_out, curve_out, text_out, norms_out, gen_out = (widgets.HTML() for _ in range(6))

    def current(keep_ratio: float | None = None) -> tuple[Setting, str | None]:
        compare = None if w_compare.value == "none" or w_compare.value == w_policy.value else w_compare.value
        keep_ratio = w_keep.value if keep_ratio is None else keep_ratio
        return ui.explorer.setting(keep_ratio, w_policy.value, w_skip.value, w_mode.value), compare

    def render(*_: Any, keep_ratio: float | None = None) -> None:
        """Show the setting the widgets hold (``keep_ratio``: another grid point, the slider left where it is)."""
        with ui.lock:
            t0 = time.perf_counter()
            ex = ui.explorer
            setting, compare = current(keep_ratio)
            ui.worker.set_current(setting, compare)
            point = ex.points.get(setting)
            other = ex.points.get((setting[0], compare, *setting[2:])) if compare else None
            metrics_out.value = ('<div id="metrics">' + metrics_html(point, setting[1], ex.context_len)
                                 + (metrics_html(other, compare, ex.context_len) if compare else "") + "</div>")
            if point is not None and (other is not None or not compare):
                kept_b = other.kept[w_layer.value, w_head.value].tolist() if other is not None else None
                text_out.value = highlight_html(ex.tokens, point.kept[w_layer.value, w_head.value].tolist(), kept_b,
                                                (setting[1], compare))
            norms_out.value = ui.norm_strip(w_layer.value)
            w_layer_kind.value = layer_kind_html(ex.model, w_layer.value)
            curve_out.value = curve_svg(ex.points, setting, compare)
            cont = ex.continuations.get(setting)
            gen_out.value = '<div id="continuation">' + ("<i>generating the continuation…</i>" if cont is None else
                             f"<table><tr><th>compressed cache</th><th>full cache</th></tr><tr>"
                             f"<td style='vertical-align:top'>{cont.text}</td>"
                             f"<td style='vertical-align:top'>{ex.tokenizer.decode(ex.reference_ids)}</td></tr></table>"
                             f"matching prefix {cont.agreement['matching_prefix']} tokens, agreement "
                             f"{cont.agreement['token_agreement']:.2f}; generated in {cont.seconds:.2f} s") + "</div>"
            ui.read_seconds.append(time.perf_counter() - t0)
            status.value = (f'<span id="status">read in {1e3 * ui.read_seconds[-1]:.0f} ms · grid '
                            f"{ui.filled(setting)}/{len(Explorer.GRID)} for {setting[1]}"
                            f"{'' if point is not None else ' · computing this point…'} · prefilled "
                            f"{ex.context_len} tokens in {ex.prefill_seconds:.2f} s</span>")

    def on_ready(kind: str, setting: Setting) -> None:   # the worker's thread: show what just arrived
        if ui.worker is not None and current()[0][2:] == setting[2:]:
            render()

    def new_text(_: Any, model: Any = None, tokenizer: Any = None) -> None:
        status.value = "<b>prefilling…</b>"
        ui.worker.stop()
        ex = ui.explorer
        ui.explorer = Explorer(model or ex.model, tokenizer or ex.tokenizer, w_text.value, max_tokens=ex.max_tokens)
        # the current setting's point here, in the thread that just prefilled, before the worker
        # starts: handed to a fresh thread it took 0.1-0.3 s longer on two cores
        ui.explorer.point(current()[0])
        ui.start_worker(on_ready)
        render()

    def new_model(change: Any) -> None:
        """Another model: loaded once per kernel, the text prefilled again, and the controls that
        depend on the model (layers, KV heads, the skip_layers menu, the policies) set for it."""
        status.value = "<b>loading the model…</b>"
        ui.worker.stop()   # its points belong to the old model
        model, tokenizer = load_cached(change["new"], ui.explorer.model)
        controls_ = (w_policy, w_compare, w_skip, w_layer, w_head)
        with ui.lock:
            for w in controls_:   # no render per control: one after the new prefill
                w.unobserve(render, names="value")
            policy, compare = w_policy.value, w_compare.value   # kept where the new model offers them
            ui.policies = policies_for(model)
            w_policy.options, w_compare.options = ui.policies, ["none"] + ui.policies
            w_policy.value = policy if policy in ui.policies else "knorm"
            w_compare.value = compare if compare in ui.policies else "none"
            w_skip.options = Explorer.skip_options(model)
            w_skip.value = w_skip.options[0][1]
            w_layer.max, w_head.max = kl._n_layers(model) - 1, model.config.num_key_value_heads - 1
            for w in controls_:
                w.observe(render, names="value")
        new_text(None, model, tokenizer)

    ui.render = render
    ui.widgets.update(keep_ratio=w_keep, policy=w_policy, compare=w_compare, skip_layers=w_skip, position_mode=w_mode,
                      layer=w_layer, kv_head=w_head, status=status, metrics=metrics_out, model=w_model,
                      layer_kind=w_layer_kind)
    ui.start_worker(on_ready)
    for w in (w_keep, w_policy, w_compare, w_skip, w_mode, w_layer, w_head):
        w.observe(render, names="value")
    w_apply.on_click(new_text)
    w_model.observe(new_model, names="value")
    box = widgets.VBox([widgets.HBox([w_model, w_keep, w_policy, w_compare]),
                        widgets.HBox([w_skip, w_mode, w_layer, w_layer_kind, w_head]),
                        w_text, widgets.HBox([w_apply, status]), metrics_out, curve_out, gen_out, norms_out, text_out])
    render()
    return box, ui


class Controls:
    """The explorer widgets' state: the text's ``Explorer``, its ``GridWorker``, the latency of each
    read (``read_seconds``), and the norm strips drawn so far."""

    def __init__(self, explorer: Explorer, policy: str) -> None:
        self.explorer = explorer
        self.policies = policies_for(explorer.model)
        self.lock = threading.RLock()
        self.read_seconds: list[float] = []
        self.worker: GridWorker | None = None
        self.render: Callable[..., None] = lambda **_: None   # set by ``controls``
        self.widgets: dict[str, Any] = {}
        self._strips: dict[tuple[int, int], str] = {}

    def start_worker(self, on_ready: Callable[[str, Setting], None]) -> None:
        self.worker = GridWorker(self.explorer, self.policies, on_ready)

    def grid_seconds(self, setting: Setting) -> dict[str, float]:
        """Per policy whose grid is full at this skip set and position mode: the seconds its points took."""
        out: dict[str, float] = {}
        for (k, policy, *rest), point in list(self.explorer.points.items()):
            if tuple(rest) == setting[2:]:
                out[policy] = out.get(policy, 0.0) + point.seconds
        return {p: v for p, v in out.items() if self.filled((setting[0], p, *setting[2:])) == len(Explorer.GRID)}

    def filled(self, setting: Setting) -> int:
        return sum((k, *setting[1:]) in self.explorer.points for k in Explorer.GRID)

    def norm_strip(self, layer: int) -> str:
        key = (id(self.explorer), layer)
        if key not in self._strips:
            self._strips[key] = norm_strip_html(self.explorer.norms(layer), f"Key norms, layer {layer}")
        return self._strips[key]


def curve_svg(points: dict[Setting, GridPoint], setting: Setting, compare: str | None = None,
              width: int = 330, height: int = 150) -> str:
    """PPL and KL against keep_ratio (two small SVG panels) for every policy with a computed grid
    point at this skip set and position mode, the current policies drawn bold, the current
    keep_ratio marked. Plain SVG: drawn in well under a millisecond per point."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for (k, policy, skip, mode), p in points.items():
        if (skip, mode) == setting[2:]:
            lines.setdefault(policy, []).append((k, p.result.ppl, p.result.kl_mean))
    panels = []
    for title, index, log in (("PPL (log scale)", 1, True), ("KL to the full cache (nats/token)", 2, False)):
        values = [v[index] for line in lines.values() for v in line if math.isfinite(v[index])]
        if not values:
            panels.append(f'<svg width="{width}" height="{height}"><text x="10" y="20">{title}: computing…</text></svg>')
            continue
        f = (lambda v: math.log(max(v, 1e-12))) if log else (lambda v: v)
        lo, hi = f(min(values)), f(max(values))
        x = lambda k: 40 + (width - 50) * k
        y = lambda v: height - 25 - (height - 45) * ((f(v) - lo) / (hi - lo) if hi > lo else 0.5)
        svg = [f'<svg class="curve" width="{width}" height="{height}" style="font:10px sans-serif">',
               f'<text x="40" y="12">{title}</text>',
               f'<line x1="40" y1="{height - 25}" x2="{width - 10}" y2="{height - 25}" stroke="#888"/>',
               f'<text x="{width - 60}" y="{height - 8}">keep_ratio</text>',
               f'<text x="2" y="{height - 25}">{min(values):.3g}</text><text x="2" y="24">{max(values):.3g}</text>',
               f'<line x1="{x(setting[0]):.1f}" y1="16" x2="{x(setting[0]):.1f}" y2="{height - 25}" stroke="#000" '
               'stroke-dasharray="3,2"/>']
        for c, (policy, line) in enumerate(sorted(lines.items())):
            line = sorted(v for v in line if math.isfinite(v[index]))
            bold = policy in (setting[1], compare)
            pts = " ".join(f"{x(v[0]):.1f},{y(v[index]):.1f}" for v in line)
            svg.append(f'<polyline fill="none" stroke="{colours[c % len(colours)]}" stroke-width="{2.5 if bold else 1}" '
                       f'points="{pts}"><title>{policy}</title></polyline>')
            svg.append(f'<text x="{width - 70}" y="{24 + 11 * c}" fill="{colours[c % len(colours)]}">{policy}</text>')
        svg.append("</svg>")
        panels.append("".join(svg))
    return '<div class="quality-curve" style="display:flex;gap:12px">' + "".join(panels) + "</div>"


def norm_strip_html(norms: torch.Tensor, title: str = "") -> str:
    """Key norms ``(H_kv, positions)`` as rows of coloured cells (viridis, min to max), one row
    per KV head: plain HTML, so it renders the same in widgets, notebooks and browsers."""
    from matplotlib import colormaps

    lo, hi = float(norms.min()), float(norms.max())
    cmap = colormaps["viridis"]
    rows = []
    for head, row in enumerate(norms.tolist()):
        cells = "".join(
            '<span title="{:.2f}" style="flex:1;height:14px;background:#{:02x}{:02x}{:02x}"></span>'.format(
                v, *(int(255 * c) for c in cmap((v - lo) / (hi - lo + 1e-12))[:3])) for v in row)
        rows.append(f'<div style="display:flex;align-items:center"><span style="width:70px">KV head {head}</span>'
                    f'<div style="display:flex;flex:1">{cells}</div></div>')
    legend = f"<small>key L2 norm per context position: dark {lo:.1f} … bright {hi:.1f}</small>"
    return f'<div class="norm-strip"><b>{title}</b>{"".join(rows)}{legend}</div>'


def highlight_html(tokens: Sequence[str], kept: Sequence[bool], kept_b: Sequence[bool] | None = None,
                   names: tuple[str, str | None] = ("A", "B")) -> str:
    """The context as HTML: kept tokens highlighted (``class="kept"``), evicted ones struck through;
    with ``kept_b`` (a second policy), each token as kept by both, only by the first, only by the
    second, or by neither, with a legend."""
    import html as _html

    styles = {"kept": "background:#c7e9c0", "evicted": "color:#999;text-decoration:line-through",
              "only-a": "background:#9ecae1", "only-b": "background:#fdae6b"}
    spans = []
    for i, (tok, keep) in enumerate(zip(tokens, kept)):
        text = _html.escape(tok).replace("\n", "↵<br>")
        b = keep if kept_b is None else kept_b[i]
        cls = "kept" if keep and b else "evicted" if not (keep or b) else "only-a" if keep else "only-b"
        spans.append(f'<span class="{cls}" style="{styles[cls]}">{text}</span>')
    legend = "" if kept_b is None else (
        '<div class="legend"><small>' + " · ".join(
            f'<span style="{styles[c]}">{label}</span>' for c, label in
            (("kept", "kept by both"), ("only-a", f"only {names[0]}"), ("only-b", f"only {names[1]}"),
             ("evicted", "by neither"))) + "</small></div>")
    return legend + '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">' + "".join(spans) + "</div>"
