"""The graph runner: bucketing, splitting, and results independent of batch companions and padding; closing, which
frees graph sets by reference counting (no cycles), and leaves other sets' graphs replaying right."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from graphs.runner import BucketGraphs, GraphRunner, default_buckets
from runtime.cascade.engine import Engine
from runtime.models.classifier import load_classifier
from fixtures.bundles import classifier_stage, detector_stage, write_bundle
from fixtures.checkpoints import make_dinov3, make_vit, write_preprocessor
from fixtures.deimv2_checkpoints import classifier_sharing_backbone, make_deimv2
from fixtures.images import tinted_images


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


def test_a_closed_runner_is_freed_without_the_cyclic_gc():
    """Graph sets hold no reference cycle, so dropping the last reference frees one (and its graphs) at once, not at
    whatever time the cyclic GC runs."""
    weight = torch.randn(4, 2)
    gc.disable()
    try:
        runner = GraphRunner(lambda x: (x @ weight,), (4,), torch.float32, "cpu", (1, 2))
        runner.warmup()
        ref = weakref.ref(runner)
        runner.close()
        runner.close()  # idempotent
        del runner
        assert ref() is None
    finally:
        gc.enable()


def test_engine_close_closes_every_graph_set_and_frees_them_without_the_cyclic_gc(tmp_path, monkeypatch):
    make_deimv2(tmp_path / "det-a", seed=0)
    write_preprocessor(tmp_path / "det-a", "dinov3", (64, 64))
    classifier_sharing_backbone(tmp_path / "det-a", tmp_path / "cls", seed=3, input_size=64)
    bundle = write_bundle(tmp_path / "bundle", classifier_stage(tmp_path, 0.0, 1.0)
                          + detector_stage(tmp_path, 0.5, None))  # nothing exits: the detectors run
    closed: list[BucketGraphs] = []
    close = BucketGraphs.close
    monkeypatch.setattr(BucketGraphs, "close", lambda self: closed.append(self) or close(self))
    gc.disable()
    try:
        engine = Engine.load(bundle, "cpu", "float32", max_batch=2)
        images = tinted_images()[:3]
        assert {r.stage for r in engine.predict(images)} == {"detectors"}
        detectors = engine.cascade.later[0]
        sets = [engine.runner, detectors.graphs, *detectors.member_graphs.values()]
        assert len(sets) == 3
        engine.close()
        assert {id(s) for s in closed} == {id(s) for s in sets}
        assert {r.stage for r in engine.predict(images)} == {"detectors"}  # closed sets run eagerly
        refs = [weakref.ref(s) for s in sets]
        del engine, detectors, sets
        closed.clear()
        assert [r() for r in refs] == [None] * 3
    finally:
        gc.enable()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_closing_one_graph_set_leaves_another_replaying_right():
    """Each set captures on its own stream: destroying one set's graphs (on some torch builds that clears its capture
    stream's cuBLAS workspaces, pytorch#193402) and handing its memory back leaves another set's replays right."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
              for _ in range(2)]
    keep, drop = [GraphRunner(lambda x, m=m: (m(x),), (256,), torch.float32, "cuda", (4, 8)) for m in models]
    for runner in (keep, drop):
        runner.warmup()
        assert set(runner.graphs) == {4, 8}
    assert keep.stream != drop.stream
    ref = weakref.ref(drop)
    drop.close()
    del drop
    assert ref() is None
    torch.cuda.empty_cache()
    junk = torch.full((64 << 20,), float("nan"), device="cuda")  # reuses what was freed, if anything was
    for n in (3, 8):
        x = torch.randn(n, 256, device="cuda")
        keep.input[:n] = x
        got = keep.run(n)[0].clone()
        with torch.inference_mode():
            want = models[0](x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    del junk
