"""bench/machine.py, the lines benches print before their figures (the CPU, the calibration path,
the kernels that ran), and the rule that every bench script names the CPU."""

import importlib.util
from pathlib import Path

import torch
from conftest import make_model

import treeq
from treeq.engine.quant_log import QuantLog
from treeq.kernels import cpu_dequantize, cpu_isa

BENCH = Path(__file__).parent.parent / "bench"


def _bench_machine():
    # Loaded from its file: bench/ on sys.path would let its scripts pass for packages of the same name.
    spec = importlib.util.spec_from_file_location("bench_machine", BENCH / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


machine = _bench_machine()


def test_every_bench_script_names_the_cpu():
    scripts = {p.name: p.read_text() for p in BENCH.glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    # machine.cpu() is cpu_isa.describe(), which a few benches call directly.
    silent = [name for name, text in scripts.items() if "machine.cpu()" not in text and "describe()" not in text]
    assert len(scripts) >= 10 and not silent


def test_no_bench_script_passes_for_an_installed_module():
    # Run as a script, a bench puts bench/ first on sys.path, so a script named like an installed
    # module replaces it for every importer: bench/kernels.py did so for Hugging Face's `kernels`
    # (a dependency of transformers 5.25), and transformers failed to load any model in that bench.
    # Checked to fail with the script under its old name, `kernels` installed.
    shadowing = [p.name for p in BENCH.glob("*.py") if importlib.util.find_spec(p.stem) is not None]
    assert shadowing == []


def test_kernels_counts_the_kernel_each_quantized_linear_runs(tmp_path, tokenizer, text_file, monkeypatch):
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=32, batch_size=4)
    model = make_model("llama")
    treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file), log=QuantLog(str))
    fp32 = "cpu_int4_fp32" if cpu_dequantize.available() else "torch"  # fp32 inputs: the reference's weight
    assert machine.kernels(treeq.load(tmp_path / "q")[0]) == f"{fp32} x 14"
    assert machine.kernels(model) == "none chosen yet x 14"  # chosen at the first forward
    model(torch.zeros(1, 4, dtype=torch.long))
    assert machine.kernels(model) == f"{fp32} x 14"
    monkeypatch.setenv(cpu_isa.ENV, "avx2")  # treeq's own int4 kernel declines; torch's int4 op runs bf16
    assert machine.kernels(treeq.load(tmp_path / "q", dtype=torch.bfloat16)[0]) == "cpu_int4 x 14"
    assert machine.kernels(make_model("llama")) == "none (no quantized linear)"


def test_calibration_names_the_path_of_the_cpu_stood_in_for(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV, "avx2")  # any host: neither AMX nor AVX512-BF16 may be used
    assert machine.calibration() == "calibration: layer forwards in float32, input statistics by fp32"
    assert machine.calibration("bfloat16") == "calibration: layer forwards in bfloat16, input statistics by fp32"
