"""The first stage: backbone + classifier head over the static pixel batch, then the route kernel, on every image."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from graphs.runner import GraphRunner, default_buckets, weak_method
from kernels.preprocess import PreprocessSpec, preprocess_into
from kernels.route import route
from runtime.cascade.bundle import ClassifierStageSpec
from runtime.cascade.results import StageAnswer
from runtime.cascade.stage import ChunkImages, GraphPools, warm_segment
from runtime.models.classifier import Classifier
from runtime.models.onnx_classifier import OnnxClassifier
from runtime.models.tensorrt_classifier import TensorRTClassifier
from runtime.transfer import to_device


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a decoded image. Decoded arrays are read-only and are never written through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(image))


class ClassifierStage:
    """Segment 1: backbone -> head -> P(roadwork) -> route kernel (exit mask, index list, count) on the device.
    The raw backbone layers that sharing detectors need are kept in static max-batch buffers.
    On backend "onnxruntime" the model is an OnnxClassifier: the exported fp32 graph on fp32 pixels, run eagerly
    (ONNX Runtime runs it through host memory, so no CUDA graph is captured), and no detector reads its backbone.
    On "tensorrt" a TensorRTClassifier: the graph as a TensorRT engine on fp32 pixels, likewise eager, unshared."""
    breaker = None
    time_budget_s = None

    def __init__(self, spec: ClassifierStageSpec, model: Classifier | OnnxClassifier | TensorRTClassifier,
                 preprocess: PreprocessSpec, device: torch.device, dtype: torch.dtype, max_batch: int, routes: bool,
                 keep_layers: tuple[int, ...] = ()):
        self.spec, self.name, self.model, self.preprocess = spec, spec.name, model, preprocess
        self.device, self.routes, self.keep_layers = device, routes, keep_layers
        self.exported = spec.backend != "torch"  # the tools.export graph: fp32 pixels in, P(roadwork) out
        assert not (self.exported and keep_layers), f"no detector shares a {spec.backend} classifier's backbone"
        self.runner = GraphRunner(weak_method(self.segment), (3, preprocess.height, preprocess.width),
                                  torch.float32 if self.exported else dtype, device, default_buckets(max_batch),
                                  use_cuda_graphs=False if self.exported else None)
        self.prob = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self.hidden = []
        if keep_layers:
            backbone = model.backbone
            tokens = backbone.num_prefix_tokens + (preprocess.height // backbone.cfg.patch_size[0]) * (
                preprocess.width // backbone.cfg.patch_size[1])
            self.hidden = [torch.zeros(max_batch, tokens, backbone.cfg.block.hidden_size, dtype=dtype, device=device)
                           for _ in keep_layers]
        # count and index list in one buffer, so the host reads both in one transfer.
        self.route_buf = torch.zeros(1 + max_batch, dtype=torch.int32, device=device)
        self.count, self.index = self.route_buf[:1], self.route_buf[1:]
        self.exits = torch.zeros(max_batch, dtype=torch.int8, device=device)

    def segment(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        if self.exported:
            self.prob[:b].copy_(self.model(x)[0])
        else:
            seq, hidden = self.model.backbone(x, hidden_layers=self.keep_layers)
            self.prob[:b].copy_(self.model.probability(self.model.classifier(self.model.head_features(seq))))
            for buf, h in zip(self.hidden, hidden):
                buf[:b].copy_(h)
        if self.routes:
            route(self.prob[:b], self.runner.rows, self.spec.exit_below, self.spec.exit_above, self.exits[:b],
                  self.index, self.count)
        return (self.prob[:b],)

    def load(self, images: list[np.ndarray]) -> ChunkImages:
        """Preprocess into the static batch; returns the images, on the host and on the device, for the stages
        that preprocess again. Slots past len(images) keep stale pixels: rows never interact, so padding needs
        no clearing."""
        host = [image_tensor(image) for image in images]
        on_device = [to_device(image, self.device) for image in host]
        for slot, image in enumerate(on_device):
            preprocess_into(self.runner.input, slot, image, self.preprocess)
        return ChunkImages(host, on_device)

    def run(self, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer]:
        """Segment 1 on the first n slots (every image of the chunk, loaded by `load`). Which rows go on is the
        route kernel's decision, read with the probabilities: the index list stays on the device for segment 2."""
        n = len(pending)
        assert pending == list(range(n)) and n == len(images.host), "the first stage answers every image of the chunk"
        self.runner.run(n)
        going: set[int] = set()
        if self.routes:
            head = self.route_buf[:1 + self.runner.bucket_for(n)].tolist()
            going = set(head[1:1 + head[0]])
        return [StageAnswer(p, i in going) for i, p in enumerate(self.prob[:n].tolist())]

    def warmup(self, pools: GraphPools) -> None:
        warm_segment(self.runner, pools)

    def close(self) -> None:
        self.runner.close()

    def describe(self) -> dict:
        labels, spec = self.model.labels, self.spec
        out = {"name": self.name, "kind": "classifier", "model_type": self.model.model_type,
               "model": str(spec.model), "labels": list(labels.names),
               "roadwork_label": labels.names[labels.roadwork_index], "device": str(self.device),
               "input_size": [self.preprocess.height, self.preprocess.width], "quantize": spec.quantize,
               "backend": spec.backend}
        if spec.backend == "onnxruntime":
            out.update(quantize="none", onnx=str(spec.onnx), providers=self.model.providers,
                       cuda_graphs="no: ONNX Runtime runs the graph through host memory")
        elif spec.backend == "tensorrt":
            out.update(quantize="none", onnx=str(spec.onnx), precision=self.model.precision,
                       engine=str(self.model.engine_path), engine_cached=self.model.cached,
                       cuda_graphs="no: the engine is enqueued eagerly on the current stream")
        if self.routes:
            out.update(exit_below=spec.exit_below, exit_above=spec.exit_above)
        return out
