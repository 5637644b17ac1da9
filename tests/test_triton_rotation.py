import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernel on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from treeq.kernels.triton_rotation import triton_available, triton_rotate  # noqa: E402
from treeq.runtime import rotation  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed (pip install treeq[triton])")


@pytest.mark.parametrize("kind", ["round_robin", "random"])
@pytest.mark.parametrize("rows", [1, 19])
def test_triton_rotation_matches_the_torch_reference(kind, rows):
    pairs, frozen = rotation.schedule(kind, 96, 32, 3, seed=4)
    theta = torch.randn(3, 48, generator=torch.Generator().manual_seed(0)) * (~frozen)
    x = torch.randn(2, rows, 96)
    expected = rotation.rotate(x, pairs, theta, 32)
    out = triton_rotate(x, pairs, theta, 32, block_rows=8)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x)
