"""Build deterministic JSONL text corpora (Wikipedia articles, news prose) for KV-cache experiments.

Usage:
    python scripts/build_corpora.py --wiki WIKI.xml.bz2 --news NEWS.cor --out OUT_DIR [--tokenizer PATH]
"""
from __future__ import annotations

import argparse
import bz2
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Iterator

import mwparserfromhell
from mwparserfromhell.nodes import (Argument, Comment, ExternalLink, Heading, HTMLEntity, Node, Tag,
                                    Template, Text, Wikilink)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knorm_lib import file_sha256  # noqa: E402
from knorm_study.runtime import write_text_atomic  # noqa: E402

DROP_SECTIONS = {"see also", "references", "external links", "further reading", "notes",
                 "bibliography", "footnotes", "sources", "citations", "works cited"}
DROP_TAGS = {"ref", "references", "table", "gallery", "math", "chem", "timeline", "imagemap",
             "score", "graph", "mapframe", "templatedata", "hr", "noinclude", "includeonly"}
DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
INTERLANG_RE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*:")
HEADING_MARK = "\x00H"  # sentinel prefix for heading lines: "\x00H<level>\x00<title>"
_PRE_STRIP = [re.compile(p, re.I | re.S) for p in
              (r"<!--.*?(-->|$)", r"<ref[^>]*/>", r"<ref(\s[^>]*)?>.*?</ref\s*>", r"'{2,}")]
MIN_WIKI_CHARS = 500
LONG_DOC_TOKENS = 8192
_FALLBACK = [(re.compile(p, re.I), r) for p, r in (
    (r"\{\{[^{}]*\}\}", ""),  # innermost templates
    (r"\[\[(?:file|image|category|media):(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]", ""),  # media/category links
    (r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1"),  # plain links -> display text
    (r"</?[a-z][a-z0-9]*(?:\s[^<>]*)?/?>", ""))]  # stray HTML tags


def _fallback(text: str) -> str:
    """Regex clean-up for markup the parser left as plain text (it gives up on malformed input)."""
    if not any(c in text for c in "[{<"):
        return text
    for pat, repl in _FALLBACK:
        n = 1
        while n:
            text, n = pat.subn(repl, text)
    return text


def _render(nodes: Iterable[Node]) -> str:
    """Render parsed wikitext nodes to plain text (headings become sentinel lines)."""
    out: list[str] = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(html.unescape(_fallback(str(node.value))))
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Wikilink):
            low = str(node.title).strip().lower()
            if low.startswith(DROP_LINK_PREFIXES) or (node.text is None and INTERLANG_RE.match(low)):
                continue
            shown = node.text if node.text is not None else node.title
            out.append(_render(shown.nodes).lstrip(":" if node.text is None else ""))
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                out.append(_render(node.title.nodes))
        elif isinstance(node, Heading):
            out.append(f"\n{HEADING_MARK}{node.level}\x00{_clean_line(_render(node.title.nodes))}\n")
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag == "br":
                out.append("\n")
            elif tag not in DROP_TAGS and not node.self_closing and node.contents is not None:
                out.append(_render(node.contents.nodes))
        elif isinstance(node, (Template, Comment, Argument)):
            continue
        else:  # unknown node types: keep their stripped code as a last resort
            out.append(node.__strip__(normalize=True, collapse=True) or "")
    return "".join(out)


def _clean_line(line: str) -> str:
    """Remove leftover markup debris and collapse whitespace in one line."""
    line = re.sub(r"'{2,}", "", line)                # unbalanced bold/italic quotes
    line = re.sub(r"__[A-Z]+__", "", line)           # magic words like __TOC__
    line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)  # separators left in parens by removed templates
    line = re.sub(r"(?:\s*[,;:])+\s*\)", ")", line)
    line = re.sub(r"\(\s*\)", "", line)              # parens emptied entirely
    line = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", line)  # ", ," runs left by removed templates
    line = re.sub(r"\s+", " ", line).strip()
    if not re.search(r"\w", line):                   # nothing but punctuation left (e.g. dropped <math>)
        return ""
    return re.sub(r"(?<=[\w)\]\"']) +([,.;:!?)])", r"\1", line).replace("( ", "(")


def _drop_sections(lines: list[str]) -> list[str]:
    """Drop boilerplate sections (with subsections) and headings whose section has no content."""
    sections: list[tuple[int, str, list[str]]] = [(0, "", [])]
    for line in lines:
        if line.startswith(HEADING_MARK):
            level, title = line[len(HEADING_MARK):].split("\x00", 1)
            sections.append((int(level), title, []))
        else:
            sections[-1][2].append(line)
    kept: list[tuple[int, str, list[str]]] = []
    skip_below: int | None = None  # level of the dropped boilerplate heading we are inside
    for level, title, body in sections:
        if skip_below is not None and level > skip_below:
            continue
        skip_below = level if title.strip().lower() in DROP_SECTIONS else None
        if skip_below is None:
            kept.append((level, title, body))
    out: list[str] = []
    for i, (level, title, body) in enumerate(kept):
        has_content, j = any(body), i + 1  # a heading survives if its subtree has any text
        while not has_content and j < len(kept) and kept[j][0] > level:
            has_content, j = any(kept[j][2]), j + 1
        if level == 0 or has_content:
            out.extend(["", title, ""] if level else [])
            out.extend(body)
    return out


def clean_wikitext(wikitext: str) -> str:
    """Convert raw MediaWiki markup to clean plain prose (deterministic)."""
    # Pre-strip constructs that often derail mwparserfromhell (unbalanced '' inside refs/captions).
    for pat in _PRE_STRIP:
        wikitext = pat.sub("", wikitext)
    text = _render(mwparserfromhell.parse(wikitext).nodes)
    text = re.sub(r"(?ms)^\{\|.*?^\|\}", "", text)  # tables the parser failed to recognise
    lines = [_clean_line(ln) if not ln.startswith(HEADING_MARK) else ln for ln in text.split("\n")]
    lines = _drop_sections(lines)
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):  # at most one blank line in a row, none leading
            out.append(line)
    return "\n".join(out).strip()


def _local(tag: str) -> str:
    """Strip an XML namespace: '{ns}page' -> 'page'."""
    return tag.rsplit("}", 1)[-1]


def iter_wiki_articles(bz2_path: Path) -> Iterator[dict]:
    """Stream main-namespace, non-redirect articles from a MediaWiki XML .bz2 dump, cleaned."""
    with bz2.open(bz2_path, "rb") as fh:
        context = ET.iterparse(fh, events=("start", "end"))
        _, root = next(context)
        for event, elem in context:
            if event != "end" or _local(elem.tag) != "page":
                continue
            fields = {_local(c.tag): c for c in elem.iter()}
            raw = (fields["text"].text or "") if "text" in fields else ""
            ns = (fields["ns"].text or "").strip() if "ns" in fields else ""
            title = (fields["title"].text or "").strip() if "title" in fields else ""
            elem.clear()
            root.clear()
            if ns != "0" or "redirect" in fields or raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(raw)
            if len(text) >= MIN_WIKI_CHARS:
                yield {"title": title, "text": text}


def iter_news_articles(cor_path: Path) -> Iterator[dict]:
    """Yield one article per non-empty line of a plain-text corpus file."""
    with open(cor_path, encoding="utf-8") as fh:
        i = 0
        for line in fh:
            if line.strip():
                yield {"title": f"news-{i:03d}", "text": line.strip()}
                i += 1


def write_jsonl(docs: Iterable[dict], out_path: Path) -> int:
    """Write docs as sorted-key JSON lines, atomically; return the count."""
    lines = [json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in docs]
    write_text_atomic(out_path, "".join(lines))
    return len(lines)


def build_corpora(wiki_bz2: Path, news_cor: Path, out_dir: Path, tokenizer: Any = None) -> dict:
    """Write out_dir/{wiki,news}.jsonl (with n_tokens if a tokenizer is given); return a summary."""
    summary: dict[str, dict] = {}
    sources = {"wiki": iter_wiki_articles(Path(wiki_bz2)), "news": iter_news_articles(Path(news_cor))}
    for name, docs in sources.items():
        docs = list(docs)
        if tokenizer is not None:
            for doc in docs:
                ids = tokenizer(doc["text"], add_special_tokens=False, verbose=False)["input_ids"]
                doc["n_tokens"] = len(ids)
        path = Path(out_dir) / f"{name}.jsonl"
        n_docs = write_jsonl(docs, path)
        toks = [d["n_tokens"] for d in docs] if tokenizer is not None else None
        summary[name] = {
            "path": str(path),
            "sha256": file_sha256(path),
            "n_docs": n_docs,
            "n_chars_total": sum(len(d["text"]) for d in docs),
            "n_tokens_total": sum(toks) if toks is not None else None,
            "n_tokens_max": max(toks, default=0) if toks is not None else None,
            "n_docs_over_8192_tokens": sum(t > LONG_DOC_TOKENS for t in toks) if toks is not None else None,
        }
    return summary


def main() -> None:
    """CLI entry point: build both corpora and print the summary as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wiki", type=Path, required=True, help="MediaWiki XML export (.bz2)")
    ap.add_argument("--news", type=Path, required=True, help="one-article-per-line text file")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer path for token counts")
    args = ap.parse_args()
    tok = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    print(json.dumps(build_corpora(args.wiki, args.news, args.out, tok), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
