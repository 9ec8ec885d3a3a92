"""The exactness matrix: every path on every family, against transformers' own forward and, under
eviction, against an independent reference (tiny random-weight models built from each family's
config class, windows short enough that the tests cross them)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import knorm_lib as kl
from helpers import ARCH_VOCAB, FAMILIES, WINDOW, WINDOWED
from helpers import tiny_family as tiny
from knorm_study import decode

N, CONTEXT = 40, 24
VOCAB = ARCH_VOCAB


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(seed))


def nll_of(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the last ``len(logits)`` tokens' predictions ``logits`` (the last predicts nothing)."""
    n = logits.shape[0]
    return F.cross_entropy(logits[:-1].double(), x[0, x.shape[1] - n + 1:], reduction="none")


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, bound: float, what: str) -> None:
    rel = ((ours.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).max().item()
    assert rel <= bound, f"{what}: relative difference {rel:.3g} > {bound:g}"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def models(family):
    return tiny(family)


def test_windows_are_where_the_config_puts_them(family, models):
    """``sliding_layers`` names exactly the layers transformers hands a window, and the window is
    crossed (the text is longer than it)."""
    model, _ = models
    seen = {}

    def spy(module, query, key, value, mask, **kwargs):
        seen[module.layer_idx] = kwargs.get("sliding_window")
        return kl._attention(module, query, key, value, mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("knorm_test_spy", spy)
    model.set_attn_implementation("knorm_test_spy")
    try:
        kl.full_logits(model, ids())
    finally:
        model.set_attn_implementation(kl.ATTN_IMPLEMENTATION)
    assert {i for i, w in seen.items() if w} == set(kl.sliding_layers(model))
    assert bool(kl.sliding_layers(model)) == (family in WINDOWED)
    assert all(w in (None, WINDOW) for w in seen.values()) and N > WINDOW


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_every_path_equals_transformers_sdpa_at_keep_ratio_one(family, dtype, bound):
    """keep_ratio 1.0: the full forward, the prefill protocol's continuation, both streaming engines
    and the in-place decode cache give transformers' sdpa per-token NLL (1e-10 relative in float64,
    1e-5 in float32)."""
    model, theirs = tiny(family, dtype)
    x = ids()
    with torch.no_grad():
        ref = nll_of(theirs(x).logits[0], x)
    paths = {
        "full forward": nll_of(kl.full_logits(model, x), x),
        "prefill + continuation": kl.prefill_ppl(model, x, CONTEXT, 1.0).nll,
        "one-pass engine": kl.streaming_ppl(model, x, keep_ratio=1.0, engine="one_pass").nll,
        "sequential engine": kl.streaming_ppl(model, x, keep_ratio=1.0, engine="sequential").nll,
        "in-place decode": teacher_forced_decode(model, x, CONTEXT, 1.0),
    }
    for what, nll in paths.items():
        assert_rel(nll, ref[-nll.numel():], bound, f"{family} {dtype} {what}")


def test_against_eager_within_its_float32_softmax(family):
    """transformers' eager attention softmaxes in float32 even for float64 models: 1e-6."""
    model, theirs = tiny(family)
    theirs.set_attn_implementation("eager")
    x = ids()
    with torch.no_grad():
        ref = nll_of(theirs(x).logits[0], x)
    assert_rel(nll_of(kl.full_logits(model, x), x), ref, 1e-6, f"{family} eager")
    assert_rel(kl.streaming_ppl(model, x, keep_ratio=1.0).nll, ref, 1e-6, f"{family} eager one-pass")


@torch.no_grad()
def teacher_forced_decode(model, x, context_len, keep_ratio, skip_layers=()):
    """Per-token NLL of tokens ``context_len+1 .. n-1``: one decode step per token on the in-place cache of
    the compressed prefill, grouped attention, as ``decode.greedy_step``."""
    pre = kl.prefill(model, x[:, :context_len])
    cache = kl.compress_cache(pre.cache, keep_ratio, "knorm", skip_layers)
    dyn = decode.in_place_cache(cache, room=4)
    logits = []
    for t in range(context_len, x.shape[1] - 1):
        with kl.grouped_decoding(True), kl._over(dyn):
            out = model(input_ids=x[:, t:t + 1], past_key_values=dyn, use_cache=True, position_ids=torch.tensor([[t]]))
        logits.append(out.logits[0, -1].double())
    return F.cross_entropy(torch.stack(logits), x[0, context_len + 1:], reduction="none")


# ---- under eviction: an independent reference ---------------------------------------------------

class Reference:
    """Token by token, each layer attends over its own store of (key, value, true position) with an
    explicit float64 softmax; a windowed layer sees key j from position p iff 0 <= p - j < window.
    ``numbering="cache"``: each token is fed at the position its layer-0 store's length gives, and a
    window counts stored keys (the newest window - 1 and the token itself), as a model handed a
    compressed cache without positions numbers them.
    After chosen steps every layer keeps, per KV head, the lowest key norms, in float32 as KnormPress
    (and kvpress) computes them (ties: the newest).
    Shares no code with knorm_lib's engines: transformers computes the projections, RoPE and QK-norm,
    this class only the attention and the eviction."""

    name = "knorm_test_reference"

    def __init__(self, model, numbering: str = "true"):
        from transformers import AttentionInterface

        self.numbering = numbering
        AttentionInterface.register(self.name, self.attend)
        # built afresh from the config and the weights: a deepcopy would carry the library's
        # per-instance patches (_make_resumable's layer forwards, bound to the original model)
        self.model = type(model)(copy.deepcopy(model.config)).to(model.dtype).eval()
        self.model.load_state_dict(model.state_dict())
        self.model.set_attn_implementation(self.name)
        self.store: dict[int, list[torch.Tensor]] = {}
        self.evicted_at: dict[int, dict[tuple[int, int], int]] = {}

    def attend(self, module, query, key, value, mask, scaling=None, sliding_window=None, position_ids=None, **kw):
        i, p = module.layer_idx, int(position_ids[0, 0])
        pos = torch.tensor([self.t]).expand(key.shape[1], 1)   # the token's index: storage keeps their order
        if i in self.store:
            keys, values, positions = self.store[i]
            key, value, pos = torch.cat([keys, key], 2), torch.cat([values, value], 2), torch.cat([positions, pos], 1)
        self.store[i] = [key, value, pos]
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
        scores = query.double() @ k.transpose(-1, -2) * scaling
        if self.numbering == "cache":   # storage slots: the newest is p, the oldest p - (stored - 1)
            pos = torch.arange(p - key.shape[2] + 1, p + 1).expand(key.shape[1], -1)
        distance = p - pos.repeat_interleave(groups, 0)[None, :, None, :]
        visible = (distance >= 0) & (distance < (sliding_window or math.inf))
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
        return (probs @ v).to(query.dtype).transpose(1, 2), None

    def evict(self, step: int, n_keep: int) -> None:
        for i, (keys, values, pos) in self.store.items():
            rows = []
            for h in range(keys.shape[1]):
                norms = keys[0, h].float().norm(dim=-1).tolist()   # KnormPress's score: float32 norms
                order = sorted(range(len(norms)), key=lambda j: (norms[j], -int(pos[h, j])))
                keep = sorted(order[:n_keep], key=lambda j: int(pos[h, j]))
                for j in order[n_keep:]:
                    self.evicted_at.setdefault(i, {})[h, int(pos[h, j])] = step
                rows.append(keep)
            idx = torch.tensor(rows)
            gather = idx[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
            self.store[i] = [keys.gather(2, gather), values.gather(2, gather), pos.gather(1, idx)]

    @torch.no_grad()
    def run(self, x, budget_after) -> torch.Tensor:
        """Per-token NLL of tokens 1..n-1; after step t every layer keeps ``budget_after(t)`` (None: all)."""
        logits = []
        for t in range(x.shape[1] - 1):
            self.t = t
            p = t if self.numbering == "true" else (self.store[0][0].shape[2] if self.store else 0)
            out = self.model(input_ids=x[:, t:t + 1], position_ids=torch.tensor([[p]]), use_cache=False)
            logits.append(out.logits[0, -1])
            if budget_after(t) is not None:
                self.evict(t, budget_after(t))
        return F.cross_entropy(torch.stack(logits).double(), x[0, 1:], reduction="none")


def test_one_pass_engine_equals_the_independent_reference_under_eviction(family, models):
    """Streaming at keep_ratio 0.5 on every layer: the same eviction step for every (layer, head,
    token) and per-token NLL within 1e-9 (float64); the sequential engine agrees too."""
    model, _ = models
    x = ids()
    ref = Reference(model)
    ref_nll = ref.run(x, lambda t: max(1, int((t + 1) * 0.5)))
    one = kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=(), engine="one_pass")
    seq = kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=(), engine="sequential")
    assert_rel(one.nll, ref_nll, 1e-9, f"{family} one-pass vs reference")
    assert_rel(seq.nll, ref_nll, 1e-9, f"{family} sequential vs reference")
    for layer, evict in one.evictions.items():
        ours = {(h, j): int(s) for h in range(evict.shape[0]) for j, s in enumerate(evict[h].tolist()) if s < N}
        assert ours == ref.evicted_at[layer], f"{family} layer {layer}: eviction steps differ"


def test_prefill_protocol_and_decode_equal_the_reference_under_eviction(family, models):
    """Compressed once after the context (keep_ratio 0.5, every layer): the continuation's and the
    in-place decode's per-token NLL equal the reference's within 1e-9 (float64)."""
    model, _ = models
    x = ids()
    n_keep = kl.n_kept_for(CONTEXT, 0.5)
    ref_nll = Reference(model).run(x, lambda t: n_keep if t == CONTEXT - 1 else None)[CONTEXT:]
    assert_rel(kl.prefill_ppl(model, x, CONTEXT, 0.5, skip_layers=()).nll, ref_nll, 1e-9, f"{family} prefill")
    decoded = teacher_forced_decode(model, x, CONTEXT, 0.5)
    assert_rel(decoded, ref_nll, 1e-9, f"{family} in-place decode")


def test_h2o_replay_respects_the_window(family, models):
    """H2O's one-pass replay (attention mass within the window) takes the sequential engine's decisions."""
    model, _ = models
    x = ids()
    one = kl.streaming_ppl(model, x, "h2o", max_cache=12, skip_layers=(), engine="one_pass")
    seq = kl.streaming_ppl(model, x, "h2o", max_cache=12, skip_layers=(), engine="sequential")
    for layer in one.evictions:
        assert torch.equal(one.evictions[layer], seq.evictions[layer]), f"{family} layer {layer}"
    assert_rel(one.nll, seq.nll, 1e-9, f"{family} h2o")


def test_recording_attention_changes_nothing_under_eviction(family, models):
    """Reading attention (``recording_attention``, the attention studies) during a one-pass
    streaming run leaves every NLL as it was: the recorded path applies the same evictions and
    windows as the fused one, and what it records sums to one over visible keys only."""
    model, _ = models
    x = ids()
    plain = kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=(), engine="one_pass")
    rows: list[torch.Tensor] = []
    with kl.recording_attention(lambda layer, probs: rows.append(probs)):
        recorded = kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=(), engine="one_pass")
    assert rows, family
    assert_rel(recorded.nll, plain.nll, 1e-9, f"{family} recorded vs plain")


def test_softcapping_is_refused_by_name(tmp_path):
    """Gemma 2 as published (attention logit softcapping 50) is refused at load time, naming the feature."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gemma2", safe_serialization=True)
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        kl.load_model(tmp_path / "gemma2")


def test_cache_length_numbering_counts_cache_slots(family, models):
    """The write-up's numbering (new tokens from the cache's length) on a windowed model: a window
    counts the slots that numbering implies. The one-pass and sequential engines and the prefill
    protocol equal the reference fed the same way, within 1e-9 (float64)."""
    model, _ = models
    x = ids()
    stream_ref = Reference(model, "cache").run(x, lambda t: max(1, int((t + 1) * 0.5)))
    for engine in ("one_pass", "sequential"):
        res = kl.streaming_ppl(model, x, keep_ratio=0.5, skip_layers=(), position_mode="cache_relative", engine=engine)
        assert_rel(res.nll, stream_ref, 1e-9, f"{family} cache_relative {engine}")
    n_keep = kl.n_kept_for(CONTEXT, 0.5)
    prefill_ref = Reference(model, "cache").run(x, lambda t: n_keep if t == CONTEXT - 1 else None)[CONTEXT:]
    res = kl.prefill_ppl(model, x, CONTEXT, 0.5, skip_layers=(), position_mode="cache_relative")
    assert_rel(res.nll, prefill_ref, 1e-9, f"{family} cache_relative prefill")


def test_rerotation_without_eviction_is_the_true_positions(family, models):
    """Re-rotated keys sit in slots; with nothing evicted the slots are the true positions, so the
    window sees what it sees under absolute positions (prefill protocol and sequential engine)."""
    model, _ = models
    x = ids()
    for kwargs in (dict(skip_layers=()), dict(skip_layers=(0,))):
        absolute = kl.prefill_ppl(model, x, CONTEXT, 1.0, **kwargs).nll
        rerotated = kl.prefill_ppl(model, x, CONTEXT, 1.0, position_mode="rerotated", **kwargs).nll
        assert_rel(rerotated, absolute, 1e-9, f"{family} rerotated prefill {kwargs}")
    seq = kl.streaming_ppl(model, x, keep_ratio=1.0, position_mode="rerotated", engine="sequential")
    assert_rel(seq.nll, kl.streaming_ppl(model, x, keep_ratio=1.0).nll, 1e-9, f"{family} rerotated sequential")


def test_h2o_one_pass_replay_under_cache_numbering_is_refused_on_windowed_models():
    """h2o's one-pass replay counts windows in true positions: with the cache-length numbering on a
    windowed model it is refused, naming the engine (the sequential engine runs it)."""
    model, _ = tiny("gemma3_text")
    with pytest.raises(ValueError, match="engine='one_pass'.*sliding windows"):
        kl.streaming_ppl(model, ids(), "h2o", max_cache=12, position_mode="cache_relative", engine="one_pass")
    kl.streaming_ppl(model, ids(), "h2o", max_cache=12, position_mode="cache_relative", engine="sequential")


def test_a_cache_without_positions_is_refused_on_a_windowed_layer():
    """A transformers cache knorm_lib did not build says nothing of where its keys sit: refused."""
    from transformers import DynamicCache

    model, _ = tiny("mistral")
    pre = kl.prefill(model, ids()[:, :CONTEXT])
    plain = DynamicCache()
    for i, (k, v) in enumerate(zip(pre.cache.keys, pre.cache.values)):
        plain.update(k, v, i)
    with pytest.raises(ValueError, match="positions knorm_lib does not know"), torch.no_grad():
        model(input_ids=ids()[:, CONTEXT:CONTEXT + 1], past_key_values=plain, position_ids=torch.tensor([[CONTEXT]]))


def test_one_pass_window_across_key_blocks():
    """1,100 tokens, a window of 300 and 64 kept tokens per head: the one-pass engine's CPU blocks
    (and a plain forward's) start at the key block holding each query block's window; the forward
    equals transformers' sdpa, the engine the reference."""
    model, theirs = tiny("mistral")
    model.config.sliding_window = theirs.config.sliding_window = 300
    x = torch.randint(0, VOCAB, (1, 1100), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():   # a forward without a cache runs in the same blocks
        assert_rel(nll_of(kl.full_logits(model, x), x), nll_of(theirs(x).logits[0], x), 1e-10, "1,100 tokens, sdpa")
    ref_nll = Reference(model).run(x, lambda t: min(t + 1, 64))
    one = kl.streaming_ppl(model, x, max_cache=64, skip_layers=(), engine="one_pass")
    assert_rel(one.nll, ref_nll, 1e-9, "mistral window 300, 1,100 tokens")


def test_what_gets_compressed_on_a_hybrid_model():
    """compress="all" is skip_layers (the paper's rule); "global" also skips every windowed layer
    (kvpress's rule for Gemma 3); on a model without windows both are skip_layers. Each row
    reports, per layer type, the KV bytes the next query can read and the kept fraction."""
    gemma, _ = tiny("gemma3_text")   # layers 0 and 2 local (window 7), layer 1 global, one KV head
    llama, _ = tiny("llama")
    assert kl.layers_to_skip(gemma, (), "all") == () and kl.layers_to_skip(gemma, (), "global") == (0, 2)
    assert kl.layers_to_skip(gemma, (1,), "global") == (0, 1, 2)
    assert kl.layers_to_skip(llama, (0,), "global") == kl.layers_to_skip(llama, (0,), "all") == (0,)
    with pytest.raises(ValueError, match="compress='local'"):
        kl.layers_to_skip(gemma, (), "local")
    entry = 2 * 16 * 8   # key and value, head_dim 16, float64
    x = ids()
    for compress in kl.LAYER_SCOPES:
        res = kl.prefill_ppl(gemma, x, CONTEXT, 0.5, skip_layers=kl.layers_to_skip(gemma, (), compress))
        rows = res.meta["by_layer_type"]
        n_kept = kl.n_kept_for(CONTEXT, 0.5)
        assert rows["full_attention"] == {"layers": 1, "kv_bytes": n_kept * entry, "kept_fraction": n_kept / CONTEXT}
        local = rows["sliding_attention"]
        assert local["layers"] == 2 and local["kv_bytes"] <= 2 * (WINDOW - 1) * entry
        if compress == "global":   # uncompressed local layers: the window's last W - 1 keys, however long the context
            assert local == {"layers": 2, "kv_bytes": 2 * (WINDOW - 1) * entry, "kept_fraction": 1.0}
        else:
            assert local["kept_fraction"] < 1.0
    stream = kl.streaming_ppl(gemma, x, keep_ratio=0.5, skip_layers=kl.layers_to_skip(gemma, (), "global"))
    assert stream.meta["by_layer_type"]["sliding_attention"]["kept_fraction"] == 1.0
    assert stream.meta["by_layer_type"]["full_attention"]["kv_bytes"] == kl.n_kept_for(N, 0.5) * entry
    assert "by_layer_type" not in kl.prefill_ppl(llama, x, CONTEXT, 0.5).meta   # no windows: the records stay as they were


def test_the_readme_model_table_lists_every_family():
    """The README's model table names each family of the matrix (and Gemma 2's refusal)."""
    from helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| family | what its attention adds |"):]
    table = table[:table.index("\n\n")]
    names = {"llama": "Llama", "qwen2": "Qwen 2", "qwen3": "Qwen 3", "mistral": "Mistral", "phi3": "Phi-3",
             "gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "olmo2": "OLMo 2"}
    assert set(names) == set(FAMILIES)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    for family, name in names.items():
        row = next(line for first, line in rows.items() if first.startswith(name))
        assert row.split("|")[3].strip().startswith("refused" if family == "gemma2" else "exact"), row


def test_kvpress_presses_read_each_layer_types_rope():
    """kvpress's ExpectedAttentionPress reads RoPE from the layer (``rotary_emb(x, position_ids)``): on
    Gemma 3 each layer gets its own type's (local base 10k, global 1M), and the press runs."""
    model, _ = tiny("gemma3_text")
    res = kl.prefill_ppl(model, ids(), CONTEXT, 0.5, "expected_attention", skip_layers=())
    assert math.isfinite(res.ppl)
    x, pos = torch.zeros(1, 3, 16, dtype=torch.float64), torch.arange(3)[None]
    for layer, kind in zip(model.model.layers, model.config.layer_types):
        cos, _ = layer.self_attn.rotary_emb(x, pos)
        assert torch.equal(cos, model.model.rotary_emb(x, pos, kind)[0])
    assert not torch.equal(model.model.layers[0].self_attn.rotary_emb(x, pos)[0],
                           model.model.layers[1].self_attn.rotary_emb(x, pos)[0])
