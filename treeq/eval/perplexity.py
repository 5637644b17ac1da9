"""Perplexity with the GPTQ-paper protocol: the text as one token stream, cut into non-overlapping
windows of fixed length, every token after the first of each window scored.

Where the model expects a BOS (:func:`treeq.data.bos_for`), each window is the BOS and the next
``seqlen - 1`` tokens of the stream, and every text token is scored: the same window length and
number of scored tokens as without, but no text token goes unscored. Leaving the BOS out raises
gemma-3-270m's fp perplexity by more than half (tests/test_real_model.py).

Without a KV setting each window is one forward without a cache, which never touches one. With one
(``kv``), each window goes through a fresh quantized cache by one of two protocols:

* ``simulated``: the window in one forward; the cache's update returns what it stores, so attention
  already sees every token but the newest ``residual`` (plus less than a group) as decoded codes,
  the quantize-in-prefill figure KV papers report;
* ``decode``: the window fed ``kv_chunk`` tokens at a time, so each chunk attends to the codes the
  earlier chunks left in the cache and to its own recent tokens in full precision, as generation does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import data, user_input
from ..data import Bos
from ..errors import TreeqError
from ..runtime.kv_calibration import KVCalibration
from ..runtime.kv_choice import KVChoice, choose_kv
from ..runtime.kv_schemes import kv_cache_for
from ..schemes import KVCacheScheme

log = logging.getLogger(__name__)

KV_PROTOCOLS = ("simulated", "decode")

NO_BOS = Bos(None, "no BOS given")


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_scored: int
    bos: Bos = NO_BOS
    kv: str = "no cache (one forward per window)"
    positions: int | None = None  # the model's max_position_embeddings, where it states one
    dtype: torch.dtype = torch.float32  # the model's parameters and activations

    def protocol(self) -> str:
        text = self.seqlen - (self.bos.token_id is not None)
        start = "no BOS" if self.bos.token_id is None else f"BOS (id {self.bos.token_id}) + {text} text tokens"
        beyond = ""
        if self.positions is not None and self.seqlen > self.positions:
            beyond = f"; WARNING: windows longer than the model's {self.positions} positions (max_position_embeddings)"
        return (
            f"{self.windows} non-overlapping windows x {self.seqlen} tokens, {start} ({self.bos.reason}), "
            f"{self.tokens_scored} tokens scored, mean NLL over all scored tokens; model in "
            f"{str(self.dtype).removeprefix('torch.')}; KV: {self.kv}{beyond}"
        )


def check_kv_protocol(protocol: str, chunk: int) -> None:
    """One-line errors for a protocol or chunk no window can be fed by (callers check before any work)."""
    if protocol not in KV_PROTOCOLS:
        raise TreeqError(f"kv_protocol {protocol!r} is unknown; choose one of {', '.join(KV_PROTOCOLS)}")
    if chunk < 1:
        raise TreeqError(f"kv_chunk={chunk} feeds no token; use at least 1")


@dataclass(frozen=True)
class KVProtocol:
    """How each window meets a quantized cache (see the module docstring)."""

    scheme: KVCacheScheme
    protocol: str = KV_PROTOCOLS[0]
    chunk: int = 32
    calibration: KVCalibration | None = None
    origin: str = ""  # where the scheme came from: given, or stored with a checkpoint

    def __post_init__(self):
        check_kv_protocol(self.protocol, self.chunk)

    def logits(self, model, x: torch.Tensor) -> torch.Tensor:
        cache = kv_cache_for(model, self.scheme, self.calibration)
        if self.protocol == "simulated":
            return model(input_ids=x, cache=cache, use_cache=True).logits
        return torch.cat(
            [model(input_ids=part, cache=cache, use_cache=True).logits for part in x.split(self.chunk, 1)], 1
        )

    def describe(self) -> str:
        how = "window in one forward" if self.protocol == "simulated" else f"window fed {self.chunk} tokens at a time"
        calibrated = "" if self.calibration is None else f"; calibrated, weights: {self.calibration.sensitivity}"
        origin = f" [{self.origin}]" if self.origin else ""
        return f"{self.protocol} ({how} through the cache), {self.scheme.describe()}{calibrated}{origin}"


def kv_protocol_for(
    model,
    tokenizer,
    kv: KVChoice | KVCacheScheme | str | None,
    protocol: str = KV_PROTOCOLS[0],
    chunk: int = 32,
    calib_text: str = "wiki-train",
) -> KVProtocol | None:
    """How ``model`` meets the KV cache ``kv`` chooses (runtime/kv_choice.py: None follows a loaded
    checkpoint's stored scheme, "none" turns it off); None: no quantized cache."""
    choice = choose_kv(model, tokenizer, kv, calib_text)
    if choice.scheme is None:
        return None
    return KVProtocol(choice.scheme, protocol, chunk, choice.calibration, choice.origin)


def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    bos: Bos = NO_BOS,
    kv: KVProtocol | None = None,
) -> PerplexityResult:
    user_input.whole_number(seqlen, "seqlen", 2, "scores no token; use a window of at least 2 tokens")
    width = seqlen - (bos.token_id is not None)  # text tokens per window
    windows = ids.numel() // width
    if max_windows is not None:
        user_input.whole_number(max_windows, "max_windows", 1, "evaluates no window; give 1 or more (--max-windows)")
        windows = min(windows, max_windows)
    if windows == 0:
        raise TreeqError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    # Allowed (context extension is a question worth measuring), but said before the long run as
    # well as in the protocol line after it.
    if warning := user_input.beyond_positions(model, seqlen):
        log.warning(warning)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(range(windows), desc="perplexity", unit="window", leave=False):
            x = bos.prepend(ids[None, w * width : (w + 1) * width]).to(device)
            logits = model(input_ids=x, use_cache=False).logits if kv is None else kv.logits(model, x)
            logits = logits[0, :-1].float()
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += seqlen - 1
    dtype = next(model.parameters()).dtype
    positions = user_input.positions(model)
    result = PerplexityResult(math.exp(nll / count), windows, seqlen, count, bos, positions=positions, dtype=dtype)
    return result if kv is None else dataclasses.replace(result, kv=kv.describe())


def evaluate_perplexity(
    model,
    tokenizer,
    text: str = "wiki-test",
    seqlen: int = 1024,
    max_windows: int | None = 32,
    bos: str = data.BOS_RULES[0],
    kv: KVChoice | KVCacheScheme | str | None = None,
    kv_protocol: str = KV_PROTOCOLS[0],
    kv_chunk: int = 32,
    kv_calib_text: str = "wiki-train",
) -> PerplexityResult:
    """``bos``: "auto" starts each window with a BOS where the tokenizer adds one; "always" / "never" force it.
    ``kv``: a KV-cache setting or preset name (``"kivi-2"``), measured by ``kv_protocol``; one that
    needs calibration (kvquant) is calibrated on ``kv_calib_text`` first. None: the scheme a loaded
    checkpoint stored, if any; "none": no quantized cache."""
    user_input.loaded_model(model, "evaluate_perplexity")
    user_input.loaded_tokenizer(tokenizer, "evaluate_perplexity")
    start = data.bos_for(tokenizer, bos)
    protocol = kv_protocol_for(model, tokenizer, kv, kv_protocol, kv_chunk, kv_calib_text)
    ids = data.tokenize(tokenizer, data.read_text(text))
    user_input.tokens_fit(model, ids)
    return perplexity(model, ids, seqlen, max_windows, start, protocol)
