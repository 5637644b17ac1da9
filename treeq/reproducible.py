"""Results that do not depend on how many threads computed them.

Threaded dispatch splits the thread budget among modules quantized side by side, so the same module
is computed with 2 threads in a serial run and 1 in a dispatched one; yet the checkpoints must be
identical bit for bit. Two sources of thread-dependent rounding exist on CPU:
- MKL's matrix products, unless MKL runs in its strict reproducible mode (``MKL_CBWR`` with
  ``STRICT``), which must be chosen before MKL's first call: importing treeq sets it unless the
  user already has (about 5% slower on large products);
- MKL's LAPACK factorizations, which have no such mode: :func:`single_threaded` runs them on one
  thread (GPTQ's Cholesky of a 5632-wide Hessian: about 3 s).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

MKL_MODE = "AUTO,STRICT"


def request_reproducible_blas() -> None:
    os.environ.setdefault("MKL_CBWR", MKL_MODE)


_lock = threading.Lock()


@contextmanager
def single_threaded():
    """torch's thread count is process-wide, so concurrent callers take turns."""
    import torch

    with _lock:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
