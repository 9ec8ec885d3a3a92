"""Shared fixtures for the knorm_lib test suite.

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
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import knorm_lib  # noqa: E402

# Small CPU ops pay OpenMP barrier costs on every call; on a small (often shared) machine one
# thread is many times faster for this suite's tiny models, and about as fast for the 135M one.
torch.set_num_threads(int(os.environ.get("KNORM_TEST_THREADS", "1")))

TINY_INIT = 0.1
REAL_N_TOKENS = 300


@pytest.fixture(scope="session")
def tiny64():
    return knorm_lib.random_llama(seed=0, dtype=torch.float64, initializer_range=TINY_INIT)


@pytest.fixture(scope="session")
def tiny32():
    return knorm_lib.random_llama(seed=0, dtype=torch.float32, initializer_range=TINY_INIT)


@pytest.fixture(scope="session")
def real_model():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, loaded once."""
    return knorm_lib.load_model(dtype=torch.float32)


@pytest.fixture(scope="session")
def news_ids(real_model):
    """The first ``REAL_N_TOKENS`` tokens of the news corpus (articles joined by blank lines)."""
    _, tokenizer = real_model
    docs = knorm_lib.load_corpus("news")
    text = "\n\n".join(doc.text for doc in docs[:20])
    ids = knorm_lib.encode(tokenizer, text, max_tokens=REAL_N_TOKENS)
    assert ids.shape == (1, REAL_N_TOKENS), f"news corpus too short: {tuple(ids.shape)}"
    return ids
