"""A GGUF's SentencePiece vocabulary (``tokenizer.ggml.model == "llama"``) as a Hugging Face
``tokenizers`` BPE, for ``make data``'s Gemma 3 (transformers' own GGUF conversion of Gemma builds a
Unigram model over these pieces, without the merges, and tokenizes character by character).

What SentencePiece's BPE (and llama.cpp's ``llm_tokenizer_spm``) does, rebuilt from the GGUF alone:

- spaces become ``▁`` (a normalizer), with no prefix space unless ``tokenizer.ggml.add_space_prefix``;
- the user-defined pieces (Gemma: runs of newlines, spaces and tabs, a few HTML tags) are cut out of
  the raw text first, leftmost-longest, and never merged with their neighbours (added tokens,
  not special); the control pieces (``<bos>``, ``<eos>``, ``<start_of_turn>``, ``<unusedN>``) are
  special added tokens;
- the normal pieces merge pairwise, always the adjacent pair whose concatenation is the
  highest-scoring normal piece, leftmost first among equals: a BPE whose merges are every split
  ``(a, b)`` of a normal piece into two normal pieces, ranked by the piece's score (descending),
  so the BPE's lowest-rank-leftmost rule picks the same pair;
- a character with no piece falls back to its UTF-8 bytes (``<0xNN>`` pieces);
- ``tokenizer.ggml.add_bos_token``: a post-processor that puts ``tokenizer.ggml.bos_token_id``
  first (``add_special_tokens=True``).

The decoder inverts it: ``▁`` back to spaces, byte pieces back to bytes.
"""

from __future__ import annotations

from typing import Any

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"   # ▁


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_vocabulary(reader: Any) -> dict[str, Any]:
    """The tokenizer metadata of a ``gguf.GGUFReader``: pieces, scores, types and the flags."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"tokenizer.ggml.model={model!r}: only SentencePiece vocabularies ('llama') "
                         "are converted here")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not (len(tokens) == len(scores) == len(types)):
        raise ValueError(f"GGUF vocabulary: {len(tokens)} tokens, {len(scores)} scores, {len(types)} types")
    return {"tokens": list(tokens), "scores": [float(s) for s in scores], "types": [int(t) for t in types],
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
            "unknown_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
            "padding_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
            "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
            "add_space_prefix": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))}


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the highest-scoring piece's first
    (then by piece id, then by the left part's length: a fixed order)."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-scores[i], i, cut, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_tokenizer(vocab: dict[str, Any]) -> Any:
    """The ``tokenizers.Tokenizer`` for ``gguf_vocabulary(reader)`` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tokens, scores, types = vocab["tokens"], vocab["scores"], vocab["types"]
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF vocabulary: a piece occurs twice")
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    missing = byte_pieces - {t for t, ty in zip(tokens, types) if ty == BYTE}
    if missing:
        raise ValueError(f"GGUF vocabulary: no byte-fallback pieces for {len(missing)} bytes (e.g. {min(missing)})")
    unk = tokens[vocab["unknown_token_id"]]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=bpe_merges(tokens, scores, types),
                        unk_token=unk, fuse_unk=True, byte_fallback=True, ignore_merges=False, dropout=None))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if vocab["add_space_prefix"]
                      else replace)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab["add_space_prefix"]:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # control pieces: special; user-defined: cut out of the raw text before anything else (llama.cpp
    # stores them with plain spaces, as the text has them)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    bos = [tokens[vocab["bos_token_id"]]] if vocab["add_bos_token"] else []
    eos = [tokens[vocab["eos_token_id"]]] if vocab["add_eos_token"] else []
    template = lambda seq, type_id: [f"{t}:{type_id}" for t in bos] + [f"${seq}:{type_id}"] \
        + [f"{t}:{type_id}" for t in eos]
    tok.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)])
    for i, t in enumerate(tokens):   # the added tokens kept their GGUF ids
        if tok.token_to_id(t) != i:
            raise ValueError(f"GGUF vocabulary: piece {t!r} got id {tok.token_to_id(t)}, not {i}")
    return tok


def tokenizer_config(vocab: dict[str, Any], model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``build_tokenizer(vocab)``: the special tokens by name and
    ``add_bos_token`` (the post-processor carries it too: transformers 5 reads it from there)."""
    tokens = vocab["tokens"]
    name = lambda key: tokens[vocab[key]] if vocab.get(key) is not None else None
    return {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers",
            "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"), "unk_token": name("unknown_token_id"),
            "pad_token": name("padding_token_id"), "add_bos_token": vocab["add_bos_token"],
            "add_eos_token": vocab["add_eos_token"], "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length}
