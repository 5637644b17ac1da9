"""Real text that installs offline, and turning text into calibration batches and eval windows.

The built-in corpus is the English Wikipedia sample and the Lee news corpus shipped in gensim's test
data (`pip install --no-deps gensim==4.4.0`). The files are read directly; gensim is never imported.
Wikipedia articles are split by position: the first 80% calibrate, the last 20% evaluate.

Windows cut from a token stream (calibration here, perplexity in :mod:`treeq.eval.perplexity`) start
with a BOS where the model's tokenizer adds one to text (Gemma), and without where it does not
(SmolLM2): a model trained always to see a BOS first is far off its training distribution without.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TreeqError

log = logging.getLogger(__name__)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
HELD_OUT_FRACTION = 0.2
BUILTIN_TEXTS = ("wiki-train", "wiki-test", "news")
BOS_RULES = ("auto", "always", "never")  # the first is the default


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


def check_text(source: str) -> None:
    """Fail in one line unless ``source`` is a built-in corpus name or a file, without reading it."""
    if source not in BUILTIN_TEXTS and not Path(source).is_file():
        raise TreeqError(f"text {source!r} is neither a file nor a built-in corpus ({', '.join(BUILTIN_TEXTS)})")


def read_text(source: str) -> str:
    """A built-in corpus name or the path of a UTF-8 text file."""
    check_text(source)
    if source in BUILTIN_TEXTS:
        return builtin_text(source)
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TreeqError(f"text file {source} is not UTF-8 text (byte {e.start}); give a plain text file") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    if not text.strip():
        raise TreeqError("the text is empty; give a non-empty text file or a built-in corpus")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


@dataclass(frozen=True)
class Bos:
    """The token each window starts with (None: windows are plain text) and why, for protocol lines."""

    token_id: int | None
    reason: str

    def prepend(self, windows: torch.Tensor) -> torch.Tensor:
        """[n, w] text windows -> [n, w + 1] with the BOS in front (unchanged without one)."""
        if self.token_id is None:
            return windows
        return torch.cat([windows.new_full((windows.shape[0], 1), self.token_id), windows], dim=1)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether encoding text with special tokens (as the model saw it in training) starts with BOS.

    Asked of the tokenizer's behaviour, not its ``add_bos_token`` attribute: Gemma's reports False
    once saved and reloaded, yet still adds the BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def bos_for(tokenizer, rule: str = BOS_RULES[0]) -> Bos:
    """``auto``: a BOS per window where the tokenizer adds one to text; ``always`` / ``never`` force it."""
    if rule not in BOS_RULES:
        raise TreeqError(f"bos={rule!r} is not one of {', '.join(BOS_RULES)}; use auto to follow the tokenizer")
    bos = getattr(tokenizer, "bos_token_id", None)
    if rule == "never":
        return Bos(None, "bos=never")
    if rule == "always":
        if bos is None:
            raise TreeqError("bos=always but the tokenizer has no BOS token; use bos=auto or never")
        return Bos(bos, "bos=always")
    if tokenizer_adds_bos(tokenizer):
        return Bos(bos, "bos=auto: the tokenizer adds one")
    return Bos(None, "bos=auto: the tokenizer adds none")


def calibration_batches(
    tokenizer, text: str, samples: int, seqlen: int, batch_size: int, seed: int = 0, bos: str = BOS_RULES[0]
) -> list[torch.Tensor]:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets, stacked into batches; with
    a BOS (:func:`bos_for`), the BOS and ``seqlen - 1`` text tokens."""
    start_token = bos_for(tokenizer, bos)
    width = seqlen - (start_token.token_id is not None)
    ids = tokenize(tokenizer, text)
    if ids.numel() < width:
        raise TreeqError(
            f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
            "use more text or a smaller --seqlen"
        )
    disjoint = ids.numel() // width
    # Said because a short text calibrates as many windows as a long one, drawn over and over.
    repeats = f"; the text holds only {disjoint} disjoint windows, so they repeat it" if samples > disjoint else ""
    start = "no BOS" if start_token.token_id is None else "a BOS first"
    log.info(
        f"calibration: {samples} windows of {seqlen} tokens at random offsets in {ids.numel()} tokens of text, "
        f"{start} ({start_token.reason}){repeats}"
    )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - width + 1, (samples,), generator=gen)
    windows = start_token.prepend(torch.stack([ids[s : s + width] for s in starts.tolist()]))
    return list(windows.split(batch_size))
