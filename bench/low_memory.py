"""Peak RSS of `treeq quantize --low-memory` on a random Llama of ~6 GB fp32 on disk.

The model is written shard by shard (never whole in memory) into ``--dir`` unless already there;
the quantization runs as a child process, whose peak RSS is read from the kernel's rusage.
``--compare`` also runs the in-memory path (it needs the whole model in RAM) and checks the two
checkpoints hold identical tensors. Usage (heavy, so under the shared lock):

    flock /tmp/treeq-heavy.lock python bench/low_memory.py --dir /tmp/treeq-llama-6gb --threads 2
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

import treeq  # noqa: F401  (before torch: it sets allocator options torch reads once)

# isort: split
import machine
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from treeq.default_model import default_model_path

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=128,
    tie_word_embeddings=True,
)


def write_random_llama(directory: Path) -> int:
    """Random weights (std 0.02, norms 1) in one shard per layer plus one for the rest; returns bytes."""
    tok = AutoTokenizer.from_pretrained(default_model_path())
    config = AutoConfig.for_model("llama", vocab_size=len(tok), **SHAPE)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    tok.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    shapes = {n: t.shape for n, t in skeleton.state_dict().items() if n != "lm_head.weight"}  # tied
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(layer, []).append(name)
    total, weight_map = 0, {}
    for i, names in enumerate(groups.values()):
        tensors = {
            n: torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n], generator=gen) * 0.02
            for n in names
        }
        total += sum(t.numel() * 4 for t in tensors.values())
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def quantize_child(model: Path, out: Path, threads: int, method: str, low_memory: bool, calib: int, seqlen: int):
    """Runs the CLI in a child process; returns (seconds, the child's peak RSS in MB)."""
    args = [sys.executable, "-m", "cli.main", "quantize", str(model), "--out", str(out), "--threads", str(threads)]
    args += ["--method", method, "--group-size", "128", "--calib-samples", str(calib), "--seqlen", str(seqlen)]
    args += ["--no-eval", "--low-memory"] if low_memory else ["--no-eval"]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    # ru_maxrss of the children waited for so far: the largest child's peak.
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@click.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("/tmp/treeq-llama-6gb"))
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--method", default="gptq", show_default=True)
@click.option("--calib-samples", type=int, default=16, show_default=True)
@click.option("--seqlen", type=int, default=256, show_default=True)
@click.option("--compare", is_flag=True, help="also run the in-memory path and compare the checkpoints")
def main(directory, threads, method, calib_samples, seqlen, compare):
    if not directory.exists():
        gb = write_random_llama(directory) / 1e9
        print(f"wrote a random Llama of {gb:.2f} GB fp32 to {directory}")
    on_disk = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9
    print(f"model: {on_disk:.2f} GB fp32 safetensors, {json.dumps(SHAPE)}")
    print(f"{method} w4 g128, calibration {calib_samples}x{seqlen} wiki-train, threads={threads}")
    print(machine.cpu())
    print(machine.calibration())  # the child's: the CLI's default --calib-dtype auto, on this CPU
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        seconds, rss = quantize_child(directory, Path(tmp) / "low", threads, method, True, calib_samples, seqlen)
        print(f"--low-memory: {seconds:7.1f} s, peak RSS {rss:7.0f} MB")
        if compare:
            seconds, rss = quantize_child(directory, Path(tmp) / "mem", threads, method, False, calib_samples, seqlen)
            print(f"in memory:    {seconds:7.1f} s, peak RSS of the larger run {rss:7.0f} MB")
            a, b = _tensors(Path(tmp) / "low"), _tensors(Path(tmp) / "mem")
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            print(f"checkpoints hold identical tensors: {same}")


if __name__ == "__main__":
    main()
