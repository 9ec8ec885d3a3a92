"""The text data the study evaluates on: the corpora `make data` writes (``data/corpora/``, each
checked against ``data/manifest.json``), documents, and token sequences of exact lengths. knorm_lib
re-exports these names (``kl.long_documents``), so the notebooks' calls read the same."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import knorm_lib as kl

EXPORTED = ("Document", "CORPORA", "file_sha256", "verified_corpus_path", "load_corpus", "bos_first", "encode",
            "TokenizedDoc", "long_documents", "_VERIFIED_CORPORA")


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    n_tokens: int | None = None


CORPORA: tuple[str, ...] = ("wiki", "news")


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED_CORPORA: set[Path] = set()   # checked against the manifest once per process


def verified_corpus_path(name: str) -> Path:
    """``data/corpora/<name>.jsonl``, its sha256 checked against ``data/manifest.json`` once per process."""
    if name not in CORPORA:
        raise ValueError(f"corpus={name!r}: choose one of {CORPORA}")
    path = kl.CORPUS_DIR / f"{name}.jsonl"
    manifest = kl.DATA_DIR / "manifest.json"
    if not path.exists() or not manifest.exists():
        raise FileNotFoundError(f"corpus={name!r}: {path if not path.exists() else manifest} is missing; "
                                "run `make data` first")
    if path not in _VERIFIED_CORPORA:
        expected = json.loads(manifest.read_text(encoding="utf-8")).get("corpora", {}).get(name, {}).get("sha256")
        got = file_sha256(path)
        if got != expected:
            raise ValueError(f"corpus={name!r}: {path} has sha256 {got}, but {manifest} records {expected}: "
                             "the file is damaged or changed; run `make data` to rebuild it")
        _VERIFIED_CORPORA.add(path)
    return path


def load_corpus(name: Literal["wiki", "news"] = "wiki") -> list[Document]:
    """Documents of a corpus written by ``make data`` (``data/corpora/<name>.jsonl``), verified."""
    path = verified_corpus_path(name)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"corpus={name!r}: {path}:{line_no} is not valid JSON ({err})") from err
    return [Document(r["title"], r["text"], r.get("n_tokens")) for r in rows]


def bos_first(tokenizer: Any) -> int | None:
    """The BOS id a text's tokens start with: the tokenizer's ``bos_token_id`` when it declares
    ``add_bos_token`` (the embedded Gemma 3: ``load_model`` sets it from the tokenizer's config),
    else ``None`` (SmolLM2: its text starts with its first word)."""
    if getattr(tokenizer, "add_bos_token", False) is not True:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if isinstance(bos, int) else None


def encode(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as a ``(1, n)`` LongTensor, cut to ``max_tokens``: BOS first when the
    tokenizer declares it (``bos_first``), no other special token."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text: empty text has no tokens to evaluate")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    bos = bos_first(tokenizer)
    if bos is not None:
        ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)
    return ids[:, :max_tokens] if max_tokens is not None else ids


@dataclass(frozen=True)
class TokenizedDoc:
    title: str
    input_ids: torch.Tensor   # (1, n_tokens)


def long_documents(tokenizer: Any, corpus: Literal["wiki", "news"], n_tokens: int, n_docs: int) -> list[TokenizedDoc]:
    """``n_docs`` token sequences of exactly ``n_tokens`` (BOS included where ``encode`` puts one),
    deterministic: ``wiki``, the longest articles (cut); ``news`` (about 250 tokens each),
    consecutive articles joined by blank lines."""
    if not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens={n_tokens!r}: must be an int >= 2")
    if not isinstance(n_docs, int) or n_docs < 1:
        raise ValueError(f"n_docs={n_docs!r}: must be an int >= 1")
    docs = load_corpus(corpus)
    out: list[TokenizedDoc] = []
    if corpus == "wiki":
        for doc in sorted(docs, key=lambda d: (-(d.n_tokens or 0), d.title))[:n_docs]:
            ids = encode(tokenizer, doc.text, n_tokens)
            if ids.shape[1] == n_tokens:
                out.append(TokenizedDoc(doc.title, ids))
    else:
        parts: list[str] = []
        first = 0
        for i, doc in enumerate(docs):
            parts.append(doc.text)
            ids = encode(tokenizer, "\n\n".join(parts))
            if ids.shape[1] >= n_tokens:
                title = doc.title if first == i else f"{docs[first].title}..{doc.title}"
                out.append(TokenizedDoc(title, ids[:, :n_tokens]))
                parts, first = [], i + 1
                if len(out) == n_docs:
                    break
    if len(out) < n_docs:
        raise ValueError(f"n_docs={n_docs}: corpus {corpus!r} has only {len(out)} documents of {n_tokens} tokens")
    return out
