"""The interactive explorer (00_explore): prefill once per text, re-compress per slider move.

``Explorer`` holds one text's prefill; ``controls`` builds the notebook's widgets around it (ipywidgets
is imported there only); ``norm_strip_html`` and ``highlight_html`` render what a setting keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import knorm_lib as kl
from knorm_study import decode, quality


def default_text() -> str:
    """The explorer's default text: the longest wiki article."""
    return sorted(kl.load_corpus("wiki"), key=lambda d: -(d.n_tokens or 0))[0].text


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
        self.ref_logits = kl.Reference.of(kl.continuation_logits(model, self.pre.cache, self.new_ids))
        self.tokens = [tokenizer.decode([t]) for t in self.ids[0, :self.context_len].tolist()]
        self.reference_ids = decode.generate_greedy(model, self.ids[:, :self.context_len], n_generate, pre=self.pre)
        self._scores: dict[tuple, list] = {}

    def view(self, keep_ratio: float, policy: str = "knorm", skip_layers: Sequence[int] = (0, 1),
             position_mode: kl.PositionMode = "absolute", layer: int = 2, kv_head: int = 0,
             order: kl.Order = "original") -> ExplorerView:
        t0 = time.perf_counter()
        cfg = kl.EvalConfig(keep_ratio, policy, kl._check_layer_list("skip_layers", skip_layers), order, position_mode)
        cfg.validate(kl._n_layers(self.model))
        if not 0 <= layer < kl._n_layers(self.model):
            raise ValueError(f"layer={layer}: outside 0..{kl._n_layers(self.model) - 1}")
        if not 0 <= kv_head < self.pre.cache.keys[0].shape[1]:
            raise ValueError(f"kv_head={kv_head}: outside 0..{self.pre.cache.keys[0].shape[1] - 1}")
        if policy not in self._scores:
            self._scores[policy] = kl.policy_scores(self.pre.cache, policy, kl.PolicyOptions(), self.pre.layer_inputs)
        result, cache = kl.evaluate(self.model, self.pre, self.new_ids, self.targets, cfg, self.ref_logits,
                                    self._scores[policy])
        kept = torch.zeros(self.context_len, dtype=torch.bool)
        kept[cache.positions[layer][0, kv_head].cpu()] = True
        generated = decode.generate_greedy(self.model, self.ids[:, :self.context_len], self.n_generate, keep_ratio, policy,
                                       skip_layers, order, position_mode, pre=self.pre)
        return ExplorerView(self.tokens, kept.tolist(), kl._norms(self.pre.cache.keys[layer])[0].cpu(), result,
                            self.tokenizer.decode(generated), self.tokenizer.decode(self.reference_ids),
                            quality.generation_agreement(generated, self.reference_ids), time.perf_counter() - t0)


def controls(explorer: Explorer, keep_ratio: float, policy: str, skip_layers: Sequence[int],
             position_mode: str, layer: int, kv_head: int) -> tuple[Any, ExplorerView]:
    """The explorer's widgets, started at the given setting: sliders and menus re-render on every
    change, "prefill this text" builds a new ``Explorer`` for the edited text. Renders the first
    setting and returns the widget box (to ``display``) and that setting's ``ExplorerView``.

    Every display area is an HTML widget whose value is replaced on each update: Output widgets
    that are cleared and refilled can leave a headless papermill run waiting forever for the
    cell's reply (nbclient issue #312)."""
    import ipywidgets as widgets

    model = explorer.model
    step = Explorer.KEEP_RATIO_STEP
    w_keep = widgets.FloatSlider(value=keep_ratio, min=step, max=1.0, step=step, description="keep_ratio",
                                 continuous_update=False, readout_format=".2f")
    w_policy = widgets.Dropdown(options=sorted(kl.POLICIES.keys() - set(kl.DYNAMIC_POLICIES)) + sorted(kl.KVPRESS_POLICIES),
                                value=policy, description="policy")
    skip_options = [("(0, 1) paper", (0, 1)), ("() all layers", ()), ("(0,)", (0,))]
    if tuple(skip_layers) not in [value for _, value in skip_options]:
        skip_options.append((str(tuple(skip_layers)), tuple(skip_layers)))
    w_skip = widgets.Dropdown(options=skip_options, value=tuple(skip_layers), description="skip_layers")
    w_mode = widgets.Dropdown(options=list(kl.POSITION_MODES), value=position_mode, description="positions")
    w_layer = widgets.IntSlider(value=layer, min=0, max=kl._n_layers(model) - 1, description="layer",
                                continuous_update=False)
    w_head = widgets.IntSlider(value=kv_head, min=0, max=model.config.num_key_value_heads - 1, description="KV head",
                               continuous_update=False)
    w_text = widgets.Textarea(value=explorer.text[:3000], layout=widgets.Layout(width="100%", height="80px"))
    w_apply = widgets.Button(description="prefill this text")
    status, metrics_out, text_out, norms_out, gen_out = (widgets.HTML() for _ in range(5))
    current = {"explorer": explorer}

    def render(*_: Any) -> ExplorerView:
        ex = current["explorer"]
        status.value = "<b>working…</b>"
        view = ex.view(w_keep.value, w_policy.value, w_skip.value, w_mode.value, w_layer.value, w_head.value)
        r = view.result
        metrics_out.value = (f'<div id="metrics">PPL <b class="ppl">{r.ppl:.3f}</b> · next-token accuracy '
                             f"{r.next_token_acc:.3f} · KL to full cache {r.kl_mean:.4f} nats/token · top-1 agreement "
                             f'{r.top1_agree:.3f} · kept <b class="n-kept">{r.n_kept}</b> of {ex.context_len} context '
                             f"tokens per head</div>")
        text_out.value = highlight_html(view.tokens, view.kept)
        norms_out.value = norm_strip_html(view.norms, f"Key norms, layer {w_layer.value}")
        gen_out.value = (f"<table><tr><th>compressed cache</th><th>full cache</th></tr><tr>"
                         f"<td style='vertical-align:top'>{view.continuation}</td>"
                         f"<td style='vertical-align:top'>{view.reference_continuation}</td></tr></table>"
                         f"matching prefix {view.agreement['matching_prefix']} tokens, "
                         f"agreement {view.agreement['token_agreement']:.2f}")
        status.value = f'<span id="status">updated in {view.seconds:.2f} s</span>'
        return view

    def new_text(_: Any) -> None:
        status.value = "<b>prefilling…</b>"
        ex = current["explorer"]
        current["explorer"] = Explorer(ex.model, ex.tokenizer, w_text.value, max_tokens=ex.max_tokens)
        render()

    for w in (w_keep, w_policy, w_skip, w_mode, w_layer, w_head):
        w.observe(render, names="value")
    w_apply.on_click(new_text)
    box = widgets.VBox([widgets.HBox([w_keep, w_policy, w_skip]), widgets.HBox([w_mode, w_layer, w_head]),
                        w_text, widgets.HBox([w_apply, status]), metrics_out, gen_out, norms_out, text_out])
    return box, render()


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


def highlight_html(tokens: Sequence[str], kept: Sequence[bool]) -> str:
    """The context as HTML, kept tokens highlighted (``class="kept"``), evicted ones struck through."""
    import html as _html

    spans = []
    for tok, keep in zip(tokens, kept):
        text = _html.escape(tok).replace("\n", "↵<br>")
        cls, style = ("kept", "background:#c7e9c0") if keep else ("evicted", "color:#999;text-decoration:line-through")
        spans.append(f'<span class="{cls}" style="{style}">{text}</span>')
    return '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">' + "".join(spans) + "</div>"
