"""knorm_study.norm_distributions."""

from __future__ import annotations

import knorm_lib as kl
from knorm_study import norm_distributions


def test_token_kinds(real_model):
    _, tok = real_model
    ids = kl.encode(tok, "The cat sat.\nIt was happy, and fed.")
    kinds = norm_distributions.token_kinds(tok, ids)
    text = [tok.decode([t]) for t in ids[0].tolist()]
    by_text = dict(zip(text, kinds))
    assert kinds[0] == "first"
    assert by_text["."] == "punctuation" and by_text[","] == "punctuation"
    assert by_text[" and"] == "stop_word" and by_text[" cat"] == "other"
    assert any(k == "newline" for k in kinds)
    assert set(kinds) <= set(norm_distributions.TOKEN_KINDS)

