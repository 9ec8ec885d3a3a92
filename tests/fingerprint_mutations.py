"""The mutation test's list (tests/study/test_fingerprint.py): one-line behaviour-changing
mutations, each of which the behavioural identity must flag for every unit (notebook or recording
script) whose records depend on the mutated module, and behaviour-preserving refactors, which it
must flag for none. Each edit replaces text that occurs exactly once in its file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from knorm_study import fingerprint


@dataclass(frozen=True)
class Edit:
    file: str        # relative to the project root
    old: str         # occurs exactly ``count`` times in the file; each is replaced ("": a new file)
    new: str
    count: int = 1


@dataclass(frozen=True)
class Mutation:
    what: str
    edit: Edit

    @property
    def module(self) -> str:
        """The module whose probes must catch it: ``knorm_lib`` (any of its modules, and the modules
        whose names it re-exports) or a knorm_study module's name."""
        name = self.edit.file.removeprefix("knorm_study/").removesuffix(".py")
        return fingerprint.CORE if name.startswith("knorm_lib/") or name in fingerprint.CORE_PARTS else name


@dataclass(frozen=True)
class Refactor:
    what: str
    edits: tuple[Edit, ...]


def M(file: str, old: str, new: str, what: str) -> Mutation:
    return Mutation(what, Edit(file, old, new))


# knorm_lib's modules, in reading order
CHECKS, ATTENTION, POLICIES, COMPRESSION, METRICS, PREFILL, STREAMING = (
    f"knorm_lib/{name}.py" for name in ("checks", "attention", "policies", "compression", "metrics",
                                        "prefill_protocol", "streaming_protocol"))
MUTATIONS: list[Mutation] = [
    M(COMPRESSION, "by_position = positions.argsort(dim=-1, descending=True, stable=True)",
      "by_position = positions.argsort(dim=-1, descending=False, stable=True)", "tie rule reversed: the oldest kept"),
    M(POLICIES, "return -_norms(kv.keys)", "return _norms(kv.keys)", "knorm keeps the highest norms"),
    M(COMPRESSION, "return max(1, int(n * (1 - compression_ratio)))", "return max(1, math.ceil(n * (1 - compression_ratio)))",
      "n_kept: floor -> ceil"),
    M(STREAMING, "length = math.ceil(keep_ratio * length)", "length = math.floor(keep_ratio * length)",
      "bursts: ceil -> floor"),
    M(ATTENTION, "(j <= t) & (t <= evict.view(n_heads, 1, n))", "(j <= t) & (t < evict.view(n_heads, 1, n))",
      "streaming mask: evicted one step early (off by one)"),
    M(STREAMING, "        if layer_idx in skip:\n            return None", "        if layer_idx in skip and layer_idx > 0:\n            return None",
      "one-pass engine drops skip layer 0"),
    M(POLICIES, "return budget // 2   # H2O's", "return budget // 2 + 1   # H2O's", "h2o: recent share off by one"),
    M(POLICIES, "torch.where(kv.positions < opts.n_sink,", "torch.where(kv.positions <= opts.n_sink,", "streaming: one sink too many"),
    M(POLICIES, "seed * 0x27D4EB2F", "seed * 0x27D4EB2E", "random policy: another seed mixing"),
    M(PREFILL, "    seed: int = 0\n    n_sink: int = 4\n\n    def validate", "    seed: int = 0\n    n_sink: int = 2\n\n    def validate",
      "EvalConfig's default n_sink 4 -> 2"),
    M(METRICS, "- ref_lse + lse", "- ref_lse", "KL drops the log-partition term"),
    M(STREAMING, "return torch.cat([torch.zeros(1, dtype=torch.long), budget[:-1]])", "return budget.clone()",
      "cache_relative query positions off by one step"),
    M(COMPRESSION, "return keys.gather(2, gather_idx), values.gather(2, gather_idx)",
      "return keys.gather(2, gather_idx), keys.gather(2, gather_idx)", "kept values gathered from the keys"),
    M(COMPRESSION, 'idx = idx.gather(-1, _norms(keys).gather(-1, idx).argsort(dim=-1, stable=True))',
      'idx = idx.gather(-1, _norms(keys).gather(-1, idx).argsort(dim=-1, descending=True, stable=True))',
      "by_norm storage order reversed"),
    M(STREAMING, "while window and window[0] <= t - recent_window:", "while window and window[0] < t - recent_window:",
      "recent window one token wider"),
    M(COMPRESSION, "rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)",
      "rotated_half = torch.cat((keys[..., half:], -keys[..., :half]), dim=-1)", "re-rotation turns the wrong way"),
    M(PREFILL, "    start = min(cache.lengths())\n    return replace(", "    start = max(cache.lengths())\n    return replace(",
      "cache_relative numbers from the longest layer"),
    M(STREAMING, '"mean_cache_fraction": compressed * kept_fraction + (1 - compressed)}',
      '"mean_cache_fraction": compressed * kept_fraction}', "cache fraction forgets the skipped layers"),
    M(PREFILL, "if len(set(skip_layers)) >= _n_layers(model):", "if len(set(skip_layers)) > _n_layers(model):",
      "n_kept reported when every layer is skipped"),
    M("knorm_study/texts.py", "key=lambda d: (-(d.n_tokens or 0), d.title)", "key=lambda d: ((d.n_tokens or 0), d.title)",
      "long_documents takes the shortest articles"),
    M("knorm_study/texts.py", 'add_special_tokens=False', 'add_special_tokens=True', "encode adds special tokens"),
    M(COMPRESSION, "layer_type = model.config.layer_types[layer_idx] if layer_types else None",
      "layer_type = model.config.layer_types[0] if layer_types else None", "re-rotation with the first layer's RoPE everywhere"),
    M(POLICIES, "return -_norms(kv.keys if before is None else before)", "return -_norms(kv.keys)",
      "knorm_prenorm scores the normalised key"),
    M(POLICIES, "return keys.view(*keys.shape[:2], kv.keys.shape[1], -1).transpose(1, 2)",
      "return keys.view(*keys.shape[:2], -1, kv.keys.shape[1]).transpose(1, 2)", "knorm_prenorm: heads and dims swapped"),
    M(ATTENTION, "visible = (seen >= 0) & (seen < window)", "visible = (seen >= 0) & (seen <= window)",
      "a window one key wider in the prefill protocol's continuation"),
    M(ATTENTION, "visible &= (pos[start:stop].view(1, -1, 1) - pos[:n].view(1, 1, n)) < window[0]",
      "visible &= (pos[start:stop].view(1, -1, 1) - pos[:n].view(1, 1, n)) < window[0] + 1",
      "a window one key wider in the one-pass engine"),
    M(STREAMING, "seen = max(0, t + 1 - window) if window else 0", "seen = 0",
      "h2o's one-pass replay ignores the window"),
    M(COMPRESSION, "return tuple(sorted(skip | set(sliding_layers(model)) if compress == \"global\" else skip))",
      "return tuple(sorted(skip))", "layers_to_skip: the global rule compresses the local layers too"),
    M(COMPRESSION, "pos.shape[0] * pos.shape[1] * min(seq_len, window - 1)", "pos.shape[0] * pos.shape[1] * min(seq_len, window)",
      "footprint: a local layer offers its whole window"),
    M(ATTENTION, "visible &= visible.flip(-1).cumsum(-1).flip(-1) <= window[0]",
      "visible &= visible.flip(-1).cumsum(-1).flip(-1) < window[0]", "one pass by cache slots: a window one key short"),
    M(PREFILL, "return replace(cache, positions=[_slots(p, start) for p in cache.positions]), start", "return cache, start",
      "cache_relative continuation: a window over true positions instead of cache slots"),
    M(POLICIES, "return [p for p in policies if p not in LAYER_INPUT_POLICIES or has_qk_norm(model)]",
      "return [p for p in policies if p not in LAYER_INPUT_POLICIES or not has_qk_norm(model)]",
      "applicable_policies: knorm_prenorm only where there is no QK-norm"),
    M(STREAMING, 'cache.knorm_positions = [p if p is None or cfg.position_mode == "absolute" else _slots(p, position)',
      "cache.knorm_positions = [p if True else _slots(p, position)",
      "sequential engine: a cache-length numbering's window over true positions"),
]

_INTERVALS = (Path(__file__).resolve().parents[1] / "knorm_study" / "intervals.py").read_text()
_BOOTSTRAP = _INTERVALS[_INTERVALS.index("def paired_bootstrap("):_INTERVALS.index("def paired_by_unit(")]
_KV_BYTES = "2 * model.config.num_key_value_heads * _head_dim(model) * next(model.parameters()).element_size()"
REFACTORS: list[Refactor] = [
    Refactor("a local renamed (eviction_steps' caps -> capacity)", (Edit(STREAMING, "caps", "capacity", count=7),)),
    Refactor("an expression factored into a helper (KV bytes per token)", (
        Edit(STREAMING, f"kv_bytes_per_token = {_KV_BYTES}", "kv_bytes_per_token = _kv_bytes_per_token(model)"),
        Edit(STREAMING, "def _nothing_evicted(", f"def _kv_bytes_per_token(model: Any) -> int:\n    return {_KV_BYTES}\n\n\n"
                                        "def _nothing_evicted("))),
    Refactor("reformatting (one return spread over lines)", (
        Edit(COMPRESSION, "return max(1, int(n * (1 - compression_ratio)))",
             "return max(\n        1,\n        int(n * (1 - compression_ratio)),\n    )"),)),
    Refactor("a docstring and a comment rewritten", (
        Edit(POLICIES, '"""KnormPress: keep the lowest key norms."""', '"""KnormPress: the lowest key norms are kept."""'),
        Edit(POLICIES, "# float32 on purpose", "# in float32, on purpose"))),
    Refactor("a loop as a generator expression (_first_compressed)", (
        Edit(PREFILL, "    skip, i = set(skip_layers), 0\n    while i in skip:\n        i += 1\n    return i",
             "    skip = set(skip_layers)\n    return next(i for i in range(len(skip) + 1) if i not in skip)"),)),
    Refactor("a function moved to another module (intervals.paired_bootstrap -> knorm_study/bootstrap.py)", (
        Edit("knorm_study/intervals.py", _BOOTSTRAP, "from knorm_study.bootstrap import paired_bootstrap  # noqa: E402\n\n\n"),
        Edit("knorm_study/bootstrap.py", "", '"""The paired bootstrap."""\nfrom __future__ import annotations\n\n'
             "import math\nfrom typing import Any, Sequence\n\nimport knorm_lib as kl\n\n\n"
             + _BOOTSTRAP.replace("    import numpy as np\n", "    import numpy as np\n\n"
                                  "    from knorm_study.intervals import MIN_BOOTSTRAP_UNITS\n", 1)))),
    Refactor("the tie rule's two sorts named", (
        Edit(COMPRESSION, "    by_score = scores.gather(-1, by_position).argsort(dim=-1, descending=True, stable=True)\n"
                "    return by_position.gather(-1, by_score)[..., :n_keep]",
             "    ranked = scores.gather(-1, by_position).argsort(dim=-1, descending=True, stable=True)\n"
             "    return by_position.gather(-1, ranked)[..., :n_keep]"),)),
]


def _groups() -> tuple[list[Mutation], list[Refactor]]:
    """Every list: this file's (knorm_lib and the modules it re-exports) and each module group's
    (``fingerprint_mutations_group*.py``)."""
    import importlib

    mutations, refactors = list(MUTATIONS), list(REFACTORS)
    for path in sorted(Path(__file__).parent.glob("fingerprint_mutations_group*.py")):
        group = importlib.import_module(path.stem)
        mutations += group.MUTATIONS
        refactors += getattr(group, "REFACTORS", [])
    return mutations, refactors


ALL_MUTATIONS, ALL_REFACTORS = _groups()
