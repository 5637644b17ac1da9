"""Serial vs threaded dispatch over a device list on a random Qwen3-MoE: quantize time and whether
the checkpoints are identical bit for bit.

Both runs are in this process with the same thread budget (``--threads``): serial is one worker
using all of it, ``--devices`` is one worker per device splitting it. Runs alternate, best of
``--repeats`` each. Usage (heavy, so under the shared lock):

    flock /tmp/treeq-heavy.lock python bench/moe_dispatch.py --threads 2 --devices cpu,cpu
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import machine
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import treeq
from treeq.default_model import default_model_path
from treeq.engine.quant_log import QuantLog

ARCH = dict(
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_experts=32,
    num_experts_per_tok=4,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    tie_word_embeddings=True,
)


def random_moe(vocab_size: int):
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=vocab_size, **ARCH)
    return AutoModelForCausalLM.from_config(config).eval()


def run(tok, out: Path, config, devices, workers) -> float:
    model = random_moe(len(tok))
    start = time.perf_counter()
    quiet = QuantLog(echo=lambda _: None)
    treeq.quantize(model, config, out, tokenizer=tok, log=quiet, devices=devices, workers=workers)
    return time.perf_counter() - start


@click.command()
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--devices", default="cpu,cpu", show_default=True)
@click.option("--calib-samples", type=int, default=64, show_default=True)
@click.option("--seqlen", type=int, default=256, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True)
def main(threads, devices, calib_samples, seqlen, repeats):
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    config = treeq.QuantConfig(method="gptq", bits=4, group_size=128, calib_samples=calib_samples, seqlen=seqlen)
    times = {"serial": [], devices: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            times["serial"].append(run(tok, Path(tmp) / f"serial-{i}", config, None, 1))
            times[devices].append(run(tok, Path(tmp) / f"devices-{i}", config, devices, None))
        identical = all(
            (Path(tmp) / f"serial-{i}" / "model.safetensors").read_bytes()
            == (Path(tmp) / f"devices-{i}" / "model.safetensors").read_bytes()
            for i in range(repeats)
        )
    experts = f"{ARCH['num_experts']} experts top-{ARCH['num_experts_per_tok']}"
    print(f"random qwen3_moe: hidden {ARCH['hidden_size']}, {ARCH['num_hidden_layers']} layers, {experts}")
    print(f"gptq w4 g128, calibration {calib_samples}x{seqlen} wiki-train, thread budget {threads}")
    print(machine.cpu())
    print(machine.calibration())
    serial = min(times["serial"])
    for name, ts in times.items():
        print(f"{name:<10} best of {repeats}: {min(ts):7.2f} s   speedup vs serial x{serial / min(ts):.2f}")
    print(f"checkpoints identical bit for bit: {identical}")


if __name__ == "__main__":
    main()
