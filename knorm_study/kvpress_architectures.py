"""kvpress's KnormPress against knorm_lib's, layer by layer, on Gemma 3 and Qwen 3 (issue #38, item 7).

Tiny random-weight float64 models (no download), 64 tokens, window 16, keep ratio 0.5. kvpress runs
as its README shows (``with press(model): model(input_ids, past_key_values=cache)``) on four caches:
``DynamicCache()``; ``DynamicCache(config=model.config)`` (transformers' sliding layers, which hold
only the last ``window - 1`` entries of a local layer); no cache passed (the README's own example:
the model builds ``DynamicCache(config=...)``); and kvpress's ``KVPressTextGenerationPipeline``
itself (its ``_forward``, which builds ``DynamicCache()``). kvpress's kept set per layer and KV head
is recovered by matching each compressed key row, exactly, to the uncompressed prefill's rows (same
weights, transformers' ``sdpa``); knorm_lib's is ``kl.prefill`` + ``kl.compress_cache`` with
``kl.layers_to_skip(model, (), "all")`` and ``(..., "global")``. A two-token question after the
prefill, fed as kvpress's pipeline feeds it (true ``position_ids``, no ``cache_position``), says
whether the compressed cache still runs and, per layer, which stored keys the first new query reads.

Families: ``gemma3_text`` (``Gemma3ForCausalLM``, the text-only class), ``gemma3``
(``Gemma3ForConditionalGeneration`` on text only with the same language-model weights: the class
kvpress skips sliding layers for; knorm_lib runs the text-only model), ``qwen3`` (no window) and
``qwen3_sliding`` (``use_sliding_window=True``, ``max_window_layers=1``).

    python -m knorm_study.kvpress_architectures    # one JSON line; KNORM_RESULTS_DIR=data/results to commit it
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

import knorm_lib as kl
from knorm_study import runtime

N_TOKENS = 64
WINDOW = 16
KEEP_RATIO = 0.5           # kvpress compression_ratio = 1 - KEEP_RATIO
VOCAB = 256
# "no cache passed": the README's own example (``model(inputs)``), the model then builds its cache;
# "kvpress pipeline": KVPressTextGenerationPipeline's own prefill and answer (its cache, read back after)
CACHE_KINDS: tuple[str, ...] = ("DynamicCache()", "DynamicCache(config)", "no cache passed", "kvpress pipeline")
_S, _F = "sliding_attention", "full_attention"
GEMMA_LAYER_TYPES = [_S, _S, _F, _S, _S, _F]

_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, vocab_size=VOCAB,
               max_position_embeddings=512, tie_word_embeddings=False)
FAMILIES: dict[str, dict[str, Any]] = {
    "gemma3_text": dict(model_type="gemma3_text", num_hidden_layers=6, num_key_value_heads=1,
                        sliding_window=WINDOW, query_pre_attn_scalar=16, layer_types=GEMMA_LAYER_TYPES),
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=6, num_key_value_heads=1,
                   sliding_window=WINDOW, query_pre_attn_scalar=16, layer_types=GEMMA_LAYER_TYPES),
    "qwen3": dict(model_type="qwen3", num_hidden_layers=4, num_key_value_heads=2),
    "qwen3_sliding": dict(model_type="qwen3", num_hidden_layers=4, num_key_value_heads=2,
                          use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}


def _check_family(family: str) -> None:
    kl._check_choice("family", family, tuple(FAMILIES))


def build(family: str) -> tuple[Any, Any]:
    """``(ours, theirs)``: a tiny random-weight float64 model with knorm_lib's attention, and the same
    weights in the class kvpress is handed (``Gemma3ForConditionalGeneration`` for ``gemma3``), with
    transformers' ``sdpa``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_family(family)
    fields = dict(FAMILIES[family])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **{**_COMMON, **fields})
    kl._register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    with torch.no_grad():   # as tests/helpers.tiny_family: norms around 1, attention far from uniform
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.2)
    theirs = _multimodal(model) if family == "gemma3" else copy.deepcopy(model)
    theirs.set_attn_implementation("sdpa")
    model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)
    kl.check_supported(model)
    return model, theirs


def _multimodal(text_model: Any) -> Any:
    """A ``Gemma3ForConditionalGeneration`` (a one-layer SigLIP tower, never used) whose language
    model and head are ``text_model``'s."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text_model.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                       tie_word_embeddings=False)   # tied, loading the head would overwrite the embeddings
    mm = Gemma3ForConditionalGeneration(cfg).to(torch.float64).eval()
    mm.model.language_model.load_state_dict(text_model.model.state_dict())
    mm.lm_head.load_state_dict(text_model.lm_head.state_dict())
    return mm


def input_ids() -> torch.Tensor:
    """``N_TOKENS`` random ids below the Gemma 3 multimodal special tokens."""
    return torch.randint(0, VOCAB - 3, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))


def _cache(kind: str, model: Any) -> Any:
    from transformers import DynamicCache

    return {"DynamicCache()": DynamicCache, "DynamicCache(config)": lambda: DynamicCache(config=model.config),
            "no cache passed": lambda: None}[kind]()


class _Warnings(logging.Handler):
    """What kvpress logs, first sentence (``warning_once`` messages: once per process only)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split(",")[0])


class _Tokenizer:
    """What KVPressTextGenerationPipeline reads of a tokenizer once the ids are given."""
    model_max_length = 10 ** 6
    chat_template = None

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids.tolist()))


@dataclass
class Run:
    """One prefill (kvpress's press or none) and the continuation after it."""
    layer_classes: list[str]                 # the cache's layer classes after the prefill
    keys: list[torch.Tensor]                 # per layer, the keys the cache holds after the prefill
    continuation: str                        # "ok" or the error the continuation raised
    reads: dict[int, list[int] | None]       # per layer, the cache slots the first new query may read (None: all)
    warnings: list[str] = field(default_factory=list)   # what kvpress logged


class _Spy:
    """Forward pre-hooks on every attention layer: while ``armed``, record per layer the cache slots
    (of ``n_cached[layer]``) the attention mask lets the first query read."""

    def __init__(self, model: Any) -> None:
        self.armed, self.reads, self.n_cached = False, {}, {}
        self.handles = [layer.self_attn.register_forward_pre_hook(self.hook, with_kwargs=True)
                        for layer in _layers(model)]

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.armed:
            return
        mask, n = kwargs.get("attention_mask"), self.n_cached[module.layer_idx]
        if mask is None:
            self.reads[module.layer_idx] = None
            return
        row = mask[0, 0, 0]
        visible = row if row.dtype == torch.bool else row == 0
        self.reads[module.layer_idx] = [j for j in range(min(n, visible.shape[0])) if bool(visible[j])]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layers(model: Any) -> Any:
    return model.model.language_model.layers if hasattr(model.model, "language_model") else model.model.layers


@torch.no_grad()
def run(model: Any, ids: torch.Tensor, kind: str, press: Any = None) -> Run:
    """Prefill ``ids`` into a fresh cache of ``kind`` under ``press`` (kvpress's context manager, as its
    README's "How does a press work"), then continue as kvpress's pipeline does: a two-token question
    (``ids[:, :2]``) at true ``position_ids`` after the context, no ``cache_position``.
    ``"kvpress pipeline"``: the pipeline's own ``_forward`` on these ids (what its ``preprocess`` would
    give), two answer tokens; its cache is read when its question starts."""
    q = ids[:, :2]
    spy, snapshot, handler = _Spy(model), {}, _Warnings()
    log = logging.getLogger("kvpress.presses.base_press")
    log.addHandler(handler)

    def take(cache: Any) -> None:
        snapshot["classes"] = [type(layer).__name__ for layer in cache.layers]
        snapshot["keys"] = [layer.keys for layer in cache.layers]   # an update replaces, never mutates, them
        spy.n_cached = {i: k.shape[2] for i, k in enumerate(snapshot["keys"])}
        spy.armed = True

    status = "ok"
    try:
        if kind == "kvpress pipeline":
            from kvpress import KVPressTextGenerationPipeline

            calls: list[int] = []

            def on_forward(module: Any, args: tuple, kwargs: dict) -> None:
                calls.append(1)
                if len(calls) == 2:     # the question's forward: the prefill is done
                    take(kwargs["past_key_values"])
                else:
                    spy.armed = False

            hook = model.model.register_forward_pre_hook(on_forward, with_kwargs=True)
            try:
                pipe = KVPressTextGenerationPipeline(model=model, tokenizer=_Tokenizer())
                pipe._forward({"context_ids": ids, "questions_ids": [q]}, max_new_tokens=2, press=press)
            except Exception as err:  # noqa: BLE001 - the failure is the measurement
                status = f"{type(err).__name__}: {err}"
            finally:
                hook.remove()
        else:
            with press(model) if press is not None else contextlib.nullcontext():
                cache = model(input_ids=ids, past_key_values=_cache(kind, model), use_cache=True).past_key_values
            take(cache)
            try:
                model(input_ids=q, past_key_values=cache,
                      position_ids=torch.arange(ids.shape[1], ids.shape[1] + q.shape[1])[None])
            except Exception as err:  # noqa: BLE001 - the failure is the measurement
                status = f"{type(err).__name__}: {err}"
    finally:
        spy.remove()
        log.removeHandler(handler)
    return Run(snapshot["classes"], snapshot["keys"], status, dict(spy.reads), handler.messages)


def _layer_types(model: Any) -> list[str]:
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    return list(types) if types is not None else [_F] * cfg.num_hidden_layers


def knorm_press() -> Any:
    """kvpress's own KnormPress at this study's ratio."""
    from kvpress import KnormPress

    return KnormPress(compression_ratio=1 - KEEP_RATIO)


def kept_positions(compressed: torch.Tensor, full: torch.Tensor) -> list[list[int]]:
    """Per KV head, the position (row of ``full`` ``(1, H, S, D)``) of each row of ``compressed``
    ``(1, H, k, D)``, in storage order, by exact equality; every row must match exactly one."""
    out = []
    for h in range(full.shape[1]):
        eq = (compressed[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)   # (k, S)
        hits = eq.sum(1)
        if not bool((hits == 1).all()):
            raise AssertionError(f"head {h}: {int((hits != 1).sum())} compressed rows match "
                                 "no or several uncompressed rows")
        out.append(eq.double().argmax(1).tolist())
    return out


def _order(positions: list[int], keys: torch.Tensor) -> str:
    """How ``keys`` ``(k, D)`` (at ``positions``) are stored: by position, by ascending norm, or neither."""
    norms = keys.norm(dim=-1).tolist()
    if positions == sorted(positions):
        return "position"
    if norms == sorted(norms):
        return "ascending key norm"
    return "other"


def compare(family: str) -> list[dict]:
    """One row per cache kind and layer: what kvpress's KnormPress kept against knorm_lib's kept sets
    under ``compress="all"`` and ``"global"``, and what the continuation makes of it (module docstring)."""
    from kvpress.presses.base_press import SUPPORTED_MODELS

    _check_family(family)
    ours, theirs = build(family)
    ids = input_ids()
    full = run(theirs, ids, "DynamicCache()").keys          # every position, every layer
    pre = kl.prefill(ours, ids)
    keys_diff = max((a - b).abs().max().item() for a, b in zip(pre.cache.keys, full))
    library = {scope: kl.compress_cache(pre.cache, KEEP_RATIO, "knorm", skip_layers=kl.layers_to_skip(ours, (), scope))
               for scope in kl.LAYER_SCOPES}
    lib_sets = {scope: [_sets(p) for p in c.positions] for scope, c in library.items()}
    in_window = range(N_TOKENS - WINDOW + 1, N_TOKENS)   # what position N_TOKENS's window reads of the cache,
    last = slice(in_window.start, in_window.stop)        # = what transformers' sliding cache layer holds
    held = kl.KVCache([k[:, :, last] for k in pre.cache.keys], [v[:, :, last] for v in pre.cache.values],
                      [p[:, :, last] for p in pre.cache.positions], N_TOKENS)
    window_sets = [_sets(p) for p in kl.compress_cache(held, KEEP_RATIO, "knorm", skip_layers=()).positions]
    types = _layer_types(theirs)
    sliding = set(kl.sliding_layers(ours))
    assert sliding == {i for i, t in enumerate(types) if t == _S}, "knorm_lib and the config disagree on windows"

    def counts(sets: list[list[int]]) -> list[int]:
        return [sum(p in in_window for p in s) for s in sets]

    rows = []
    for kind in CACHE_KINDS:
        plain, pressed = run(theirs, ids, kind), run(theirs, ids, kind, knorm_press())
        for i, keys in enumerate(pressed.keys):
            stored = kept_positions(keys, full[i])               # per head, in storage order
            kv_sets = [sorted(p) for p in stored]
            win = i in sliding
            reads = None
            if pressed.continuation == "ok":
                slots = pressed.reads[i]
                reads = [[st[j] for j in (range(len(st)) if slots is None else slots)] for st in stored]
            rows.append({
                "family": family, "model_class": type(theirs).__name__,
                "kvpress_tested_class": isinstance(theirs, SUPPORTED_MODELS), "kvpress_warnings": pressed.warnings,
                "layer": i, "layer_type": types[i], "cache_kind": kind, "cache_layer_class": pressed.layer_classes[i],
                "n_before": plain.keys[i].shape[2], "kvpress_kept": keys.shape[2],
                "kvpress_compressed": keys.shape[2] < plain.keys[i].shape[2],
                "library_kept_all": library["all"].keys[i].shape[2],
                "library_kept_global": library["global"].keys[i].shape[2],
                "same_set_as_all": kv_sets == lib_sets["all"][i],
                "same_set_as_global": kv_sets == lib_sets["global"][i],
                # sliding layers: what the next query's window can read of each kept set (positions 49..63)
                "same_in_window_as_all": _in(kv_sets, in_window) == _in(lib_sets["all"][i], in_window) if win else None,
                "same_in_window_as_global": (_in(kv_sets, in_window) == _in(lib_sets["global"][i], in_window)
                                             if win else None),
                # knorm over the window - 1 keys a sliding cache layer holds (positions 49..63)
                "same_set_as_knorm_of_last_window": kv_sets == window_sets[i] if win else None,
                "kvpress_storage_order": _order(stored[0], keys[0, 0]),
                "window_limit": WINDOW - 1 if win else None,
                "holds_window_limit": keys.shape[2] == WINDOW - 1 if win else None,
                "kvpress_kept_in_window": counts(kv_sets) if win else None,
                "library_all_kept_in_window": counts(lib_sets["all"][i]) if win else None,
                "continuation": pressed.continuation,
                "continuation_without_press": plain.continuation,
                "continuation_reads": None if reads is None else [len(r) for r in reads],
                "continuation_reads_in_window": counts(reads) if reads is not None and win else None,
                "library_keys_max_abs_diff": keys_diff,
            })
    return rows


def _sets(positions: torch.Tensor) -> list[list[int]]:
    """Per KV head, the sorted positions of ``positions`` ``(1, H, k)``."""
    return [sorted(positions[0, h].tolist()) for h in range(positions.shape[1])]


def _in(sets: list[list[int]], window: range) -> list[list[int]]:
    return [[p for p in s if p in window] for s in sets]


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Per cache kind: entries before and after, the fraction removed, which layer types kvpress
    compressed, whether its kept sets equal knorm_lib's (all / global scope) and the continuation's fate."""
    out: dict[str, Any] = {}
    for kind in CACHE_KINDS:
        rs = [r for r in rows if r["cache_kind"] == kind]
        before, after = sum(r["n_before"] for r in rs), sum(r["kvpress_kept"] for r in rs)
        by_type = {t: [r for r in rs if r["layer_type"] == t] for t in (_S, _F)}
        out[kind] = {
            "entries_before": before, "entries_after": after, "removed_fraction": 1 - after / before,
            "layers_compressed": {t: f"{sum(r['kvpress_compressed'] for r in v)}/{len(v)}" for t, v in by_type.items() if v},
            "same_set_as_all": {t: all(r["same_set_as_all"] for r in v) for t, v in by_type.items() if v},
            "same_set_as_global": {t: all(r["same_set_as_global"] for r in v) for t, v in by_type.items() if v},
            **{key: all(r[key] for r in by_type[_S]) for key in ("same_in_window_as_all", "same_in_window_as_global",
                                                                  "same_set_as_knorm_of_last_window") if by_type[_S]},
            "continuation": rs[0]["continuation"],
            "continuation_without_press": rs[0]["continuation_without_press"],
        }
    return out


def headline(rows: list[dict]) -> dict[str, str]:
    """Per cache kind, one phrase: the share of entries removed, the sliding layers kvpress compressed
    and which knorm_lib kept set its own equals there, and whether the question after it runs."""
    out = {}
    for kind, s in summarize(rows).items():
        sliding = s["layers_compressed"].get(_S)
        def holds(key: str) -> bool:   # per layer type in the summary, or (sliding only) one flag
            value = s.get(key)
            return bool(value.get(_S) if isinstance(value, dict) else value)

        same = next((what for key, what in (("same_set_as_all", "compress='all'"),
                                             ("same_set_as_global", "compress='global'"),
                                             ("same_in_window_as_global", "compress='global' in the window"),
                                             ("same_set_as_knorm_of_last_window", "knorm of the last window - 1"))
                     if holds(key)), "neither scope")
        where = f"sliding {sliding} compressed, kept sets = {same}; " if sliding else "no sliding layers; "
        glob = "global = library" if s["same_set_as_all"][_F] else "global != library"
        out[kind] = (f"{s['removed_fraction']:.1%} removed, {where}{glob}; continuation "
                     f"{'ok' if s['continuation'] == 'ok' else s['continuation'].split(':')[0]}")
    return out


def report_section(record: dict[str, Any]) -> str:
    """REPORT.md's finding, every number read from ``record`` (this module's JSON): per family and
    cache, what kvpress's KnormPress removed, which layers it compressed, which of knorm_lib's kept
    sets its own equals, and whether the continuation after it runs; then what kvpress promises."""
    cfg, fams = record["config"], record["numbers"]["per_family"]
    lines = ["| model | cache | removed | sliding layers compressed | kept sets equal knorm_lib's | continuation |",
             "|---|---|---|---|---|---|"]
    for family, result in fams.items():
        for kind, phrase in record["numbers"]["headline"][family].items():
            s = result["summary"][kind]
            same = phrase.split("kept sets = ")[1].split(";")[0] if "kept sets = " in phrase else "every layer (no window)"
            lines.append(f"| {result['model_class']} ({family}) | {kind} | {s['removed_fraction']:.1%} | "
                         f"{s['layers_compressed'].get(_S, '—')} | {same} | "
                         f"{'runs' if s['continuation'] == 'ok' else s['continuation'].split(':')[0]} |")
    text = fams["gemma3_text"]["summary"]
    plain, sliding_cache = text["DynamicCache()"], text["DynamicCache(config)"]
    docs = cfg["kvpress_docs"]
    local = [r for r in fams["gemma3_text"]["rows"] if r["cache_kind"] == "DynamicCache()" and r["layer_type"] == _S]
    reads = (f" It stores the kept keys by {local[0]['kvpress_storage_order']}, and a window counts storage slots: "
             f"each local layer's next query reads {', '.join(str(r['continuation_reads'][0]) for r in local)} slots, "
             f"of which {', '.join(str(r['continuation_reads_in_window'][0]) for r in local)} hold keys inside the true "
             f"window, where knorm_lib's window reads {', '.join(str(r['library_all_kept_in_window'][0]) for r in local)}"
             f" (layers {', '.join(str(r['layer']) for r in local)}).") if local and local[0]["continuation_reads"] else ""
    return (f"## kvpress's KnormPress on Gemma 3 and Qwen 3 (random weights)\n\n"
            f"`python -m knorm_study.kvpress_architectures`: kvpress {cfg['kvpress_version']}, transformers "
            f"{cfg['transformers_version']}, {cfg['tokens']} tokens, window {cfg['sliding_window']}, compression_ratio "
            f"{cfg['kvpress_compression_ratio']}, {cfg['dtype']}; kvpress's kept sets recovered by matching key rows.\n\n"
            + "\n".join(lines) + "\n\n"
            f"On the text-only `Gemma3ForCausalLM` with the cache kvpress's pipeline builds, kvpress compresses "
            f"{plain['layers_compressed'][_S]} sliding-window layers and removes {plain['removed_fraction']:.1%} of the "
            f"entries: knorm_lib's compress='all', {'not' if not plain['same_set_as_global'][_S] else 'and'} its "
            f"compress='global'.{reads} Its warning \"{docs['gemma3_warning']}\" and the skip behind it apply to "
            f"`Gemma3ForConditionalGeneration` only. Where transformers' own sliding cache holds a local layer "
            f"(`DynamicCache(config)`), kvpress removes {sliding_cache['removed_fraction']:.1%} and the continuation "
            f"after it {'runs' if sliding_cache['continuation'] == 'ok' else 'fails (' + sliding_cache['continuation'].split(':')[0] + ')'}"
            f". kvpress promises \"{docs['compression_ratio']}\" and \"{docs['readme_memory']}\"; on "
            f"`Gemma3ForConditionalGeneration` with its pipeline's cache it removed "
            f"{fams['gemma3']['summary']['kvpress pipeline']['removed_fraction']:.1%}.\n")


# What kvpress 0.5.5 says, word for word (README "Which models are supported ?", "What are the memory
# and throughput gains ?"; ScorerPress docstring; BasePress.__call__'s warning, which it logs for
# Gemma3ForConditionalGeneration only)
KVPRESS_DOCS = {
    "readme_supported_models": "We tested support for `LlamaForCausalLM`, `MistralForCausalLM`, `Phi3ForCausalLM`, "
                               "`Qwen2ForCausalLM`, `Qwen3ForCausalLM`, and `Gemma3ForCausalLM`",
    "readme_memory": "Memory usage should be reduced by around `compression_ratio * kv_cache_size`.",
    "compression_ratio": "Fraction of key-value pairs to remove during compression.",
    "gemma3_warning": "Compression in Gemma3 is only applied to layer without sliding window attention",
}


def main() -> None:
    from importlib.metadata import version

    import transformers

    numbers: dict[str, Any] = {"headline": {}, "per_family": {}}
    shared = ("family", "model_class", "kvpress_tested_class", "kvpress_warnings", "library_keys_max_abs_diff",
              "continuation", "continuation_without_press")   # per family or cache kind: not repeated per row
    for family in FAMILIES:
        rows = compare(family)
        numbers["headline"][family] = headline(rows)
        numbers["per_family"][family] = {
            "model_class": rows[0]["model_class"], "kvpress_tested_class": rows[0]["kvpress_tested_class"],
            "kvpress_warnings": sorted({w for r in rows for w in r["kvpress_warnings"]}),
            "library_keys_max_abs_diff": max(r["library_keys_max_abs_diff"] for r in rows),
            "summary": summarize(rows), "rows": [{k: v for k, v in r.items() if k not in shared} for r in rows]}
    line = {
        "what": "kvpress KnormPress kept sets vs knorm_lib's, per layer, on Gemma 3 and Qwen 3 (random weights)",
        "config": {"tokens": N_TOKENS, "sliding_window": WINDOW, "keep_ratio": KEEP_RATIO,
                   "kvpress_compression_ratio": 1 - KEEP_RATIO, "dtype": "float64", "cache_kinds": list(CACHE_KINDS),
                   "families": FAMILIES, "common": _COMMON, "kvpress_attention": "sdpa",
                   "library_attention": kl.ATTN_IMPLEMENTATION,
                   "kvpress_version": version("kvpress"), "transformers_version": transformers.__version__,
                   "kvpress_docs": KVPRESS_DOCS},
        "numbers": numbers,
        "machine": runtime.machine_info(),
    }
    print(json.dumps(line))
    runtime.write_json_atomic(runtime.RESULTS_DIR / "benchmarks" / "kvpress_architectures.json", line)


if __name__ == "__main__":
    main()
