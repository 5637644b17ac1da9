"""Thread-count independence, which bit-identical threaded dispatch rests on."""

import subprocess
import sys

import pytest
import torch

from treeq.kernels import gram_bf16
from treeq.methods.gptq import _prepare


def products_at(threads: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 512, generator=gen) * torch.linspace(0.2, 3, 512)
    torch.set_num_threads(threads)
    h = x.T @ x / x.shape[0]
    return h, _prepare(h, True, 0.01).hinv_upper


def test_gptq_factor_and_products_do_not_depend_on_threads():
    before = torch.get_num_threads()
    try:
        (h1, u1), (h2, u2) = products_at(1), products_at(2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(h1, h2)
    assert torch.equal(u1, u2)


def test_the_factor_alone_would_differ_without_single_threading():
    """The guard above can fail: MKL's Cholesky at 1 and 2 threads rounds differently."""
    code = (
        "import torch\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4096, 512) * torch.linspace(0.2, 3, 512)\n"
        "h = x.T @ x / 4096 + torch.eye(512)\n"
        "out = []\n"
        "for t in (1, 2):\n"
        "    torch.set_num_threads(t)\n"
        "    out.append(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True))\n"
        "print(torch.equal(*out))\n"
    )
    same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    if same == "True":
        pytest.skip("this MKL's Cholesky is thread-independent already")
    assert same == "False"


@pytest.mark.skipif(not gram_bf16.library()[0], reason="the bf16 Gram kernel needs AVX512-BF16")
def test_bf16_gram_kernel_does_not_depend_on_threads():
    x = (torch.randn(1001, 300, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            h = torch.zeros(300, 300)
            gram_bf16.gram_update(h, x, 0.0, 1.0 / 1001)
            results.append(h)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
