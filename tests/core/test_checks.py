"""Input checks: every entry point rejects bad input before heavy work, naming the argument."""

from __future__ import annotations

import pytest
import torch

import knorm_lib as kl
from helpers import BAD_KEEP_RATIOS, CONTEXT, N_LAYERS, N_TOKENS
from knorm_study import decode


@pytest.mark.parametrize("keep_ratio", BAD_KEEP_RATIOS, ids=repr)
def test_bad_keep_ratio(keep_ratio, tiny64, ids, full_cache, forward_count):
    """keep_ratio must be a number in (0, 1]; every entry point says so by name."""
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.n_kept_for(10, keep_ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.compress_cache(full_cache, keep_ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, keep_ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        kl.sweep(tiny64, ids, CONTEXT, [kl.EvalConfig(0.5), kl.EvalConfig(keep_ratio)])
    assert forward_count == []
    with pytest.raises(ValueError, match="keep_ratio"):
        decode.generate_greedy(tiny64, ids[:, :8], 2, keep_ratio=keep_ratio)


def test_empty_text():
    """encode refuses empty or blank text, naming `text`, without calling the tokenizer."""
    calls = []

    def tokenizer(*args, **kwargs):
        calls.append(args)
        raise AssertionError("tokenizer must not be called")

    for text in ("", "   \n\t", None):
        with pytest.raises(ValueError, match="text"):
            kl.encode(tokenizer, text)
    assert calls == []


@pytest.mark.parametrize("context_len", [N_TOKENS, N_TOKENS + 5, N_TOKENS - 1, 0, -3, 10.0, True])
def test_bad_context_len(context_len, tiny64, ids, forward_count):
    """context_len must leave at least two tokens to score: n-1, n and beyond are refused."""
    with pytest.raises(ValueError, match="context_len"):
        kl.prefill_ppl(tiny64, ids, context_len, 0.5)
    with pytest.raises(ValueError, match="context_len"):
        kl.sweep(tiny64, ids, context_len, [kl.EvalConfig(0.5)])
    assert forward_count == []


def test_largest_valid_context_len(tiny64, ids):
    """context_len = n-2 is the largest allowed: exactly one token is scored."""
    assert kl.prefill_ppl(tiny64, ids, N_TOKENS - 2, 0.5).nll.shape == (1,)


def test_unknown_policy(tiny64, ids, full_cache, forward_count):
    """An unknown policy name is refused by name, listing the choices."""
    with pytest.raises(ValueError, match="policy.*knorm"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, policy="no_such_policy")
    with pytest.raises(ValueError, match="policy"):
        kl.compress_cache(full_cache, 0.5, "no_such_policy")
    with pytest.raises(ValueError, match="policy"):
        kl.compress_cache(full_cache, 0.5, object())
    assert forward_count == []


@pytest.mark.parametrize("skip_layers", [(99,), (-1,), (0, N_LAYERS), (1.5,)], ids=repr)
def test_skip_layers_outside_model(skip_layers, tiny64, ids, full_cache, forward_count):
    """skip_layers must name layers of the model."""
    with pytest.raises(ValueError, match="skip_layers"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, skip_layers=skip_layers)
    with pytest.raises(ValueError, match="skip_layers"):
        kl.compress_cache(full_cache, 0.5, skip_layers=skip_layers)
    assert forward_count == []


@pytest.mark.parametrize("name,kwargs", [("order", {"order": "sorted"}),
                                         ("position_mode", {"position_mode": "relative"})])
def test_unknown_order_or_position_mode(name, kwargs, tiny64, ids, full_cache, forward_count):
    """order and position_mode accept only their documented choices."""
    with pytest.raises(ValueError, match=name):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, **kwargs)
    assert forward_count == []
    if name == "order":
        with pytest.raises(ValueError, match=name):
            kl.compress_cache(full_cache, 0.5, **kwargs)
    else:
        with pytest.raises(ValueError, match=name):
            kl.continuation_logits(tiny64, full_cache, ids[:, CONTEXT:-1], **kwargs)
    with pytest.raises(ValueError, match=name):
        decode.generate_greedy(tiny64, ids[:, :8], 2, **kwargs)


def test_bad_input_ids_and_counts(tiny64, ids, forward_count):
    """input_ids must be integer ids of batch size 1; max_new_tokens and max_tokens >= 1."""
    with pytest.raises(ValueError, match="input_ids"):
        kl.prefill_ppl(tiny64, ids.float(), CONTEXT, 0.5)
    with pytest.raises(ValueError, match="input_ids"):
        kl.prefill_ppl(tiny64, ids.repeat(2, 1), CONTEXT, 0.5)
    with pytest.raises(ValueError, match="input_ids"):
        kl.prefill(tiny64, ids[:, :0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.generate_greedy(tiny64, ids, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        kl.encode(lambda *a, **k: None, "some text", max_tokens=0)
    assert forward_count == []


def test_library_argument_checks(tiny32):
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="n_sink"):
        kl.streaming_ppl(tiny32, ids, "streaming", keep_ratio=0.5, n_sink=-1)
    with pytest.raises(ValueError, match="n_sink"):
        kl.prefill_ppl(tiny32, ids, 16, 0.5, "streaming", n_sink=-1)
    with pytest.raises(ValueError, match="seed"):
        kl.prefill_ppl(tiny32, ids, 16, 0.5, "random", seed="x")
    with pytest.raises(ValueError, match="skip_layers"):
        kl.prefill_ppl(tiny32, ids, 16, 0.5, skip_layers=None)
    with pytest.raises(ValueError, match="skip_layers"):
        kl.streaming_ppl(tiny32, ids, keep_ratio=0.5, skip_layers=None)
    with pytest.raises(ValueError, match="configs"):
        kl.sweep(tiny32, ids, 16, [0.5])
    bad_ids = ids.clone()
    bad_ids[0, 3] = 256
    with pytest.raises(ValueError, match="input_ids.*vocabulary"):
        kl.prefill_ppl(tiny32, bad_ids, 16, 0.5)
    with pytest.raises(ValueError, match="input_ids.*vocabulary"):
        kl.streaming_ppl(tiny32, bad_ids, keep_ratio=0.5)
    # every layer skipped: nothing is compressed, and n_kept says so
    every = tuple(range(4))
    assert kl.prefill_ppl(tiny32, ids, 16, 0.5, skip_layers=every).n_kept == 16
    assert kl.streaming_ppl(tiny32, ids, keep_ratio=0.5, skip_layers=every).n_kept == 32



@pytest.mark.parametrize("device", ["gpu", "cuda0", "auto:1", "", 3, None], ids=repr)
def test_bad_device_is_named_before_loading(device, monkeypatch):
    """A device string the library cannot use is refused, naming the argument, before any file is read."""
    monkeypatch.setattr(kl, "DEFAULT_MODEL_DIR", kl.DATA_DIR / "no-such-model")   # loading would fail otherwise
    with pytest.raises(ValueError, match=r"^device="):
        kl.load_model(device=device)


def test_mps_and_missing_cuda_are_refused_with_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="float64"):
        kl.load_model(device="mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="no CUDA device"):
            kl.load_model(device=device)
    from knorm_study import runtime

    with pytest.raises(ValueError, match="float64"):   # the notebooks' parameter check is the same rule
        runtime.PARAMETER_CHECKS["device"]("device", "mps")


def test_policy_outside_its_protocol(tiny64, ids, forward_count):
    """A dynamic policy under the prefill protocol, or a kvpress press under streaming, is refused
    by name before any forward (one check, kl.check_policy, for every entry point)."""
    with pytest.raises(ValueError, match="policy='h2o'.*streaming protocol only"):
        kl.prefill_ppl(tiny64, ids, CONTEXT, 0.5, policy="h2o")
    with pytest.raises(ValueError, match="policy='h2o'.*streaming protocol only"):
        kl.sweep(tiny64, ids, CONTEXT, [kl.EvalConfig(0.5, "h2o")])
    with pytest.raises(ValueError, match="policy='snapkv'.*prefill protocol only"):
        kl.streaming_ppl(tiny64, ids, "snapkv", keep_ratio=0.5)
    with pytest.raises(ValueError, match="policies=.*a policy name"):
        kl.check_policy("policies", 3, "prefill")
    assert forward_count == []
    kl.check_policy("policy", "h2o", "streaming")
    kl.check_policy("policy", "snapkv", "prefill")
