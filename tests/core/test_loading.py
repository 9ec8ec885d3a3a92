"""Loading: supported architectures are exact, the rest refused at load time; clear errors."""

from __future__ import annotations

import time

import pytest
import torch

import knorm_lib as kl
from helpers import REFUSED, SUPPORTED, _save


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_architecture_is_exact(tmp_path, name):
    from transformers import AutoModelForCausalLM

    path = _save(tmp_path, name.split("-")[0], SUPPORTED[name])
    model, _ = kl.load_model(path)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = eager(ids).logits[0].float()
    ours = kl.full_logits(model, ids).float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # prefill protocol at keep_ratio 1.0: the continuation's logits equal the eager forward's
    res = kl.prefill_ppl(model, ids, 24, 1.0)
    nll = torch.nn.functional.cross_entropy(ref[24:-1], ids[0, 25:], reduction="none")
    torch.testing.assert_close(res.nll.float(), nll, rtol=1e-5, atol=1e-5)
    # streaming at keep_ratio 1.0 is the full forward; compressed, one pass equals sequential
    full = kl.streaming_ppl(model, ids, keep_ratio=1.0, engine="sequential")
    torch.testing.assert_close(full.nll.float(), torch.nn.functional.cross_entropy(ref[:-1], ids[0, 1:], reduction="none"),
                               rtol=1e-5, atol=1e-5)
    seq = kl.streaming_ppl(model, ids, keep_ratio=0.5, engine="sequential", skip_layers=(0,))
    one = kl.streaming_ppl(model, ids, keep_ratio=0.5, engine="one_pass", skip_layers=(0,))
    torch.testing.assert_close(one.nll, seq.nll, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_architecture_is_refused_at_load(tmp_path, name):
    overrides, feature = REFUSED[name]
    path = _save(tmp_path, name.split("-")[0], overrides)
    with pytest.raises(ValueError, match=feature):
        kl.load_model(path)


def test_rerotation_on_partial_rope_is_refused(tmp_path):
    path = _save(tmp_path, "phi3", dict(pad_token_id=0, partial_rotary_factor=0.5))
    model, _ = kl.load_model(path)
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="partial RoPE"):
        kl.prefill_ppl(model, ids, 24, 0.5, position_mode="rerotated")


def test_missing_model_says_make_data(tmp_path, monkeypatch):
    """load_model() without the embedded model raises FileNotFoundError mentioning `make data`,
    and creates nothing."""
    monkeypatch.setattr(kl, "DEFAULT_MODEL_DIR", tmp_path / "SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="make data"):
        kl.load_model()
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_path(tmp_path):
    """A model path that does not exist raises FileNotFoundError naming it, and creates nothing."""
    with pytest.raises(FileNotFoundError, match="model.*/nonexistent/model-dir"):
        kl.load_model("/nonexistent/model-dir")
    missing = tmp_path / "no-model-here"
    with pytest.raises(FileNotFoundError, match="no-model-here"):
        kl.load_model(str(missing))
    assert list(tmp_path.iterdir()) == []


def test_model_dir_without_model(tmp_path):
    """A directory that exists but holds no model (e.g. a wrong path into data/) must also give a
    FileNotFoundError naming the path -- not an unrelated error from a tokenizer fallback."""
    empty = tmp_path / "empty-model-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-model-dir"):
        kl.load_model(str(empty))
    assert list(empty.iterdir()) == []


def test_bad_dtype_string():
    """dtype given as a string must name a torch dtype."""
    with pytest.raises(ValueError, match="dtype"):
        kl.load_model("/nonexistent/model-dir", dtype="float33")


def test_unknown_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("org/unknown", "models/mine"):
        t0 = time.perf_counter()
        with pytest.raises(FileNotFoundError, match=name):
            kl.load_model(name)
        assert time.perf_counter() - t0 < 15

