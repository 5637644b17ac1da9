"""Real text that installs offline, and turning text into calibration batches and eval windows.

The built-in corpus is the English Wikipedia sample and the Lee news corpus shipped in gensim's test
data (`pip install --no-deps gensim==4.4.0`). The files are read directly; gensim is never imported.
Wikipedia articles are split by position: the first 80% calibrate, the last 20% evaluate.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .errors import TreeqError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
HELD_OUT_FRACTION = 0.2
BUILTIN_TEXTS = ("wiki-train", "wiki-test", "news")


def package_dir(package: str, pip_spec: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TreeqError(f"package {package!r} is not installed; run: pip install --no-deps {pip_spec}")
    return Path(spec.origin).parent


def _gensim_file(name: str) -> Path:
    return package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / name


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def clean_wikitext(text: str) -> str:
    # Templates nest, so strip innermost ones until none is left.
    while True:
        stripped = _TEMPLATE.sub("", text)
        if stripped == text:
            break
        text = stripped
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    articles = []
    with bz2.open(_gensim_file(WIKI_FILE), "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            text = elem.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and elem.find("{*}redirect") is None and text is not None:
                cleaned = clean_wikitext(text.text or "")
                if len(cleaned) > 200:
                    articles.append(cleaned)
            elem.clear()
    return tuple(articles)


def builtin_text(name: str) -> str:
    if name == "news":
        return _gensim_file(NEWS_FILE).read_text(encoding="utf-8")
    articles = wiki_articles()
    split = int(len(articles) * (1 - HELD_OUT_FRACTION))
    if name == "wiki-train":
        return "\n\n".join(articles[:split])
    if name == "wiki-test":
        return "\n\n".join(articles[split:])
    raise TreeqError(f"unknown built-in text {name!r}; choose one of {', '.join(BUILTIN_TEXTS)} or give a file path")


def read_text(source: str) -> str:
    """A built-in corpus name or the path of a UTF-8 text file."""
    if source in BUILTIN_TEXTS:
        return builtin_text(source)
    path = Path(source)
    if not path.is_file():
        raise TreeqError(f"text {source!r} is neither a file nor a built-in corpus ({', '.join(BUILTIN_TEXTS)})")
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    if not text.strip():
        raise TreeqError("the text is empty; give a non-empty text file or a built-in corpus")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def calibration_batches(
    tokenizer, text: str, samples: int, seqlen: int, batch_size: int, seed: int = 0
) -> list[torch.Tensor]:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets, stacked into batches."""
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen:
        raise TreeqError(
            f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
            "use more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=gen)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    return list(windows.split(batch_size))
