"""Any model: exact or refused. Tiny random checkpoints of several architectures, built from
configs and saved as safetensors with the embedded model's tokenizer, go through ``load_model``:
the supported ones reproduce their own eager forward at keep_ratio 1.0 (prefill and streaming
protocols) and keep one-pass = sequential; the others are refused at load time, naming the feature."""
from __future__ import annotations

import shutil

import pytest
import torch

import knorm_lib as kl

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152)
SUPPORTED = {
    "llama": dict(head_dim=16),
    "llama3-rope": dict(model_type="llama", head_dim=16, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "mistral-no-window": dict(model_type="mistral", sliding_window=None, head_dim=16),
    "phi3": dict(pad_token_id=0),
    "phi3-partial-rope": dict(model_type="phi3", pad_token_id=0, partial_rotary_factor=0.5),
}
REFUSED = {
    "mistral-window": (dict(model_type="mistral", sliding_window=64, head_dim=16), "sliding-window"),
    "gemma2": (dict(head_dim=16), "sliding-window|softcapping"),
    "gemma3_text": (dict(head_dim=16), "sliding-window"),
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4, vocab_size=49152), "not supported"),
}


def _save(tmp_path, model_type: str, overrides: dict) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(overrides)
    model_type = overrides.pop("model_type", model_type)
    fields = overrides if model_type == "gpt2" else {**SMALL, **overrides}
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    for p in model.parameters():   # far from uniform attention, so mistakes show
        torch.nn.init.normal_(p, std=0.1)
    out = tmp_path / model_type
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(kl.DEFAULT_MODEL_DIR / name, out / name)
    return str(out)


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
