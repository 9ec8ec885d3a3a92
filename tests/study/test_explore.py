"""knorm_study.explore: the explorer's checks."""

from __future__ import annotations

import time

import pytest

from knorm_study import explore


def test_explorer_setting_checks(tiny32):
    ok = dict(keep_ratio=0.5, policy="knorm", skip_layers=[0, 1], position_mode="absolute", layer=2, kv_head=0,
              max_tokens=512)
    explore.Explorer.check_setting(tiny32, **ok)
    for bad, match in ((dict(keep_ratio=0.01), "keep_ratio"), (dict(keep_ratio=0.33), "keep_ratio"),
                       (dict(policy="h2o"), "policy"), (dict(skip_layers=[5]), "skip_layers"),
                       (dict(skip_layers=None), "skip_layers"), (dict(layer=4), "layer"), (dict(kv_head=2), "kv_head"),
                       (dict(max_tokens=100_000), "max_tokens")):
        with pytest.raises(ValueError, match=match):
            explore.Explorer.check_setting(tiny32, **{**ok, **bad})



class _ByteTokenizer:
    """Bytes as token ids (the tiny models' vocabulary is 256)."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        import torch

        return {"input_ids": torch.tensor([list(text.encode())])}

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode(errors="replace")


@pytest.fixture(scope="module")
def tiny_explorer(tiny32):
    text = " ".join(f"word{i % 50}" for i in range(200))
    return explore.Explorer(tiny32, _ByteTokenizer(), text, max_tokens=64, n_generate=4)


def test_grid_points_equal_a_full_recompute(tiny_explorer):
    """What the slider reads from the grid is what recomputing the setting gives: PPL, KL,
    accuracy, kept positions and the continuation."""
    ex = tiny_explorer
    setting = ex.setting(0.5, "knorm", (0, 1), "absolute")
    cached = ex.view(0.5, layer=2, kv_head=1, cached=True)
    fresh = ex.view(0.5, layer=2, kv_head=1, cached=False)
    assert setting in ex.points and setting in ex.continuations
    assert cached.result.summary() == fresh.result.summary() and cached.kept == fresh.kept
    assert cached.continuation == fresh.continuation and cached.agreement == fresh.agreement
    assert sum(cached.kept) == cached.result.n_kept


def test_the_worker_fills_the_current_setting_first_then_its_grid(tiny_explorer):
    """The current setting's point, then its continuation, then the grid nearest first; join
    waits for one policy's grid; paused computes nothing; stop ends the thread."""
    ex = explore.Explorer(tiny_explorer.model, tiny_explorer.tokenizer, tiny_explorer.text, max_tokens=64, n_generate=4)
    order: list[tuple[str, explore.Setting]] = []
    worker = explore.GridWorker(ex, ["knorm", "random"], lambda kind, s: order.append((kind, s)))
    worker.set_current(ex.setting(0.5, "knorm"), compare="random")
    worker.join(["knorm"])
    assert order[:3] == [("point", (0.5, "knorm", (0, 1), "absolute")), ("point", (0.5, "random", (0, 1), "absolute")),
                         ("continuation", (0.5, "knorm", (0, 1), "absolute"))]
    knorm_grid = [s[0] for kind, s in order if kind == "point" and s[1] == "knorm"]
    assert sorted(knorm_grid) == list(explore.Explorer.GRID)
    assert [abs(k - 0.5) for k in knorm_grid] == sorted(abs(k - 0.5) for k in knorm_grid)
    with worker.paused():
        n = len(order)
        time.sleep(0.3)
        assert len(order) == n
    worker.join()
    assert worker.pending() == 0 and len(ex.points) == 2 * len(explore.Explorer.GRID)
    worker.stop()
    assert not worker._thread.is_alive()


def test_highlight_and_curve_show_two_policies():
    html = explore.highlight_html(["a", "b", "c", "d"], [True, True, False, False], [True, False, True, False],
                                  ("knorm", "random"))
    assert [html.count(f'class="{c}"') for c in ("kept", "only-a", "only-b", "evicted")] == [1, 1, 1, 1]
    assert "only knorm" in html and "only random" in html and "by neither" in html


def test_on_a_windowed_model_the_skip_menu_offers_the_global_layers():
    """On a hybrid model (a tiny Gemma 3: local, global, local) the skip_layers menu adds the
    global-only rule; the grid point of the global-only setting equals a full recompute and keeps
    the local layers whole."""
    from helpers import tiny_family
    from knorm_study.probes._models import tiny_llama

    model, _ = tiny_family("gemma3_text")
    options = dict(explore.Explorer.skip_options(model))
    assert options["global layers only"] == (0, 2) and options["global, not (0, 1)"] == (0, 1, 2)
    assert "global layers only" not in dict(explore.Explorer.skip_options(tiny_llama()))
    ex = explore.Explorer(model, _ByteTokenizer(), " ".join(f"word{i % 50}" for i in range(200)), max_tokens=64,
                          n_generate=4)
    cached = ex.view(0.5, skip_layers=(0, 2), layer=0, kv_head=0, cached=True)
    fresh = ex.view(0.5, skip_layers=(0, 2), layer=0, kv_head=0, cached=False)
    assert cached.result.summary() == fresh.result.summary() and all(cached.kept)
    assert cached.result.meta["by_layer_type"]["sliding_attention"]["kept_fraction"] == 1.0


def test_the_model_menu_switches_models_loading_each_once(tmp_path):
    """Choosing another model in the explorer's menu loads it once per kernel, prefills the same text
    again and sets the controls for it: a hybrid model's layer picker says which layers are local,
    its KV-head slider stops at its one head, its policies add knorm_prenorm (QK-norm) and its
    skip_layers menu the global layers; switching back reuses the first model object."""
    import knorm_lib as kl
    from helpers import _save

    llama_dir = _save(tmp_path, "llama", dict(head_dim=16))
    gemma_dir = _save(tmp_path, "gemma3_text", dict(head_dim=16, sliding_window=16, num_key_value_heads=1,
                                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    llama, tokenizer = kl.load_model(llama_dir)
    text = " ".join(f"word{i % 50}" for i in range(120))
    ex = explore.Explorer(llama, tokenizer, text, max_tokens=64, n_generate=4)
    box, ui = explore.controls(ex, 0.5, "knorm", (0, 1), "absolute", 1, 1)
    try:
        w = ui.widgets
        assert "knorm_prenorm" not in ui.policies and [v for _, v in w["model"].options][0] == llama_dir
        assert "global (full attention)" in w["layer_kind"].value
        w["model"].options = [*w["model"].options, ("tiny gemma", gemma_dir)]
        w["policy"].value, w["compare"].value = "random", "streaming"
        w["model"].value = gemma_dir
        assert (w["policy"].value, w["compare"].value) == ("random", "streaming")   # kept across the switch
        gemma = ui.explorer.model
        assert type(gemma).__name__ == "Gemma3ForCausalLM" and ui.explorer.text == text
        assert w["kv_head"].max == 0 and w["kv_head"].value == 0 and w["layer"].max == 2
        assert "knorm_prenorm" in ui.policies and "knorm_prenorm" in w["policy"].options
        assert "global layers only" in dict(w["skip_layers"].options)
        w["layer"].value = 0
        assert "local (sliding window 16)" in w["layer_kind"].value
        w["layer"].value = 1
        assert "global (full attention)" in w["layer_kind"].value
        ui.worker.join(["knorm"], timeout_s=120)
        assert ui.explorer.points and all(p.kept.shape[1] == 1 for p in ui.explorer.points.values())
        w["policy"].value = "knorm_prenorm"
        w["model"].value = llama_dir
        assert ui.explorer.model is llama and "knorm_prenorm" not in w["policy"].options
        assert w["policy"].value == "knorm"   # not offered without QK-norm: back to knorm
        w["model"].value = gemma_dir
        assert ui.explorer.model is gemma   # loaded once
    finally:
        ui.worker.stop()
        explore._LOADED.clear()
