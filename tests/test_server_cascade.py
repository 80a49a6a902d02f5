"""The server over a two-stage bundle: detector scores and boxes with ?detail=1, breaker states in /metrics."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.cascade.engine import Engine
from runtime.image_decode import decode_image
from fixtures.checkpoints import write_preprocessor
from fixtures.deimv2_checkpoints import classifier_sharing_backbone, make_deimv2
from fixtures.images import b64, jpeg
from fixtures.serving import serving


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    make_deimv2(root / "detector", seed=0)
    write_preprocessor(root / "detector", "dinov3", (64, 64))
    classifier_sharing_backbone(root / "detector", root / "classifier", seed=3, input_size=64)
    # exit_below 0 and exit_above 1 send every image on to the detector; box_threshold 0 makes every box count.
    (root / "cascade.toml").write_text("""
[[stage]]
kind = "classifier"
model = "classifier"
exit_below = 0.0
exit_above = 1.0

[[stage]]
kind = "detectors"
[[stage.detector]]
name = "deimv2"
model = "detector"
roadwork_classes = [1, 3]
box_threshold = 0.0
""")
    return root


def test_detail_has_detector_scores_and_boxes_and_metrics_have_breakers(bundle):
    engine = Engine.load(bundle, "cpu", "float32", max_batch=4)
    image = jpeg(7)

    async def scenario():
        async with serving(engine, bundle, cache_entries=0) as s:
            plain = await s.post("/v1/predict", {"image": b64(image)})
            detail = await s.post("/v1/predict?detail=1", {"image": b64(image)})
            return plain, detail, await s.get("/metrics")

    (status, plain, _), (_, detail, _), (_, metrics, _) = asyncio.run(scenario())
    assert status == 200 and plain["stage"] == "detectors"
    assert "boxes" not in plain and "detector_scores" not in plain
    assert set(detail["scores"]) == {"classifier", "detectors"}
    assert set(detail["detector_scores"]) == {"deimv2"}
    assert detail["boxes"], "box_threshold 0 keeps every roadwork box"
    for box in detail["boxes"]:
        assert box["detector"] == "deimv2" and box["label"] in ("LABEL_1", "LABEL_3") and len(box["xyxy"]) == 4
    # The values are the engine's own answer for the same image, box for box in order (float32 through JSON).
    want = engine.predict([decode_image(image)], boxes=True)[0]
    assert detail["prediction"] == plain["prediction"] == pytest.approx(want.prediction, abs=1e-6)
    assert detail["scores"] == pytest.approx(want.scores, abs=1e-6)
    assert detail["detector_scores"] == pytest.approx(want.detector_scores, abs=1e-6)
    assert len(detail["boxes"]) == len(want.boxes)
    for got, box in zip(detail["boxes"], want.boxes):
        assert (got["detector"], got["label"]) == (box.detector, box.label)
        assert got["score"] == pytest.approx(box.score, abs=1e-6)
        assert got["xyxy"] == pytest.approx(list(box.xyxy), abs=1e-4)
    families = {f.name: f for f in text_string_to_metric_families(metrics.decode())}
    states = {(s.labels["stage"], s.labels["state"]): s.value for s in families["roadwork_stage_breaker_state"].samples}
    assert states == {("detectors", "closed"): 1, ("detectors", "open"): 0, ("detectors", "half_open"): 0}
    assert set(detail["detector_ms"]) == {"deimv2"} and detail["detector_ms"]["deimv2"] > 0
    member = {(s.name, s.labels["stage"], s.labels["detector"]): s.value
              for name in ("roadwork_detector_seconds", "roadwork_detector_calls", "roadwork_detector_images")
              for s in families[name].samples}
    assert member[("roadwork_detector_calls_total", "detectors", "deimv2")] == 3  # warm-up, plain, detail
    assert member[("roadwork_detector_images_total", "detectors", "deimv2")] == 3
    assert member[("roadwork_detector_seconds_total", "detectors", "deimv2")] > 0
