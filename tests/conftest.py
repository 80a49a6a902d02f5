import os
from pathlib import Path

import pytest
import torch

# Without CUDA, tests run Triton kernels under the CPU interpreter. With CUDA they compile (fixtures/triton_mode.py):
# CUDA graphs cannot capture interpreted kernels. Either way this must happen before any module applies @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Servers the tests start measure precision afresh and write nothing to the home directory; the tests of the
# precision cache name their own files.
os.environ.setdefault("ROADWORK_PRECISION_CACHE", "off")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared, oversubscribed CPU every parallel region (SDPA's
    CPU kernel opens one per call) can wait a scheduler slice for its second thread, 10-50x the work itself.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm_cascade_models(tmp_path_factory) -> Path:
    """det-a (DEIMv2), cls (a classifier on det-a's backbone) and vlm (Qwen3-VL): the models of cascades that end in a
    VLM stage, laid out as fixtures.bundles' stage writers expect."""
    from fixtures.checkpoints import write_preprocessor  # transformers: imported only by the modules that use it
    from fixtures.deimv2_checkpoints import classifier_sharing_backbone, make_deimv2
    from fixtures.vlm_checkpoints import make_qwen3_vl

    root = tmp_path_factory.mktemp("models")
    make_deimv2(root / "det-a", seed=0)
    write_preprocessor(root / "det-a", "dinov3", (64, 64))
    classifier_sharing_backbone(root / "det-a", root / "cls", seed=3, input_size=64)
    make_qwen3_vl(root / "vlm", seed=2)
    return root
