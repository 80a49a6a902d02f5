"""The CUDA paths a review found wrong (issue 19), checked on the CPU where the logic allows: which device and stream
a capture or launch would use (torch.cuda's entry points recorded by a stand-in, since there is no GPU to ask), and
on CUDA for real (those tests skip without it)."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels.kv_store_triton
import kernels.paged_attention_triton
import kernels.preprocess_triton
import kernels.route
import kernels.route_triton
import kernels.vlm_preprocess_triton
import kernels.vote_triton
import runtime.cascade.pipeline as pipeline
import runtime.vlm.attention as attention
from fixtures.triton_mode import COMPILED_ON_CUDA, INTERPRETED, KERNEL_DEVICE
from graphs import nvtx
from graphs.runner import BucketGraphs
from kernels.launch import launch_device
from kernels.paged_attention import decode_tile_tokens, paged_decode_reference
from kernels.paged_attention_triton import paged_decode_triton
from kernels.preprocess import preprocess_reference
from kernels.preprocess_triton import _device_taps, preprocess_triton
from runtime.cascade.vlm_loop import VLMLoop, handover, loop_scope
from runtime.cascade.vlm_memory import runtime_bytes
from runtime.cascade.vlm_stage import VLMStage
from runtime.models.qwen3_vl import Qwen3VLConfig
from runtime.transfer import to_device
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from runtime.vlm.sequence import SamplingParams, image_digest
from runtime.models.preprocessor import preprocess_spec, vision_preprocess_spec
from runtime.cascade.classifier_stage import image_tensor
from runtime.cascade.stage import ChunkImages
from fixtures.images import random_image
from fixtures.vlm_checkpoints import TINY, make_qwen3_vl
from fixtures.paged_attention import paged_layout

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
compiled = pytest.mark.skipif(not COMPILED_ON_CUDA, reason="needs CUDA with compiled Triton kernels")
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "default"


# --- a stand-in for torch.cuda's device/stream/graph entry points -------------------------------------------------


class FakeStream:
    def __init__(self, device):
        self.device = torch.device(device)

    def wait_stream(self, other):
        pass


class FakeCuda:
    """Tracks the current device the way torch.cuda does (torch.cuda.stream(s) also makes s's device current)."""

    def __init__(self):
        self.current = 0
        self.captures: list[tuple[torch.device, int]] = []  # (capture stream's device, current device inside)
        self.launched = 0

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = before

    def stream(self, stream):
        return self.device(stream.device)

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        assert stream is not None, "a capture without stream= uses torch's one process-wide capture stream"
        launched = self.launched
        with self.stream(stream):
            self.captures.append((stream.device, self.current))
            yield
        if self.launched == launched:
            warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted to be captured "
                          "on wrong device or stream.", UserWarning)

    def install(self, monkeypatch):
        for name, value in {"device": self.device, "stream": self.stream, "graph": self.graph,
                            "Stream": FakeStream, "current_stream": FakeStream, "CUDAGraph": lambda: object(),
                            "graph_pool_handle": lambda: ("pool", self.current),
                            "synchronize": lambda device=None: None}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_each_device_captures_on_its_own_stream_with_its_device_current(monkeypatch):
    """The VLM's graphs first on cuda:1, then the vision segments on cuda:0 (docs/bundle.md's two-GPU layout)."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    calls: list[tuple[str, int]] = []

    def segment(name):
        def fn(b):
            calls.append((name, fake.current))
            fake.launched += 1
            return ()
        return fn

    order = [("vlm", "cuda:1"), ("classifier", "cuda:0"), ("detectors", "cuda:0")]
    sets = [BucketGraphs(segment(name), (1, 2), device, use_cuda_graphs=True) for name, device in order]
    for graphs in sets:
        graphs.warmup()
    assert fake.captures == [(torch.device("cuda:1"), 1)] * 2 + [(torch.device("cuda:0"), 0)] * 4
    # Eager warm-up, the pre-capture runs and the captures themselves: always with the segment's device current.
    assert {name: {d for n, d in calls if n == name} for name, _ in order} == {"vlm": {1}, "classifier": {0},
                                                                             "detectors": {0}}
    # Each set on a capture stream of its own (no cuBLAS workspace shared between sets), on the set's device.
    assert len({id(graphs.stream) for graphs in sets}) == len(sets)
    assert [graphs.stream.device for graphs in sets] == [torch.device(device) for _, device in order]


def test_an_empty_capture_raises(monkeypatch):
    FakeCuda().install(monkeypatch)
    graphs = BucketGraphs(lambda b: (), (1,), "cuda:0", use_cuda_graphs=True)
    with pytest.raises(RuntimeError, match="recorded no work"):
        graphs.warmup()


@cuda
@compiled
@pytest.mark.cuda
def test_cuda_captures_on_every_device_replay_fresh_outputs():
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())][::-1]  # the last GPU first
    for device in devices:
        x, out = torch.randn(4, 8, device=device), torch.zeros(4, 8, device=device)

        def fn(b, x=x, out=out):
            out[:b].copy_(x[:b] * 2 + 1)
            return (out[:b],)

        graphs = BucketGraphs(fn, (2, 4), device)
        graphs.warmup()
        x.normal_()
        torch.testing.assert_close(graphs.replay(4)[0], x * 2 + 1)


# --- Triton launches under their tensors' device ------------------------------------------------------------------


def test_launch_device_names_the_tensors_device():
    assert launch_device(torch.device("cuda:1")).idx == 1
    assert isinstance(launch_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_dispatcher_launches_under_its_tensors_device(monkeypatch):
    seen: dict[str, list[torch.device]] = {}
    modules = (kernels.preprocess_triton, kernels.route_triton, kernels.vote_triton, kernels.kv_store_triton,
               kernels.paged_attention_triton, kernels.vlm_preprocess_triton)
    for module in modules:
        def record(device, name=module.__name__):
            seen.setdefault(name, []).append(device)
            return contextlib.nullcontext()
        monkeypatch.setattr(module, "launch_device", record)
    dev = KERNEL_DEVICE
    spec = preprocess_spec({"image_processor_type": "ViTImageProcessor",
                                                    "size": {"height": 8, "width": 8}})
    preprocess_triton(torch.zeros(12, 10, 3, dtype=torch.uint8, device=dev), spec, torch.empty(3, 8, 8, device=dev))
    kernels.route_triton.route_triton(
        torch.rand(4, device=dev), torch.tensor([4], dtype=torch.int32, device=dev), 0.2, 0.8,
        torch.zeros(4, dtype=torch.int8, device=dev), torch.zeros(4, dtype=torch.int32, device=dev),
        torch.zeros(1, dtype=torch.int32, device=dev))
    kernels.vote_triton.vote_triton(
        torch.randn(2, 3, device=dev), torch.tensor([0, 3], dtype=torch.int32, device=dev),
        torch.tensor([0.5], device=dev), torch.tensor([1.0], device=dev), torch.rand(2, device=dev),
        0.0, 2 / 3, torch.zeros(2, 1, device=dev), torch.zeros(2, device=dev), torch.zeros(2, device=dev))
    cache = torch.zeros(2, 4, 1, 8, device=dev)
    kernels.kv_store_triton.kv_store_triton(torch.ones(1, 1, 8, device=dev), torch.ones(1, 1, 8, device=dev), cache,
                                            cache.clone(), torch.tensor([3], device=dev))
    paged_decode_triton(torch.randn(1, 2, 8, device=dev), cache, cache, torch.tensor([[0]], dtype=torch.int32,
                        device=dev), torch.tensor([3], dtype=torch.int32, device=dev), 0.3)
    vision = vision_preprocess_spec(
        {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "merge_size": 2, "temporal_patch_size": 1})
    kernels.vlm_preprocess_triton.patchify_triton(torch.randn(3, 8, 8, device=dev), vision,
                                                  torch.empty(4, 48, device=dev))
    assert {name: set(devices) for name, devices in seen.items()} == {
        m.__name__: {dev} for m in modules}
    assert len(seen["kernels.preprocess_triton"]) == 1  # both resize passes under one guard


# --- tests run Triton compiled on CUDA ----------------------------------------------------------------------------


def test_kernels_are_interpreted_only_without_cuda():
    assert INTERPRETED == (type(kernels.route_triton.route_kernel).__name__ == "InterpretedFunction")
    assert KERNEL_DEVICE.type == ("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
    if not torch.cuda.is_available():
        assert INTERPRETED  # conftest turned the interpreter on


@cuda
@compiled
@pytest.mark.cuda
def test_a_captured_triton_kernel_replays_with_new_inputs():
    prob, rows = torch.zeros(4, device="cuda"), torch.tensor([4], dtype=torch.int32, device="cuda")
    exits, index, count = (torch.zeros(4, dtype=torch.int8, device="cuda"),
                           torch.zeros(4, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda"))
    graphs = BucketGraphs(lambda b: kernels.route.route(prob[:b], rows, 0.2, 0.8, exits[:b], index, count) or (count,),
                          (4,), "cuda")
    graphs.warmup()
    for values, want in (([0.1, 0.5, 0.9, 0.5], 2), ([0.5, 0.5, 0.5, 0.0], 3)):
        prob.copy_(torch.tensor(values))
        graphs.replay(4)
        assert count.item() == want


# --- no recompiles on the request path; the resize in two passes -------------------------------------------------


def unspecialised(kernel) -> set[str]:
    names = kernel.kwargs["do_not_specialize"] if hasattr(kernel, "kwargs") else kernel.do_not_specialize
    return {n if isinstance(n, str) else kernel.arg_names[n] for n in names}


def test_per_image_sizes_are_not_specialised():
    assert unspecialised(kernels.preprocess_triton.resample_kernel) >= {"src_h", "src_w", "taps", "first_off",
                                                                         "cross_off"}
    assert unspecialised(kernels.vlm_preprocess_triton.patchify_kernel) >= {"height", "width", "blocks_w"}
    assert unspecialised(kernels.paged_attention_triton.paged_decode_kernel) >= {"block_table_stride"}


def test_first_pass_covers_only_the_rows_a_center_crop_reads():
    taps = _device_taps(400, 100, 20, 60, 3, True, torch.device("cpu"))  # rows 20..79 of a 400 -> 100 resize
    first = taps.first.tolist()
    assert taps.lo == first[0] > 0 and taps.hi == first[-1] + taps.taps < 400
    assert taps.weight.dtype == torch.int32  # Pillow's fixed point


@pytest.mark.parametrize("h,w", [(600, 130), (90, 700)])  # each pass order (Pillow >= 13 picks by shrink factors)
def test_two_pass_resize_with_center_crop_matches_pillow(h, w):
    spec = preprocess_spec({
        "image_processor_type": "ViTImageProcessor", "size": {"shortest_edge": 40}, "do_center_crop": True,
        "crop_size": {"height": 24, "width": 32}, "resample": 3})
    image = torch.from_numpy(np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = torch.empty(3, 24, 32)
    preprocess_reference(image, spec, want)
    got = torch.empty(3, 24, 32, device=KERNEL_DEVICE)
    preprocess_triton(image.to(KERNEL_DEVICE), spec, got)
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=0)


@cuda
@compiled
@pytest.mark.cuda
def test_new_image_sizes_compile_nothing_new():
    spec = preprocess_spec({"image_processor_type": "ViTImageProcessor",
                                                    "size": {"height": 224, "width": 224}})
    out = torch.empty(3, 224, 224, device="cuda")
    kernel = kernels.preprocess_triton.resample_kernel

    def variants():
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    preprocess_triton(torch.zeros(480, 640, 3, dtype=torch.uint8, device="cuda"), spec, out)
    before = variants()
    for h, w in ((481, 643), (1000, 333), (4000, 3000), (224, 224), (17, 1024)):
        preprocess_triton(torch.zeros(h, w, 3, dtype=torch.uint8, device="cuda"), spec, out)
    assert variants() == before


# --- flashinfer: probed at startup, the Triton kernel on any failure ----------------------------------------------


class FakeWrapper:
    """flashinfer's decode wrapper as far as the probe uses it; `mode` picks how it behaves."""
    mode = "right"

    def __init__(self, workspace, kv_layout, **kw):
        assert kv_layout == "NHD"

    def plan(self, indptr, indices, last_page_len, heads, kv_heads, head_dim, page_size, **kw):
        if self.mode == "no nvcc":
            raise RuntimeError("Could not find nvcc and default cuda_home='/usr/local/cuda' doesn't exist")
        self.table = (indptr, indices, last_page_len)
        self.scale = kw["sm_scale"]

    def run(self, q, caches):
        indices = self.table[1].long()
        length = (len(indices) - 1) * caches[0].shape[1] + int(self.table[2][0])
        tables = indices[None].to(torch.int32)
        out = paged_decode_reference(q.float(), caches[0].float(), caches[1].float(), tables,
                                     torch.tensor([length], dtype=torch.int32), self.scale)
        return (out + (1.0 if self.mode == "wrong" else 0.0)).to(q.dtype)


@pytest.mark.parametrize("mode,why", [("right", None), ("no nvcc", "probe failed: RuntimeError: Could not find nvcc"),
                                      ("wrong", "differs from the reference by 1")])
def test_flashinfer_probe(monkeypatch, mode, why):
    monkeypatch.setattr(FakeWrapper, "mode", mode)
    fake = type("flashinfer", (), {"BatchDecodeWithPagedKVCacheWrapper": FakeWrapper})
    monkeypatch.setattr(attention, "flashinfer_module", lambda: fake)
    spec = attention.DecodeAttentionSpec(8, 2, 64, 16, torch.bfloat16, 0.125)
    got = attention.flashinfer_unusable(spec, torch.zeros(16, dtype=torch.uint8))
    assert got == why if why is None else why in got


def test_flashinfer_group_sizes():
    gpu = torch.device("cuda")
    six = "flashinfer" if 6 in attention.flashinfer_group_sizes() else "triton"  # by the installed version
    if six == "triton":
        spec = attention.DecodeAttentionSpec(12, 2, 128, 16, torch.bfloat16, 0.1)  # 6 query heads per kv head
        assert "GQA group size 6" in attention.flashinfer_unusable(spec, torch.zeros(1, dtype=torch.uint8))
    assert attention.choose_decode_backend(gpu, torch.bfloat16, 128, True, group=6) == six
    assert attention.choose_decode_backend(gpu, torch.bfloat16, 128, True, group=8) == "flashinfer"


# --- the VLM path: digests from the host, one read for the scores, its own stream ---------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    make_qwen3_vl(path, TINY, seed=1)
    return path


def test_engine_takes_the_callers_digests(tiny_vlm, monkeypatch):
    engine = VLMEngine.load(tiny_vlm, config=VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256))
    image = random_image(40, 56, seed=1)
    monkeypatch.setattr("runtime.vlm.engine.image_digest", lambda image: pytest.fail("hashed again"))
    rid = engine.add_request("Is there roadwork?", [image], score=True, digests=[1234])
    assert engine.requests[rid].images[0].digest == 1234


def test_scores_of_a_batch_in_one_read(monkeypatch):
    from runtime.vlm.scheduler import yes_probabilities
    seqs = [type("S", (), {"score_token_ids": ids})() for ids in ((3, 1), None, (0, 2))]
    logits = torch.randn(3, 5)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    got = yes_probabilities(logits, seqs)
    assert reads == [torch.Size([2])]
    for row in (0, 2):
        yes, no = seqs[row].score_token_ids
        assert got[row] == pytest.approx(torch.softmax(logits[row, [yes, no]], 0)[0].item(), rel=1e-6)
    assert set(got) == {0, 2}


def test_cascade_hands_the_vlm_host_images_and_their_digests():
    images = [np.full((20, 30, 3), v, dtype=np.uint8) for v in (1, 2, 3)]
    seen = {}
    stage = object.__new__(VLMStage)  # the stage's parts the cascade calls, without a model behind them
    stage.breaker = type("B", (), {"allow": lambda self: True, "record_success": lambda self: None})()
    stage.time_budget_s, stage.name = None, "vlm"

    def score(host, digests, deadline=None):
        seen.update(host=host, digests=digests)
        return [type("A", (), {"p": 0.5, "tokens": {}})() for _ in host]

    stage.score = score
    host = [image_tensor(image) for image in images]
    pipeline.Cascade.call(stage, [0, 2], ChunkImages(host, host), False)
    assert all(t.device.type == "cpu" for t in seen["host"])
    assert seen["digests"] == [image_digest(images[0]), image_digest(images[2])]


def test_vlm_loop_runs_on_its_device_and_stream(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(("device", d)) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: entered.append(("stream", s)) or contextlib.nullcontext())
    with loop_scope(torch.device("cuda:1"), "vlm stream"):
        pass
    assert entered == [("device", torch.device("cuda:1")), ("stream", "vlm stream")]
    entered.clear()
    with loop_scope(torch.device("cpu"), None):
        pass
    assert entered == []
    assert handover([torch.zeros(2, 2, 3, dtype=torch.uint8)]) == [None]  # host images need no event


@cuda
@pytest.mark.cuda
def test_images_handed_across_streams_are_waited_for():
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(producer):  # the caller's thread: its image is still being written when it hands it over
        image = torch.full((64, 64, 3), 7, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(50_000_000)
        image.add_(1)
        ready = handover([image])
    loop = object.__new__(VLMLoop)  # only its stream and adopt
    loop.stream = consumer
    with torch.cuda.stream(consumer):
        loop.adopt([image], ready)
        total = image.sum(dtype=torch.int64)
    assert total.item() == 8 * image.numel()


# --- smaller ones ---------------------------------------------------------------------------------------------------


def test_decode_tiles_bound_registers():
    assert decode_tile_tokens(8, 128, 16, on_cuda=True) == 4  # GQA 8 x head_dim 128: 4096 products a tile
    assert decode_tile_tokens(2, 128, 16, on_cuda=True) == 16
    assert decode_tile_tokens(8, 128, 16, on_cuda=False) == 16  # the interpreter takes whole pages


@pytest.mark.parametrize("tile", [1, 2, 4])
def test_paged_decode_in_tiles_matches_reference(tile):
    lens = [1, 5, 13, 0]
    k_cache, v_cache, tables = paged_layout(lens, 16, 8, 2, 16, seed=tile)
    q = torch.randn(len(lens), 8, 16, generator=torch.Generator().manual_seed(tile))
    context = torch.tensor(lens, dtype=torch.int32)
    want = paged_decode_reference(q, k_cache, v_cache, tables, context, 0.25)
    got = paged_decode_triton(*(t.to(KERNEL_DEVICE) for t in (q, k_cache, v_cache, tables, context)), 0.25,
                              tile_tokens=tile).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_vlm_memory_check_counts_graph_logits_and_workspace(monkeypatch):
    cfg = Qwen3VLConfig.from_dict(json.loads((BUNDLE / "vlm" / "config.json").read_text()))
    config = VLMEngineConfig(max_num_seqs=32)
    assert runtime_bytes(cfg, config, torch.device("cpu"), torch.bfloat16) == 0
    monkeypatch.setattr("runtime.cascade.vlm_memory.flashinfer_module", lambda: None)
    logits = cfg.text.vocab_size * (4 * (1 + 2 + 4 + 8 + 16 + 32) + 2 * 32)
    assert runtime_bytes(cfg, config, torch.device("cuda"), torch.bfloat16) == logits
    monkeypatch.setattr("runtime.cascade.vlm_memory.flashinfer_module", lambda: object())
    expected = logits + (attention.FLASHINFER_WORKSPACE_BYTES if cfg.text.head_dim in attention.FLASHINFER_HEAD_DIMS
                         and cfg.text.num_heads // cfg.text.num_kv_heads in attention.flashinfer_group_sizes() else 0)
    assert runtime_bytes(cfg, config, torch.device("cuda"), torch.bfloat16) == expected


def test_to_device_on_cpu_is_the_tensor():
    image = torch.zeros(4, 4, 3, dtype=torch.uint8)
    assert to_device(image, torch.device("cpu")) is image


@cuda
@pytest.mark.cuda
def test_to_device_copies_through_pinned_memory():
    image = torch.randint(0, 256, (300, 200, 3), dtype=torch.uint8)
    got = to_device(image, torch.device("cuda"))
    assert got.is_cuda and torch.equal(got.cpu(), image)


# --- NVTX ranges ----------------------------------------------------------------------------------------------------


@pytest.fixture
def ranges(monkeypatch):
    """The NVTX ranges pushed while NVTX is on: (name, depth) in push order, each popped."""
    pushed, depth = [], []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pushed.append((name, len(depth))) or
                        depth.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: depth.pop())
    monkeypatch.setattr(nvtx, "_enabled", True)
    yield pushed
    assert depth == [], "a range was never popped"


def test_nvtx_is_a_shared_no_op_when_off(monkeypatch):
    monkeypatch.setattr(nvtx, "_enabled", False)
    assert nvtx.nvtx_range("a") is nvtx.nvtx_range("b")
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pytest.fail("pushed while off"))
    with nvtx.nvtx_range("classifier"):
        pass


def test_nvtx_ranges_around_decode_preprocess_each_stage_and_the_vote(tmp_path, ranges):
    from runtime.cascade.engine import Engine
    from runtime.image_decode import decode_image

    toml = (BUNDLE / "cascade.toml").read_text().split("[[stage]]")
    text = "[[stage]]".join(toml[:3]).replace('model = "', f'model = "{BUNDLE}/')  # classifier and detectors only
    text = "\n".join(line for line in text.splitlines() if not line.startswith("exit_")
                     or text.index(line) < text.index('kind = "detectors"'))  # the last stage routes nowhere
    (tmp_path / "cascade.toml").write_text(text)
    engine = Engine.load(tmp_path, "cpu", "float32", max_batch=4)
    images = [decode_image((BUNDLE.parents[1] / "samples" / f).read_bytes())
              for f in ("roadwork_1.jpg", "roadwork_2.jpg", "none_2.jpg")]
    assert [name for name, _ in ranges] == ["decode"] * 3
    ranges.clear()
    results = engine.predict(images)
    assert any(r.stage == "detectors" for r in results)  # these samples reach the detectors
    top = [name for name, depth in ranges if depth == 0]
    assert top == ["preprocess", "classifier", "detectors"]
    assert ("bucket 4", 1) in ranges  # the classifier's graph bucket, inside its stage's range
    assert ("vote", 2) in ranges  # inside the detectors' bucket


def test_nvtx_ranges_around_vlm_prefill_and_decode(tiny_vlm, ranges):
    engine = VLMEngine.load(tiny_vlm, config=VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256))
    engine.generate(["Describe the street."], sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [name for name, _ in ranges] == ["vlm prefill", "vlm decode", "vlm decode"]
