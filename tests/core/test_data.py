"""Data: verified corpora and tokenisation."""

from __future__ import annotations

import pytest
import torch

import knorm_lib as kl


def test_missing_corpus_says_make_data(tmp_path, monkeypatch):
    """A missing corpus raises FileNotFoundError naming the corpus and `make data`, and creates
    nothing; an unknown corpus name is a ValueError naming `corpus`."""
    monkeypatch.setattr(kl, "CORPUS_DIR", tmp_path)
    for name in kl.CORPORA:
        with pytest.raises(FileNotFoundError, match=rf"corpus='{name}'.*make data"):
            kl.load_corpus(name)
    with pytest.raises(ValueError, match="corpus"):
        kl.load_corpus("books")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", ["line", "mid-line"])
def test_a_cut_corpus_is_refused_naming_the_file(corpus_copy, cut):
    path = corpus_copy / "wiki.jsonl"
    assert len(kl.load_corpus("wiki")) == 104
    kl._VERIFIED_CORPORA.clear()
    data = path.read_bytes()
    end = data.rindex(b"\n", 0, len(data) - 1) + 1 if cut == "line" else len(data) - 100
    path.write_bytes(data[:end])
    with pytest.raises(ValueError, match=r"wiki\.jsonl has sha256 .* `make data`"):
        kl.load_corpus("wiki")


def test_encode_with_real_tokenizer(real_model):
    """encode: (1, n) int64 ids without special tokens (no BOS), cut to max_tokens; empty or
    blank text is refused by name."""
    _, tokenizer = real_model
    ids = kl.encode(tokenizer, "The bushfire moved towards the town of Hill Top.")
    assert ids.dim() == 2 and ids.shape[0] == 1 and ids.dtype == torch.int64
    assert ids[0, 0].item() != tokenizer.bos_token_id
    assert tokenizer.decode(ids[0]) == "The bushfire moved towards the town of Hill Top."
    assert torch.equal(kl.encode(tokenizer, "The bushfire moved towards the town", max_tokens=3), ids[:, :3])
    for text in ("", "  \n"):
        with pytest.raises(ValueError, match="text"):
            kl.encode(tokenizer, text)

