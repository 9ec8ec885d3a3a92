"""Shared fixtures for the test suite (tests/core mirrors knorm_lib's modules, tests/study the
knorm_study modules, tests/scripts the scripts; shared helpers and constants are in helpers.py).

* ``tiny64`` / ``tiny32``: a random-weight Llama (4 layers, 4 query heads, 2 KV heads,
  head_dim 16) built from a config, no download. ``initializer_range=0.1`` (instead of the
  default 0.02) makes attention far from uniform, so position effects are large and the tests
  that assert "these differ" have a wide margin.
* ``real_model``: the embedded SmolLM2-135M-Instruct (``make data``), loaded once per session.
* ``news_ids``: a few hundred tokens of real news prose from ``load_corpus("news")``.

A missing model or corpus makes the real-model tests FAIL with the library's
FileNotFoundError (run ``make data``); nothing here skips.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))   # tests/helpers.py
sys.path.insert(0, str(PROJECT_ROOT / "scripts"))          # the scripts the tests import

import knorm_lib as kl  # noqa: E402
from helpers import N_TOKENS, random_ids  # noqa: E402
from knorm_study.speed import random_llama  # noqa: E402

# Small CPU ops pay OpenMP barrier costs on every call; on a small (often shared) machine one
# thread is many times faster for this suite's tiny models, and about as fast for the 135M one.
torch.set_num_threads(int(os.environ.get("KNORM_TEST_THREADS", "1")))

TINY_INIT = 0.1
REAL_N_TOKENS = 300


@pytest.fixture(scope="session")
def tiny64():
    return random_llama(seed=0, dtype=torch.float64, initializer_range=TINY_INIT)


@pytest.fixture(scope="session")
def tiny32():
    return random_llama(seed=0, dtype=torch.float32, initializer_range=TINY_INIT)


@pytest.fixture(scope="session")
def real_model():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, loaded once."""
    return kl.load_model(dtype=torch.float32)


@pytest.fixture(scope="session")
def news_ids(real_model):
    """The first ``REAL_N_TOKENS`` tokens of the news corpus (articles joined by blank lines)."""
    _, tokenizer = real_model
    docs = kl.load_corpus("news")
    text = "\n\n".join(doc.text for doc in docs[:20])
    ids = kl.encode(tokenizer, text, max_tokens=REAL_N_TOKENS)
    assert ids.shape == (1, REAL_N_TOKENS), f"news corpus too short: {tuple(ids.shape)}"
    return ids


@pytest.fixture
def ids():
    return random_ids(N_TOKENS, seed=0)


@pytest.fixture(scope="module")
def full_cache(tiny64):
    """An uncompressed prefill cache of 37 tokens (odd, so ratios truncate)."""
    return kl.prefill(tiny64, random_ids(37, seed=1)).cache


@pytest.fixture
def forward_count(tiny64):
    """Counts forward passes of the tiny model, to show validation precedes any work."""
    calls = []
    handle = tiny64.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


@pytest.fixture(scope="module")
def ids40():
    return torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def news_prefill(real_model, news_ids):
    """knorm_lib's uncompressed prefill cache of the whole news sequence."""
    model, _ = real_model
    return kl.prefill(model, news_ids)


@pytest.fixture
def corpus_copy(tmp_path, monkeypatch):
    """A private copy of data/ (manifest + corpora) that the library reads instead."""
    (tmp_path / "corpora").mkdir()
    for name in kl.CORPORA:
        shutil.copy(kl.CORPUS_DIR / f"{name}.jsonl", tmp_path / "corpora" / f"{name}.jsonl")
    shutil.copy(kl.DATA_DIR / "manifest.json", tmp_path / "manifest.json")
    monkeypatch.setattr(kl, "DATA_DIR", tmp_path)
    monkeypatch.setattr(kl, "CORPUS_DIR", tmp_path / "corpora")
    from knorm_study import texts

    monkeypatch.setattr(texts, "_VERIFIED_CORPORA", set())
    return tmp_path / "corpora"


@pytest.fixture(scope="module")
def ids48():
    return torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def all_tied():
    """A registered policy whose scores are all equal: every decision is a tie."""
    @kl.register_policy("_all_tied")
    def _all_tied(kv, opts):
        return torch.zeros(kv.positions.shape, dtype=torch.float32, device=kv.keys.device)
    yield "_all_tied"
    kl.POLICIES.pop("_all_tied")

