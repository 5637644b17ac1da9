"""treeq's bf16 Gram-matrix kernel (AVX512-BF16 CPUs): fp32 sums of exact bf16 products."""

import pytest
import torch

from treeq.kernels import gram_bf16

pytestmark = pytest.mark.skipif(gram_bf16.library()[0] is None, reason=f"gram_bf16: {gram_bf16.library()[1]}")


@pytest.mark.parametrize("n, d", [(1, 1), (7, 5), (33, 17), (200, 100), (513, 200)])
def test_update_is_the_scaled_gram_matrix_plus_the_kept_part(n, d):
    """Odd token counts and feature counts off the 16-lane and 8-row tiles are padded with zeros."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 4).bfloat16()
    start = torch.randn(d, d, generator=g)
    h = start @ start.T
    expected = 0.25 * h.double() + 0.5 * x.double().T @ x.double()
    gram_bf16.gram_update(h, x, 0.25, 0.5)
    assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(h, h.T)  # each entry computed once and written to both places


def test_fp32_rows_are_rounded_as_torch_rounds_them():
    """Ties go to even, as ``Tensor.bfloat16()`` rounds them."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(301, 40, generator=g)
    x[:, 0] = 1.0 + 2**-7 + 2**-8  # halfway between bf16 neighbours, the lower odd: rounds up
    x[:, 1] = 1.0 + 2**-8  # halfway, the lower even: rounds down
    x[:, 2] *= 1e15
    from_fp32, from_bf16 = torch.zeros(40, 40), torch.zeros(40, 40)
    gram_bf16.gram_update(from_fp32, x, 0.0, 1.0)
    gram_bf16.gram_update(from_bf16, x.bfloat16(), 0.0, 1.0)
    assert torch.equal(from_fp32, from_bf16)
    assert from_fp32[0, 0] == 301 * (1 + 2**-6) ** 2 and from_fp32[1, 1] == 301


def test_refuses_anything_but_bf16_or_fp32_rows_and_an_fp32_square():
    with pytest.raises(ValueError, match="bf16 or fp32"):
        gram_bf16.gram_update(torch.zeros(4, 4), torch.zeros(8, 4, dtype=torch.float16), 1.0, 1.0)
    with pytest.raises(ValueError, match="fp32 h"):
        gram_bf16.gram_update(torch.zeros(5, 5), torch.zeros(8, 4, dtype=torch.bfloat16), 1.0, 1.0)
