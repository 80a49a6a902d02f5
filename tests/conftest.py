import os

import pytest
import torch

# Without CUDA, tests run Triton kernels under the CPU interpreter. With CUDA they compile (fixtures/triton_mode.py):
# CUDA graphs cannot capture interpreted kernels. Either way this must happen before any module applies @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared, oversubscribed CPU every parallel region (SDPA's
    CPU kernel opens one per call) can wait a scheduler slice for its second thread, 10-50x the work itself.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
