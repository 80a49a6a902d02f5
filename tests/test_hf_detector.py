"""The format "transformers" member (runtime/models/hf_detector.py) against transformers run alone on the same tiny
random-weight checkpoints (fixtures/hf_detectors.py): Grounding DINO, MM-Grounding-DINO, OWLv2 and SAM 3 (zero-shot,
with a prompt) and YOLOS (closed set). Its evidence, the per-label max score and the kept boxes, must be
transformers' own post-processed detections. SAM 3's processor needs torchvision: without it, its reference here is
transformers' Sam3Model fed by Pillow's resize and the processor's normalization, scored by its instance
post-processing's formula; with torchvision, Sam3Processor itself."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoModelForObjectDetection, AutoModelForZeroShotObjectDetection,
                          AutoProcessor, AutoTokenizer, Sam3Model)

from fixtures.hf_detectors import (PROMPT, YOLOS_LABELS, bert_tokenizer, make_grounding_dino, make_mm_grounding_dino,
                                   as_sam3_video, make_owlv2, make_sam3, make_yolos, write_omdet_turbo_processor)
from runtime.errors import ModelLoadError
from runtime.models.detect_postprocess import center_to_corners
from runtime.models.hf_detector import NO_DETECTION, PromptGrounding, TransformersDetector
from runtime.models.sam3_detector import Sam3Detector

PHRASES = ["traffic cone", "road barrier", "roadwork sign"]
FAMILIES = {  # name: (maker, prompt, max_det) -- max_det below GD's 20 queries, above YOLOS' 10
    "grounding-dino": (make_grounding_dino, PROMPT, 12),
    "mm-grounding-dino": (make_mm_grounding_dino, PROMPT, 12),
    "owlv2": (make_owlv2, PROMPT, 10),
    "sam3": (make_sam3, PROMPT, 12),  # 20 queries per phrase
    "yolos": (make_yolos, None, 15),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_detectors")
    for name, (make, _, _) in FAMILIES.items():
        make(root / name)
    return root


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
            torch.from_numpy(rng.integers(0, 256, (80, 40, 3), dtype=np.uint8))]


def load(path, name: str, prompt: str | None, **kwargs):
    return (Sam3Detector if name == "sam3" else TransformersDetector).from_pretrained(path, "cpu", prompt, **kwargs)


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a RuntimeError from one built for another torch
        return False
    return True


def sam3_found(path, pil) -> list[dict]:
    """transformers' SAM 3, one image and one phrase a call: per image {"scores", "labels", "boxes"}."""
    model = Sam3Model.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    side, found = model.config.vision_config.image_size, []
    for image in pil:
        resized = np.asarray(image.resize((side, side), Image.BILINEAR))
        pixels = torch.from_numpy((resized / 255 - 0.5) / 0.5).float().permute(2, 0, 1)[None]
        scores, labels, boxes = [], [], []
        for label, phrase in enumerate(PHRASES):
            tokens = tokenizer(phrase, padding="max_length", max_length=32, return_tensors="pt")
            with torch.inference_mode():
                out = model(pixel_values=pixels, input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"])
            # Sam3ImageProcessor.post_process_instance_segmentation at threshold 0, less the masks.
            score = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
            scores.append(score[score > 0])
            labels += [label] * int((score > 0).sum())
            boxes.append(out.pred_boxes[0][score > 0] * torch.tensor([image.width, image.height] * 2))
        found.append({"scores": torch.cat(scores), "labels": torch.tensor(labels), "boxes": torch.cat(boxes)})
    return found


def reference(path, name: str, images, max_det: int) -> list[list[tuple[int, float, list[float]]]]:
    """transformers alone: per image its (label id, score, pixel xyxy) detections, the best max_det first."""
    pil = [Image.fromarray(np.asarray(im)) for im in images]
    sizes = [(im.height, im.width) for im in pil]
    if name == "sam3" and torchvision_imports():
        processor = AutoProcessor.from_pretrained(path)
        model = Sam3Model.from_pretrained(path).eval()
        found = []
        for label, phrase in enumerate(PHRASES):
            with torch.inference_mode():
                outputs = model(**processor(images=pil, text=[phrase] * len(pil), return_tensors="pt"))
            found.append(processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=sizes))
        labelled = [(sum(([label] * len(f[b]["scores"]) for label, f in enumerate(found)), []),
                     {key: torch.cat([f[b][key] for f in found]) for key in ("scores", "boxes")})
                    for b in range(len(pil))]
    elif name == "sam3":
        labelled = [(f["labels"].tolist(), f) for f in sam3_found(path, pil)]
    elif name == "yolos":
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        model = AutoModelForObjectDetection.from_pretrained(path).eval()
        with torch.inference_mode():
            found = processor.post_process_object_detection(model(**processor(images=pil, return_tensors="pt")),
                                                            threshold=0.0, target_sizes=sizes)
        labelled = [(f["labels"].tolist(), f) for f in found]
    else:
        processor = AutoProcessor.from_pretrained(path, backend="pil")
        model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
        inputs = processor(images=pil, text=[PHRASES] * len(pil), return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        if name == "owlv2":
            found = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                                     text_labels=[PHRASES] * len(pil))
            labelled = [(f["labels"].tolist(), f) for f in found]
        else:
            found = processor.post_process_grounded_object_detection(outputs, inputs["input_ids"], threshold=0.0,
                                                                     text_threshold=0.25, target_sizes=sizes)
            grounding = PromptGrounding.from_tokenizer(processor.tokenizer, tuple(PHRASES))
            labelled = [([grounding.phrase_of(t) for t in f["text_labels"]], f) for f in found]
    out = []
    for labels, f in labelled:
        dets = [(label, score, box) for label, score, box in zip(labels, f["scores"].tolist(), f["boxes"].tolist())
                if label is not None]
        out.append(sorted(dets, key=lambda d: -d[1])[:max_det])  # stable: ties keep transformers' order
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_evidence_is_transformers_post_processing(checkpoints, images, name):
    _, prompt, max_det = FAMILIES[name]
    det = load(checkpoints / name, name, prompt, max_det=max_det)
    labels = YOLOS_LABELS if name == "yolos" else dict(enumerate(PHRASES))
    assert det.cfg.id2label == labels and det.cfg.num_labels == len(labels) and det.cfg.num_queries == max_det
    out = det(images)
    assert out.logits.shape == (2, max_det, len(labels)) and out.pred_boxes.shape == (2, max_det, 4)
    expected = reference(checkpoints / name, name, images, max_det)
    assert len({label for dets in expected for label, _, _ in dets}) >= 2, "the fixture should use two labels"
    for b, (image, dets) in enumerate(zip(images, expected)):
        height, width = image.shape[:2]
        logits = out.logits[b]
        # Per-label max score: what the vote reads.
        want = torch.zeros(len(labels))
        for label, score, _ in dets:
            want[label] = max(want[label], score)
        torch.testing.assert_close(torch.sigmoid(logits).amax(0), want, atol=1e-6, rtol=0)
        # Each detection a row, best first, one label column set; rows past the last all NO_DETECTION.
        kept = (logits > NO_DETECTION).sum(-1)
        assert kept[:len(dets)].eq(1).all() and kept[len(dets):].eq(0).all()
        assert len(dets) == max_det or name == "yolos"  # truncated to max_det, or padded (YOLOS)
        rows = logits[:len(dets)]
        assert rows.argmax(-1).tolist() == [label for label, _, _ in dets]
        torch.testing.assert_close(torch.sigmoid(rows.amax(-1)), torch.tensor([s for _, s, _ in dets]),
                                   atol=1e-6, rtol=0)
        xyxy = center_to_corners(out.pred_boxes[b, :len(dets)]) * torch.tensor([width, height, width, height])
        torch.testing.assert_close(xyxy, torch.tensor([box for _, _, box in dets]), atol=1e-4, rtol=1e-5)


def test_prompt_grounding_rule(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    grounding = PromptGrounding.from_tokenizer(tokenizer, ("Traffic Cone", "road barrier", "roadwork sign",
                                                           "stop sign"))
    cases = {
        "traffic cone": 0,
        "cone": 0,  # part of a phrase
        "traffic. road barrier. roadwork sign. [SEP]": 1,  # longest run; of two, the earlier phrase
        "traffic roadwork [SEP]": 0,  # pieces of two phrases in one piece: equal runs, the earlier phrase
        "road barrier roadwork sign": 1,
        "sign": 2,  # in two phrases: the earlier
        "stop sign": 3,
        "cone traffic": 0,
        "[SEP]": None, "": None, ". .": None, "car": None,
    }
    assert {label: grounding.phrase_of(label) for label in cases} == cases


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_zero_shot_needs_a_prompt(checkpoints):
    with pytest.raises(ModelLoadError) as e:
        TransformersDetector.from_pretrained(checkpoints / "grounding-dino", "cpu", None)
    assert "key 'prompt' is required" in one_line_error(e)


def test_closed_set_refuses_a_prompt(checkpoints):
    with pytest.raises(ModelLoadError) as e:
        TransformersDetector.from_pretrained(checkpoints / "yolos", "cpu", PROMPT)
    assert "key 'prompt' is for zero-shot detectors" in one_line_error(e)


LONG_PROMPT = ". ".join(f"{'a ' * i}cone" for i in range(1, 8))  # distinct phrases, 44 tokens


@pytest.mark.parametrize("prompt, why", [(" . .", "holds no phrase"), ("cone. Cone.", "names a phrase twice"),
                                         (LONG_PROMPT, "44 tokens, over the model's max_text_len 32")])
def test_bad_prompts(checkpoints, prompt, why):
    with pytest.raises(ModelLoadError) as e:
        TransformersDetector.from_pretrained(checkpoints / "grounding-dino", "cpu", prompt)
    assert "key 'prompt'" in one_line_error(e) and why in str(e.value)


def test_missing_transformers(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ModelLoadError) as e:
        TransformersDetector.from_pretrained(checkpoints / "yolos", "cpu", None)
    assert "format 'transformers'" in one_line_error(e) and "roadwork-cascade[transformers]" in str(e.value)


def test_safetensors_only(checkpoints, tmp_path):
    shutil.copy(checkpoints / "yolos" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle is never read")
    with pytest.raises(ModelLoadError) as e:
        TransformersDetector.from_pretrained(tmp_path, "cpu", None)
    assert "no model.safetensors" in one_line_error(e)


def test_not_a_detector(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ModelLoadError, match="model_type 'vit' is not a transformers detection model"):
        TransformersDetector.from_pretrained(tmp_path, "cpu", None)


@pytest.mark.skipif(torchvision_imports(), reason="torchvision imports here: OmDet-Turbo's processor loads")
def test_omdet_turbo_needs_torchvision(tmp_path):
    write_omdet_turbo_processor(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        TransformersDetector.from_pretrained(tmp_path, "cpu", PROMPT)
    assert "OmDetTurboProcessor requires the Torchvision library" in one_line_error(e)


@pytest.mark.parametrize("name", ["grounding-dino", "sam3", "yolos"])
def test_served_as_a_member_with_its_prompt(checkpoints, images, tmp_path, name):
    """A format "transformers" member in a cascade (a tiny classifier sends every image on): its detector score
    is transformers' best roadwork-phrase score, its boxes transformers' boxes above box_threshold."""
    from fixtures.checkpoints import make_vit
    from runtime.cascade.engine import Engine

    _, prompt, max_det = FAMILIES[name]
    make_vit(tmp_path / "classifier", seed=1)
    # SAM 3's best max_det of the second image are all "roadwork sign".
    roadwork = {"sam3": ["traffic cone", "roadwork sign"], "yolos": ["traffic cone", "barrier"]}.get(
        name, ["traffic cone", "road barrier"])
    prompt_key = f'prompt = "{prompt}"\n' if prompt else ""
    (tmp_path / "cascade.toml").write_text(
        '[[stage]]\nkind = "classifier"\nmodel = "classifier"\nexit_below = 0.0\nexit_above = 1.0\n\n'
        f'[[stage]]\nkind = "detectors"\n\n[[stage.detector]]\nname = "{name}"\nformat = "transformers"\n'
        f'model = "{checkpoints / name}"\n{prompt_key}roadwork_classes = {roadwork}\nbox_threshold = 0.0\n'
        f'max_det = {max_det}\n')
    engine = Engine.load(tmp_path, "cpu", "float32", max_batch=2)
    engine.warmup()
    member = engine.describe()["stages"][1]["detectors"][0]
    assert (member["format"], member["model_type"], member["cuda_graphs"], member["input_size"]) == \
        ("transformers", "transformers", False, None)
    results = engine.predict([np.asarray(im) for im in images], boxes=True)
    labels = YOLOS_LABELS if name == "yolos" else dict(enumerate(PHRASES))
    ids = {i for i, label in labels.items() if label in roadwork}
    for result, dets in zip(results, reference(checkpoints / name, name, images, max_det)):
        evidence = [(score, box) for label, score, box in dets if label in ids]
        assert result.stage == "detectors"
        assert result.detector_scores[name] == pytest.approx(max(s for s, _ in evidence), abs=1e-6)
        got = sorted((b.score, b.xyxy) for b in result.boxes)
        want = sorted((s, tuple(box)) for s, box in evidence if s > 0.0)
        assert len(got) == len(want)
        for (gs, gb), (ws, wb) in zip(got, want):
            assert gs == pytest.approx(ws, abs=1e-6) and gb == pytest.approx(wb, abs=1e-3)


def test_sam3_video_checkpoint_serves_its_detector(checkpoints, images, tmp_path):
    """facebook/sam3 is a sam3_video checkpoint; Sam3Model loads its detector, and the member answers as from the
    plain sam3 one."""
    as_sam3_video(checkpoints / "sam3", tmp_path / "video")
    video = Sam3Detector.from_pretrained(tmp_path / "video", "cpu", PROMPT, max_det=12)
    image = Sam3Detector.from_pretrained(checkpoints / "sam3", "cpu", PROMPT, max_det=12)
    assert video.cfg.model_type == "sam3_video"
    torch.testing.assert_close(video(images).logits, image(images).logits, atol=0, rtol=0)


def test_sam3_reads_either_processor_file(checkpoints, images, tmp_path):
    """transformers 5 nests the image processor's settings in processor_config.json; older checkpoints have a
    preprocessor_config.json. Both give the same member."""
    make_sam3(tmp_path, processor_file="preprocessor_config.json")
    assert not (tmp_path / "processor_config.json").exists()
    nested, flat = (Sam3Detector.from_pretrained(path, "cpu", PROMPT, max_det=12)
                    for path in (checkpoints / "sam3", tmp_path))
    assert nested.spec == flat.spec and (nested.spec.height, nested.spec.width) == (56, 56)
    torch.testing.assert_close(nested(images).logits, flat(images).logits, atol=0, rtol=0)


@pytest.mark.parametrize("change, why", [
    ("no prompt", "key 'prompt' is required: SAM 3 detects the '.'-separated phrases"),
    ("long phrase", "phrase 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa' is 35 tokens, over SAM 3's 32"),
    ("other processor", "image_processor_type='ViTImageProcessor': a SAM 3 checkpoint's is Sam3ImageProcessor"),
    ("no processor", "no preprocessor_config.json or processor_config.json"),
    ("not sam3", "model_type 'owlv2' is not SAM 3"),
])
def test_sam3_startup_errors(checkpoints, tmp_path, change, why):
    shutil.copytree(checkpoints / "sam3", tmp_path, dirs_exist_ok=True)
    prompt = {"no prompt": None, "long phrase": "cone. " + "a" * 33}.get(change, PROMPT)
    settings = tmp_path / "processor_config.json"
    if change == "other processor":
        settings.write_text(settings.read_text().replace("Sam3ImageProcessor", "ViTImageProcessor"))
    elif change == "no processor":
        settings.unlink()
    elif change == "not sam3":
        shutil.copy(checkpoints / "owlv2" / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError) as e:
        Sam3Detector.from_pretrained(tmp_path, "cpu", prompt)
    assert why in one_line_error(e)
