"""The graph runner: bucketing, splitting, and results independent of batch companions and padding."""
from __future__ import annotations

import pytest
import torch

from graphs.runner import BucketGraphs, GraphRunner, default_buckets
from runtime.models.classifier import load_classifier
from fixtures.checkpoints import make_dinov3, make_vit


def test_default_buckets():
    assert default_buckets(1) == (1,)
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)


def test_bucket_for_and_chunks():
    runner = GraphRunner(lambda x: (x.sum((1, 2, 3)),), (3, 4, 4), torch.float32, "cpu", (1, 2, 4, 8))
    assert [runner.bucket_for(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert runner.chunks(8) == [(0, 8)]
    assert runner.chunks(19) == [(0, 8), (8, 8), (16, 3)]
    with pytest.raises(AssertionError):
        runner.bucket_for(9)


@pytest.mark.parametrize("make", [make_dinov3, make_vit], ids=["dinov3", "vit"])
def test_result_independent_of_batch_and_bucket(tmp_path, make):
    make(tmp_path)
    model = load_classifier(tmp_path, torch.float32)
    runner = GraphRunner(model, (3, 32, 32), torch.float32, "cpu", default_buckets(16))
    runner.warmup()
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 32, 32, generator=g)

    runner.input[0] = target
    alone = runner.run(1)[1][0].clone()
    for n, slot in [(3, 2), (5, 4), (16, 9)]:  # buckets 4, 8, 16; stale padding rows left in place
        runner.input[:n] = torch.randn(n, 3, 32, 32, generator=g) * 3
        runner.input[slot] = target
        torch.testing.assert_close(runner.run(n)[1][slot], alone, atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager(tmp_path):
    make_dinov3(tmp_path)
    model = load_classifier(tmp_path, torch.float32, "cuda")
    runner = GraphRunner(model, (3, 32, 32), torch.float32, "cuda", (1, 2, 4, 8))
    runner.warmup()
    assert set(runner.graphs) == {1, 2, 4, 8}
    x = torch.randn(5, 3, 32, 32, device="cuda")
    runner.input[:5] = x
    replayed = runner.run(5)[1].clone()
    with torch.inference_mode():
        eager = model(x)[1]
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)


def test_rows_scalar_tells_padding_apart():
    """Functions see how many rows of their bucket are real through `runner.rows` (a device scalar)."""
    runner = GraphRunner(lambda x: ((torch.arange(x.shape[0]) < runner.rows).float(),), (1,), torch.float32, "cpu",
                         (1, 2, 4, 8))
    assert runner.run(3)[0].tolist() == [1, 1, 1]
    assert runner.rows.item() == 3
    assert runner.replay(4)[0].tolist() == [1, 1, 1, 0]  # the bucket of 3 is 4: one padding row


def test_bucket_graphs_segment_writes_static_buffers():
    """A segment reads and writes static max-batch buffers; replay returns the bucket's outputs."""
    src = torch.arange(8, dtype=torch.float32)
    dst = torch.zeros(8)

    def segment(b: int) -> tuple[torch.Tensor, ...]:
        dst[:b].copy_(src[:b] * 2)
        return (dst[:b],)

    graphs = BucketGraphs(segment, (2, 4, 8), "cpu")
    graphs.warmup()
    assert not graphs.graphs  # CPU: eager
    dst.zero_()
    assert graphs.replay(4)[0].tolist() == [0, 2, 4, 6] and dst.tolist() == [0, 2, 4, 6, 0, 0, 0, 0]
    with pytest.raises(AssertionError):
        graphs.replay(3)  # only buckets run


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_segments_share_a_pool_and_replay_in_any_order():
    """Two segments captured into one pool: each keeps what it hands on in static buffers, so the other's
    temporaries never clobber it, whatever the replay order."""
    w = torch.randn(16, 16, device="cuda")
    a_in, a_out, b_out = torch.randn(8, 16, device="cuda"), torch.zeros(8, 16, device="cuda"), torch.zeros(8, 16,
                                                                                                        device="cuda")

    def first(n):
        a_out[:n].copy_((a_in[:n] @ w).softmax(-1) + 1)
        return (a_out[:n],)

    def second(n):
        b_out[:n].copy_((a_out[:n] @ w).relu() * 3)
        return (b_out[:n],)

    pool = torch.cuda.graph_pool_handle()
    segments = [BucketGraphs(first, (4, 8), "cuda"), BucketGraphs(second, (4, 8), "cuda")]
    for s in segments:
        s.warmup(pool)
    assert all(set(s.graphs) == {4, 8} for s in segments)
    for order in ([0, 1], [1, 0], [0, 1, 1]):
        a_in.normal_()
        for i in order:
            segments[i].replay(4)
        torch.testing.assert_close(a_out[:4], (a_in[:4] @ w).softmax(-1) + 1)
        segments[1].replay(8)
        torch.testing.assert_close(b_out, (a_out @ w).relu() * 3)
