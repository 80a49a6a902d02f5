"""OnnxDetector (format "onnx"): tiny YOLO-layout exports from fixtures/onnx_models.py decoded as a plain numpy
decode of ONNX Runtime's own output plus the reference NMS decodes them; fixed-batch chunking; class names; every
refusal a ModelLoadError naming the file and the problem."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fixtures import onnx_models
from kernels.nms import nms_reference
from kernels.nms_triton import nms_triton
from runtime.errors import ModelLoadError
from runtime.models.hf_detector import NO_DETECTION, score_logits
from runtime.models.onnx_detector import END_TO_END, RAW, OnnxDetector

HEIGHT, WIDTH = 64, 96


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def ort_output(path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": pixels.numpy()})[0]


def plain_raw_decode(raw: np.ndarray, iou: float, floor: float, max_det: int) -> list[list[tuple]]:
    """Per image: (class, score, normalized cxcywh box) of each kept detection, best first."""
    scale = np.array([WIDTH, HEIGHT, WIDTH, HEIGHT], dtype=np.float32)
    cxcywh = raw[:, :4].transpose(0, 2, 1)
    scores, classes = raw[:, 4:].max(axis=1), raw[:, 4:].argmax(axis=1)
    cx, cy, w, h = np.moveaxis(cxcywh, -1, 0)
    corners = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    keep, _ = nms_reference(torch.from_numpy(corners), torch.from_numpy(scores), torch.from_numpy(classes), iou,
                            floor, max_det)
    return [[(int(classes[b, i]), float(scores[b, i]), cxcywh[b, i] / scale) for i in row if i >= 0]
            for b, row in enumerate(keep.tolist())]


def plain_end_to_end_decode(rows: np.ndarray, classes: int, floor: float, max_det: int) -> list[list[tuple]]:
    scale = np.array([WIDTH, HEIGHT, WIDTH, HEIGHT], dtype=np.float32)
    out = []
    for image in rows:
        good = [i for i, r in enumerate(image) if r[4] > floor and 0 <= round(r[5]) < classes]
        good.sort(key=lambda i: (-image[i, 4], i))
        out.append([(round(image[i, 5]), float(image[i, 4]),
                     np.array([(image[i, 0] + image[i, 2]) / 2, (image[i, 1] + image[i, 3]) / 2,
                               image[i, 2] - image[i, 0], image[i, 3] - image[i, 1]], dtype=np.float32) / scale)
                    for i in good[:max_det]])
    return out


def assert_detections(output, expected: list[list[tuple]], max_det: int, num_labels: int):
    """output's rows are exactly the expected detections (class, logit(score), box), then empty rows."""
    logits, boxes = output.logits, output.pred_boxes
    assert logits.shape == (len(expected), max_det, num_labels) and boxes.shape == (len(expected), max_det, 4)
    for b, dets in enumerate(expected):
        want_logits = torch.full((max_det, num_labels), NO_DETECTION)
        want_boxes = torch.zeros(max_det, 4)
        for q, (cls, score, box) in enumerate(dets):
            want_logits[q, cls] = score_logits(torch.tensor([score], dtype=torch.float32))[0]
            want_boxes[q] = torch.from_numpy(box)
        assert torch.equal(logits[b], want_logits), b
        torch.testing.assert_close(boxes[b], want_boxes, atol=1e-6, rtol=1e-6)
        scores = [s for _, s, _ in dets]
        assert scores == sorted(scores, reverse=True)
        torch.testing.assert_close(torch.sigmoid(logits[b, :len(dets)]).amax(dim=1), torch.tensor(scores))


@pytest.mark.parametrize("iou,floor,max_det", [(0.7, 0.25, 300), (0.5, 0.25, 300), (0.45, 0.5, 10), (0.3, 0.0, 3)])
def test_raw_head_equals_plain_decode_and_reference_nms(tmp_path, iou, floor, max_det):
    path = onnx_models.raw_head(tmp_path / "raw.onnx", classes=3)
    model = OnnxDetector.from_onnx(path, "cpu", iou_threshold=iou, score_threshold=floor, max_det=max_det)
    assert model.cfg.layout == RAW and model.cfg.batch is None
    assert (model.cfg.height, model.cfg.width, model.cfg.num_labels, model.cfg.num_queries) == (64, 96, 3, max_det)
    pixels = images(3)
    raw = ort_output(path, pixels)
    expected = plain_raw_decode(raw, iou, floor, max_det)
    candidates = (raw[:, 4:].max(axis=1) > floor).sum(axis=1)
    assert all(0 < len(d) for d in expected)
    if max_det < 20:
        assert all(len(d) == max_det for d in expected)  # the cap bites
    elif iou <= 0.5:  # the fixture's boxes are random: few overlap by more than that
        assert all(len(d) < c for d, c in zip(expected, candidates))  # NMS removed some
    assert_detections(model(pixels), expected, max_det, 3)


@pytest.mark.parametrize("floor,max_det", [(0.25, 300), (0.6, 5)])
def test_end_to_end_head_equals_plain_decode(tmp_path, floor, max_det):
    path = onnx_models.end_to_end_head(tmp_path / "e2e.onnx", classes=4)
    model = OnnxDetector.from_onnx(path, "cpu", score_threshold=floor, max_det=max_det)
    assert model.cfg.layout == END_TO_END and model.cfg.num_labels == 4
    pixels = images(2, seed=1)
    expected = plain_end_to_end_decode(ort_output(path, pixels), 4, floor, max_det)
    assert all(len(d) > 0 for d in expected)
    assert_detections(model(pixels), expected, max_det, 4)


@pytest.mark.parametrize("head", [onnx_models.raw_head, onnx_models.end_to_end_head])
def test_fixed_batch_runs_in_padded_chunks(tmp_path, head):
    fixed = OnnxDetector.from_onnx(head(tmp_path / "fixed.onnx", batch=2, seed=3), "cpu")
    dynamic = OnnxDetector.from_onnx(head(tmp_path / "dynamic.onnx", seed=3), "cpu")
    assert fixed.cfg.batch == 2 and dynamic.cfg.batch is None
    for batch in (1, 2, 5):
        pixels = images(batch, seed=batch)
        a, b = fixed(pixels), dynamic(pixels)
        assert a.logits.shape[0] == batch
        assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)


def test_end_to_end_drops_nan_and_out_of_range_class_ids(tmp_path):
    model = OnnxDetector.from_onnx(onnx_models.end_to_end_head(tmp_path / "e2e.onnx", classes=3), "cpu",
                                   score_threshold=0.1, max_det=8)
    box = [8.0, 8.0, 24.0, 40.0]
    rows = torch.tensor([[box + [0.9, 3.0], box + [0.8, float("nan")], box + [0.7, -1.0], box + [0.6, 1.0],
                          box + [float("nan"), 0.0], box + [0.5, 2.0000002], box + [0.4, 1e30], box + [0.3, -1e30],
                          [float("nan"), 0.0, 1.0, 1.0, 0.95, 0.0], box + [0.05, 0.0]]])
    out = model.decode_end_to_end(rows)
    kept = torch.sigmoid(out.logits[0]) > 0
    assert kept.sum(dim=1).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert kept[0].nonzero().item() == 1 and kept[1].nonzero().item() == 2
    torch.testing.assert_close(torch.sigmoid(out.logits[0, :2]).amax(dim=1), torch.tensor([0.6, 0.5]))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.pred_boxes).all()
    assert (out.pred_boxes[0, 2:] == 0).all()


def test_raw_head_through_the_kernel(tmp_path, monkeypatch):
    """The decode as it runs on CUDA: batched_nms dispatches to the Triton kernel (here interpreted, on the CPU)."""
    from runtime.models import onnx_detector

    path = onnx_models.raw_head(tmp_path / "raw.onnx", classes=3, seed=5)
    model = OnnxDetector.from_onnx(path, "cpu", iou_threshold=0.4, max_det=50)
    pixels = images(2, seed=5)
    want = model(pixels)
    monkeypatch.setattr(onnx_detector, "batched_nms", nms_triton)
    got = model(pixels)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.pred_boxes, want.pred_boxes)


def test_raw_drops_non_finite_boxes(tmp_path):
    model = OnnxDetector.from_onnx(onnx_models.raw_head(tmp_path / "raw.onnx", classes=2), "cpu", max_det=4)
    pred = torch.tensor([[[10.0, float("nan"), 50.0], [10.0, 10.0, 30.0], [8.0, 8.0, 8.0], [8.0, 8.0, 8.0],
                          [0.9, 0.99, 0.1], [0.1, 0.0, 0.8]]])
    out = model.decode_raw(pred)
    torch.testing.assert_close(torch.sigmoid(out.logits[0, :2]), torch.tensor([[0.9, 0.0], [0.0, 0.8]]))
    assert (out.logits[0, 2:] == NO_DETECTION).all() and torch.isfinite(out.pred_boxes).all()


def test_class_names_from_metadata_and_labels(tmp_path):
    assert OnnxDetector.from_onnx(onnx_models.raw_head(tmp_path / "a.onnx", classes=2, names={0: "cone", 1: "sign"}),
                                  "cpu").cfg.id2label == {0: "cone", 1: "sign"}
    assert OnnxDetector.from_onnx(onnx_models.raw_head(tmp_path / "b.onnx", classes=2, names=["barrier", "x"]),
                                  "cpu").cfg.id2label == {0: "barrier", 1: "x"}
    path = onnx_models.end_to_end_head(tmp_path / "c.onnx", classes=3, names=None)
    assert OnnxDetector.from_onnx(path, "cpu", labels=["a", "b", "c", "d"]).cfg.id2label == dict(enumerate("abcd"))
    path = onnx_models.raw_head(tmp_path / "d.onnx", classes=2, names="{0: 'bad'")  # labels take precedence
    assert OnnxDetector.from_onnx(path, "cpu", labels=["p", "q"]).cfg.id2label == {0: "p", 1: "q"}


def edited(src, dst, edit):
    model = onnx.load(src)
    edit(model)
    onnx.save(model, dst)
    return dst


def add_output(model):
    model.graph.output.append(onnx.helper.make_tensor_value_info("conv", onnx.TensorProto.FLOAT, None))


def dynamic_height(model):
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"


def refusals(tmp: Path):
    raw = onnx_models.raw_head(tmp / "raw.onnx")
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 this is not an ONNX protobuf" * 10)
    small = (16, 16)  # 2 x 2 cells
    return [
        ("layout", onnx_models.reshaped_head(tmp / "layout.onnx", [0, 5, 96]), {}, "neither of"),
        ("rank", onnx_models.reshaped_head(tmp / "rank.onnx", [0, 5, 8, 12]), {}, "neither of"),
        ("ambiguous", onnx_models.reshaped_head(tmp / "ambiguous.onnx", [0, 6, 6], channels=9, size=small,
                                                names={0: "a", 1: "b"}), {}, "ambiguous"),
        ("labels vs head", raw, {"labels": ["one", "two"]}, "neither of"),
        ("two outputs", edited(raw, tmp / "two.onnx", add_output), {}, "one output, this has 2"),
        ("dynamic H", edited(raw, tmp / "dynamic.onnx", dynamic_height), {}, "fixed H and W"),
        ("names gap", onnx_models.raw_head(tmp / "gap.onnx", names={0: "a", 2: "b", 3: "c"}), {}, "0..n-1"),
        ("names literal", onnx_models.raw_head(tmp / "lit.onnx", names="{0: 'a',"), {}, "not a Python literal"),
        ("names empty", onnx_models.raw_head(tmp / "empty.onnx", names="{}"), {}, "non-empty dict"),
        ("names value", onnx_models.raw_head(tmp / "value.onnx", names={0: "a", 1: "", 2: "c"}), {},
         "non-empty string"),
        ("no names", onnx_models.raw_head(tmp / "nonames.onnx", names=None), {}, "no class names"),
        ("bad labels", raw, {"labels": []}, "labels must be"),
        ("task", onnx_models.raw_head(tmp / "seg.onnx", metadata={"task": "segment"}), {}, "'task' is 'segment'"),
        ("missing", tmp / "missing.onnx", {}, "no such ONNX file"),
        ("garbage", garbage, {}, "ONNX Runtime cannot load it"),
        ("iou 0", raw, {"iou_threshold": 0.0}, "iou_threshold"),
        ("iou > 1", raw, {"iou_threshold": 1.5}, "iou_threshold"),
        ("iou nan", raw, {"iou_threshold": float("nan")}, "iou_threshold"),
        ("score 1", raw, {"score_threshold": 1.0}, "score_threshold"),
        ("score < 0", raw, {"score_threshold": -0.1}, "score_threshold"),
        ("max_det 0", raw, {"max_det": 0}, "max_det"),
        ("max_det float", raw, {"max_det": 2.5}, "max_det"),
    ]


def test_every_refusal_names_the_file_and_the_problem(tmp_path):
    for case, path, kwargs, problem in refusals(tmp_path):
        with pytest.raises(ModelLoadError) as info:
            OnnxDetector.from_onnx(path, "cpu", **kwargs)
        message = str(info.value)
        assert str(path) in message and problem in message, (case, message)


def test_call_refuses_the_wrong_input_size(tmp_path):
    model = OnnxDetector.from_onnx(onnx_models.raw_head(tmp_path / "raw.onnx"), "cpu")
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 96\]"):
        model(torch.rand(1, 3, 64, 64))


def onnx_bundle(root: Path, model: Path, roadwork: list, box_threshold: float = 0.0) -> Path:
    from fixtures.checkpoints import make_vit

    make_vit(root / "classifier", seed=1)  # exit_below 0, exit_above 1: every image goes on to the member
    (root / "cascade.toml").write_text(
        '[[stage]]\nkind = "classifier"\nmodel = "classifier"\nexit_below = 0.0\nexit_above = 1.0\n\n'
        f'[[stage]]\nkind = "detectors"\n\n[[stage.detector]]\nname = "yolo"\nformat = "onnx"\nmodel = "{model}"\n'
        f'roadwork_classes = {roadwork}\nbox_threshold = {box_threshold}\niou_threshold = 0.5\nmax_det = 40\n')
    return root


def test_served_as_a_member(tmp_path):
    """A format "onnx" member in a cascade: images at the export's size reach it as pixels / 255 (the resize is
    the identity), its score is the best roadwork detection of the plain decode, its boxes those detections."""
    from runtime.cascade.engine import Engine

    path = onnx_models.raw_head(tmp_path / "yolo.onnx", classes=3, names={0: "cone", 1: "car", 2: "barrier"}, seed=2)
    engine = Engine.load(onnx_bundle(tmp_path, path, ["cone", "barrier"]), "cpu", "float32", max_batch=2)
    engine.warmup()
    member = engine.describe()["stages"][1]["detectors"][0]
    assert (member["format"], member["model_type"], member["cuda_graphs"]) == ("onnx", "onnx", False)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(3)]
    results = engine.predict(frames, boxes=True)
    pixels = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames])
    for result, dets in zip(results, plain_raw_decode(ort_output(path, pixels), 0.5, 0.25, 40)):
        evidence = [(score, box) for cls, score, box in dets if cls in (0, 2)]
        assert result.stage == "detectors"
        assert result.detector_scores["yolo"] == pytest.approx(max(s for s, _ in evidence), abs=1e-5)
        assert len(result.boxes) == len(evidence)
    engine.close()


def test_a_member_of_an_unsupported_layout_is_a_startup_error(tmp_path):
    from runtime.cascade.engine import Engine

    path = onnx_models.reshaped_head(tmp_path / "seg.onnx", [0, 5, 4, 24])
    with pytest.raises(ModelLoadError, match=r"detector 1 \('yolo'\).*seg\.onnx: output 'output0' has shape"):
        Engine.load(onnx_bundle(tmp_path, path, ["class_0"]), "cpu", "float32", max_batch=2)
