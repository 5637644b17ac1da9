"""Triton GPTQ kernels, run by triton's interpreter on CPU tensors, against the numerics module.

TRITON_INTERPRET must be set before triton.jit decorates anything, i.e. before the kernels' module
is first imported; treeq imports triton only on first use, so setting it here is early enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from treeq.kernels import LinearFormat, explain, select_kernel, triton_gptq
from treeq.kernels._triton import gptq
from treeq.kernels.torch_reference import TorchReference
from treeq.methods import QuantResult
from treeq.numerics import SUPPORTED_BITS, dequantize_grouped
from treeq.runtime.quant_linear import QuantLinear

KERNEL = triton_gptq.KERNEL


def make_layer(bits, group_size, sym, act_order, in_features=128, out_features=64, bias=True, seed=0):
    """A QuantLinear packed by treeq.packing from random codes and grid params, and its fp32 weight."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    gs = in_features if group_size == -1 else group_size
    groups = in_features // gs
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=gen).to(torch.uint8)
    if sym:
        zeros = torch.full((groups, out_features), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (groups, out_features), generator=gen, dtype=torch.int32)
        zeros[0, :2] = torch.tensor([0, maxq])  # the extreme zero points GPTQ v1 could not store
    scales = ((0.5 + torch.rand(groups, out_features, generator=gen)) / maxq).half()
    g_idx = torch.arange(in_features, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    result = QuantResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, loss=0.0)
    fmt = LinearFormat(bits, group_size, sym, act_order, in_features, out_features)
    b = torch.randn(out_features, generator=gen) if bias else None
    return QuantLinear.from_result(fmt, result, b), dequantize_grouped(codes, scales, zeros, g_idx)


def packed(layer):
    return layer.qweight, layer.qzeros, layer.scales, layer.g_idx


def assert_fp32_close(y, ref):
    # Only the summation order differs from F.linear; the bound scales with the outputs' size.
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


FORMATS = [
    pytest.param(bits, gs, sym, act, id=f"{bits}bit-g{gs}-{'sym' if sym else 'asym'}{'-act' if act else ''}")
    for bits in SUPPORTED_BITS
    for gs in (32, -1)
    for sym in (True, False)
    for act in (False, True)
]


@pytest.mark.parametrize("bits, group_size, sym, act_order", FORMATS)
def test_dequantize_is_bit_exact_with_numerics(bits, group_size, sym, act_order):
    layer, weight = make_layer(bits, group_size, sym, act_order)
    out = gptq.dequantize(*packed(layer), bits)
    assert out.dtype == torch.float32
    assert torch.equal(out, weight)
    assert torch.equal(out, layer.dequantized_weight())


@pytest.mark.parametrize("bits, group_size, sym, act_order", FORMATS)
def test_matmul_matches_linear_on_the_reference_weight(bits, group_size, sym, act_order):
    layer, weight = make_layer(bits, group_size, sym, act_order)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    assert_fp32_close(KERNEL.forward(layer, x), F.linear(x, weight, layer.bias))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_single_row_decode_through_quant_linear(bits):
    layer, weight = make_layer(bits, 32, False, True, in_features=96, out_features=32, bias=False)
    layer.kernel = KERNEL
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(2))
    y = layer(x)
    assert y.shape == (1, 1, 32)
    assert_fp32_close(y, F.linear(x, weight))


@pytest.mark.parametrize("config", gptq.CONFIGS, ids=str)
def test_every_tile_config_is_correct(config):
    # 3-bit act-order with tails in every dimension: M < BLOCK_M, N and K not multiples of the blocks.
    layer, weight = make_layer(3, 32, False, True, in_features=160, out_features=96)
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(3))
    assert_fp32_close(gptq.matmul(x, *packed(layer), 3, config=config), x @ weight.T)


INTERPRETER_BF16 = (
    "triton 3.7.1's interpreter multiplies bf16 tiles as their raw uint16 bits and rounds fp32->bf16 "
    "unlike torch; bf16 is only compiled (test_every_variant_compiles_to_cuda_binaries), not run"
)


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skip(reason=INTERPRETER_BF16))]
)
def test_half_precision_activations_match_the_reference_kernel(dtype):
    layer, _ = make_layer(4, 32, False, True)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = KERNEL.forward(layer, x)
    assert y.dtype == dtype
    ref = TorchReference.forward(layer, x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_long_inputs_take_the_dequantize_then_dense_path(monkeypatch):
    calls = []
    real = gptq.dequantize
    monkeypatch.setattr(gptq, "dequantize", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    monkeypatch.setattr(triton_gptq, "DENSE_FROM_ROWS", 4)
    layer, weight = make_layer(2, -1, True, False)
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(5))
    assert_fp32_close(KERNEL.forward(layer, x), F.linear(x, weight, layer.bias))
    assert calls == [torch.float32]


def test_autotune_only_considers_tiles_that_fit_the_rows():
    decode = gptq._fitting_rows(gptq.CONFIGS, {"M_BUCKET": 1})
    assert decode and {c.kwargs["BLOCK_M"] for c in decode} == {16}
    prefill = {c.kwargs["BLOCK_M"] for c in gptq._fitting_rows(gptq.CONFIGS, {"M_BUCKET": 64})}
    assert prefill == {16, 32, 64}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_selected_on_cuda_never_on_cpu(dtype):
    fmt = LinearFormat(3, 64, False, True, 128, 64)
    assert select_kernel(fmt, "cuda", dtype) is KERNEL
    assert select_kernel(fmt, "cpu", dtype) is not KERNEL  # a CPU kernel (cpu_lowbit for 3-bit bf16, else torch)
    assert explain(fmt, "cpu", dtype)[KERNEL.name] == "device cpu not in ['cuda']"


def run_python(code: str, *args: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_treeq_imports_and_falls_back_without_triton():
    out = run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail as if it were not installed
        import torch
        from treeq.kernels import LinearFormat, explain, select_kernel
        fmt = LinearFormat(4, 32, True, False, 64, 32)
        print(select_kernel(fmt, "cuda", torch.float16).name)
        print(explain(fmt, "cuda", torch.float16)["triton-gptq"])
        """
    )
    assert out.splitlines() == ["torch", "triton is not installed (pip install 'treeq[triton]')"]


COMPILE_FOR_CUDA = """
    import json, sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from treeq.kernels._triton import gptq

    bits_list, dtypes, n_configs = json.loads(sys.argv[1])
    ints = lambda *names: {n: "i32" for n in names}
    packed = {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "g_idx_ptr": "*i32"}
    target = GPUTarget("cuda", 80, 32)
    for bits in bits_list:
        sig = {"out_ptr": "*fp32", **packed, **ints("N", "K", "stride_out", "stride_qw", "stride_qz", "stride_s")}
        src = ASTSource(gptq._dequantize_kernel, sig, constexprs={"BITS": bits, "BLOCK_N": 64, "BLOCK_K": 64})
        assert triton.compile(src, target=target).asm["cubin"]
        for dt in dtypes:
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **packed}
            sig |= ints("M", "N", "K", "M_BUCKET", "stride_x", "stride_y", "stride_qw", "stride_qz", "stride_s")
            for cfg in gptq.CONFIGS[:n_configs]:
                src = ASTSource(gptq._matmul_kernel, sig, constexprs={"BITS": bits, **cfg.kwargs})
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                assert triton.compile(src, target=target, options=opts).asm["cubin"]
    print("compiled")
"""


def compile_for_cuda(tmp_path, bits, dtypes, n_configs):
    """Triton's real compiler (not the interpreter) down to an sm_80 cubin; needs no GPU, only the
    ptxas that ships with triton. A fresh cache dir makes every variant really compile."""
    out = run_python(COMPILE_FOR_CUDA, json.dumps([bits, dtypes, n_configs]), TRITON_CACHE_DIR=str(tmp_path))
    assert out.strip() == "compiled"


def test_kernels_compile_to_cuda_binaries(tmp_path):
    compile_for_cuda(tmp_path, (3, 4), ("fp16",), 1)


@pytest.mark.slow
def test_every_variant_compiles_to_cuda_binaries(tmp_path):
    compile_for_cuda(tmp_path, SUPPORTED_BITS, ("fp16", "bf16", "fp32"), len(gptq.CONFIGS))
