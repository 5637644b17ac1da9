"""Perplexity with the GPTQ-paper protocol: the text as one token stream, cut into non-overlapping
windows of fixed length, every token after the first of each window scored.

Where the model expects a BOS (:func:`treeq.data.bos_for`), each window is the BOS and the next
``seqlen - 1`` tokens of the stream, and every text token is scored: the same window length and
number of scored tokens as without, but no text token goes unscored. Leaving the BOS out raises
gemma-3-270m's fp perplexity by more than half (tests/test_real_model.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import data
from ..data import Bos
from ..errors import TreeqError

NO_BOS = Bos(None, "no BOS given")


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_scored: int
    bos: Bos = NO_BOS

    def protocol(self) -> str:
        text = self.seqlen - (self.bos.token_id is not None)
        start = "no BOS" if self.bos.token_id is None else f"BOS (id {self.bos.token_id}) + {text} text tokens"
        return (
            f"{self.windows} non-overlapping windows x {self.seqlen} tokens, {start} ({self.bos.reason}), "
            f"{self.tokens_scored} tokens scored, mean NLL over all scored tokens"
        )


def perplexity(
    model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: Bos = NO_BOS
) -> PerplexityResult:
    if seqlen < 2:
        raise TreeqError(f"seqlen={seqlen} scores no token; use a window of at least 2 tokens")
    width = seqlen - (bos.token_id is not None)  # text tokens per window
    windows = ids.numel() // width
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise TreeqError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(range(windows), desc="perplexity", unit="window", leave=False):
            x = bos.prepend(ids[None, w * width : (w + 1) * width]).to(device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return PerplexityResult(math.exp(nll / count), windows, seqlen, count, bos)


def evaluate_perplexity(
    model,
    tokenizer,
    text: str = "wiki-test",
    seqlen: int = 1024,
    max_windows: int | None = 32,
    bos: str = data.BOS_RULES[0],
) -> PerplexityResult:
    """``bos``: "auto" starts each window with a BOS where the tokenizer adds one; "always" / "never" force it."""
    start = data.bos_for(tokenizer, bos)
    return perplexity(model, data.tokenize(tokenizer, data.read_text(text)), seqlen, max_windows, start)
