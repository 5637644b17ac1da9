"""Perplexity with the GPTQ-paper protocol: the text as one token stream, cut into non-overlapping
windows of fixed length, every token after the first of each window scored."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import TreeqError


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_scored: int

    def protocol(self) -> str:
        return (
            f"{self.windows} non-overlapping windows x {self.seqlen} tokens, "
            f"{self.tokens_scored} tokens scored, no BOS, mean NLL over all scored tokens"
        )


def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> PerplexityResult:
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise TreeqError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(range(windows), desc="perplexity", unit="window", leave=False):
            x = ids[w * seqlen : (w + 1) * seqlen].to(device)[None]
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return PerplexityResult(math.exp(nll / count), windows, seqlen, count)
