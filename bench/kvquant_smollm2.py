"""KVQuant on SmolLM2-135M: its ablation step by step, and its cache bytes at 4k tokens.

Perplexity: wiki-test, 1024-token windows (no BOS: the tokenizer adds none), each row by both
protocols of treeq/eval/perplexity.py: simulated (each window in one forward through the cache)
and decode (fed 128 tokens at a time). Calibration: one collection of keys, values and their
loss gradients on 16 x 512 tokens of wiki-train (treeq/runtime/kv_calibration.py, the same
windows `treeq eval --kv kvquant-3` calibrates on), from which each row is calibrated. Rows add
one part at a time, as the KVQuant paper's ablation: uniform per-token int (keys and values per
token over the 64-channel head, no calibration) -> keys per channel with offline-calibrated ranges
-> keys before RoPE -> non-uniform levels (Fisher-weighted k-means) -> 1% outliers in fp16 ->
first token in full precision. No row keeps a full-precision window (residual 0), as the paper.

Bytes: the model in bf16 prefills the first 4096 wiki-test tokens through each cache; the cache's
own tensors (codes, fp16 per-token ranges, fp16 outliers with int32 positions, calibrated tables,
the sink) against a 16-bit cache of the same tokens (2 bytes per key and value entry).

One JSON line per finished row is appended to ``--out``; ``--table FILE`` prints the tables.

    flock /tmp/treeq-heavy.lock python bench/kvquant_smollm2.py --out /tmp/kvquant.jsonl
    python bench/kvquant_smollm2.py --table /tmp/kvquant.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine  # noqa: E402

import treeq  # noqa: E402
from treeq import data  # noqa: E402
from treeq.eval.perplexity import KVProtocol, perplexity  # noqa: E402
from treeq.runtime.kv_calibration import (  # noqa: E402
    calibrate_kv,
    calibration_windows,
    collect_kv_activations,
    needs_calibration,
)
from treeq.runtime.kv_schemes import cache_nbytes, fp16_cache_nbytes, kv_cache_for  # noqa: E402
from treeq.schemes import KVCacheScheme  # noqa: E402

BASE = dict(method="kvquant", group_size=64, residual=0, key_granularity="per-token")
STEPS = (
    ("per-token", {}),
    ("+ per-channel keys", dict(key_granularity="per-channel")),
    ("+ pre-RoPE keys", dict(pre_rope_keys=True)),
    ("+ non-uniform", dict(levels="nonuniform")),
    ("+ 1% outliers", dict(outliers=0.01)),
    ("+ first token fp", dict(sink_tokens=1)),
)


def ablation(bits: int) -> dict[str, KVCacheScheme]:
    """Each step's scheme: the one before with one more part."""
    rows, fields = {}, dict(BASE, key_bits=bits, value_bits=bits)
    for name, change in STEPS:
        fields |= change
        rows[f"{bits}-bit {name}"] = KVCacheScheme(**fields)
    return rows


@click.command()
@click.option("--bits", default="3,4", show_default=True, help="ablations to run")
@click.option("--windows", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--chunk", type=click.IntRange(1), default=128, show_default=True, help="decode protocol's tokens per step"
)
@click.option("--rows", default=None, help="comma-separated row names to run, in that order (default: all)")
@click.option("--protocols", default="simulated,decode", show_default=True, help="perplexity protocols per row")
@click.option("--bytes-tokens", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="append one JSON line per row")
@click.option("--table", "table_file", type=click.Path(exists=True, path_type=Path), default=None)
def main(bits, windows, chunk, rows, protocols, bytes_tokens, threads, out, table_file):
    if table_file is not None:
        print_table(table_file)
        return
    torch.set_num_threads(threads)
    print(machine.cpu(), f"threads={threads}, torch {torch.__version__}", flush=True)
    model, tok = treeq.load_fp_model()
    ids = data.tokenize(tok, data.read_text("wiki-test"))
    schemes = {name: s for b in bits.split(",") for name, s in ablation(int(b)).items()}
    names = list(schemes) if rows is None else rows.split(",")  # in the order given
    activations = None
    if any(needs_calibration(schemes[name]) for name in names):
        start = time.perf_counter()
        activations = collect_kv_activations(model, calibration_windows(tok))
        print(f"calibration activations and Fisher gradients: {time.perf_counter() - start:.0f} s", flush=True)
    bf16 = treeq.load_fp_model(dtype=torch.bfloat16)[0]
    prefix = ids[None, :bytes_tokens]
    for name in names:
        scheme = schemes[name]
        started = time.perf_counter()
        calibration = calibrate_kv(activations, scheme) if needs_calibration(scheme) else None
        row = dict(row=name, scheme=scheme.describe(), windows=windows, chunk=chunk)
        cache = kv_cache_for(bf16, scheme, calibration)
        print(f"{name}: {machine.kv_path(cache)}", flush=True)
        with torch.no_grad():
            bf16(input_ids=prefix, cache=cache, use_cache=True)
        row |= dict(
            tokens=bytes_tokens, cache_bytes=cache_nbytes(cache), fp16_bytes=fp16_cache_nbytes(bf16, bytes_tokens)
        )
        for protocol in protocols.split(","):
            result = perplexity(model, ids, 1024, windows, kv=KVProtocol(scheme, protocol, chunk, calibration))
            row[protocol] = result.ppl
            print(f"partial: {json.dumps(row)}", flush=True)  # a long row killed midway keeps what it measured
        row["seconds"] = round(time.perf_counter() - started)
        print(json.dumps(row), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"| row | simulated ppl | decode ppl | cache at {rows[0]['tokens']} tokens, MiB (x fp16) |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = r["cache_bytes"] / r["fp16_bytes"]
        simulated, decode = (f"{r[p]:.3f}" if p in r else "-" for p in ("simulated", "decode"))  # --protocols
        print(f"| {r['row']} | {simulated} | {decode} | {r['cache_bytes'] / 2**20:.2f} ({ratio:.3f}x) |")


if __name__ == "__main__":
    main()
