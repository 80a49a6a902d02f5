"""Issue 13, the VLM stage: an input the VLM cannot take fails only that image and never opens its breaker
(defect 6), and explanations are capped so they cannot starve predictions (defect 8). A real three-stage bundle
of tiny models served over real HTTP."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from fixtures.hostile import stretched_jpeg
from runtime.cascade.engine import Engine
from fixtures.bundles import classifier_stage, detector_stage, vlm_stage, write_bundle
from fixtures.images import b64, jpeg
from fixtures.serving import read_events, serving

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle(vlm_cascade_models, tmp_path_factory):
    models = vlm_cascade_models
    """Every image goes classifier -> detectors -> VLM; the VLM breaker opens after 3 failures."""
    return write_bundle(tmp_path_factory.mktemp("vlm_bundle"),
                        classifier_stage(models, 0.0, 1.0)
                        + detector_stage(models, 0.5, None, extra="exit_below = 0.0\nexit_above = 1.0")
                        + vlm_stage(models, "max_explain_tokens = 96\nfailure_threshold = 3\ncooldown_s = 30"))


@pytest.fixture(scope="module")
def engine(bundle):
    engine = Engine.load(bundle, "cpu", "float32", max_batch=4)
    yield engine
    engine.close()


def test_images_past_the_vlm_aspect_limit_fail_alone_and_never_open_its_breaker(engine, bundle):
    stretched = [stretched_jpeg(2000 + 16 * i, 8) for i in range(4)]  # 250:1 and more; the VLM takes <= 200:1

    async def scenario():
        async with serving(engine, bundle, max_aspect_ratio=1000, max_delay_ms=50) as s:
            attacks = await asyncio.gather(*(s.post("/v1/predict", {"image": b64(im)}) for im in stretched))
            mixed = await s.post("/v1/predict/batch", {"images": [b64(jpeg(21)), b64(stretched[0]), b64(jpeg(22))]})
            genuine = await s.post("/v1/predict", {"image": b64(jpeg(23))})
            return attacks, mixed, genuine, engine.stage_states()

    attacks, mixed, genuine, states = asyncio.run(scenario())
    for status, body, _ in attacks:
        assert status == 422 and body["error"]["code"] == "unprocessable_image", body
        assert "aspect ratio" in body["error"]["message"]
    results = mixed[1]["results"]
    assert results[1]["error"]["code"] == "unprocessable_image"
    assert results[0]["stage"] == results[2]["stage"] == "vlm" and not results[0]["degraded"]
    assert genuine[0] == 200 and genuine[1]["stage"] == "vlm" and genuine[1]["degraded"] is False
    assert set(states.values()) == {"closed"}, states


def test_explanations_beyond_the_cap_are_refused_with_retry_after(engine, bundle):
    async def scenario():
        async with serving(engine, bundle, max_explanations=1) as s:
            async with aiohttp.ClientSession() as holder:
                first = await holder.post(s.url + "/v1/predict/stream", data=jpeg(31),
                                          headers={"Content-Type": "image/jpeg"})
                await read_events(first, until="token")  # explaining now, holding the one slot
                refused_stream = await s.client.post(s.url + "/v1/predict/stream", data=jpeg(32),
                                                     headers={"Content-Type": "image/jpeg"})
                refused_explain = await s.post("/v1/predict?explain=1", {"image": b64(jpeg(33))})
                plain = await s.post("/v1/predict", {"image": b64(jpeg(34))})  # scoring is not capped
                first.close()
            return (refused_stream.status, await refused_stream.json(), dict(refused_stream.headers)), \
                refused_explain, plain

    stream, explain, plain = asyncio.run(scenario())
    for status, body, headers in (stream, explain):
        assert status == 503 and body["error"]["code"] == "explanations_busy", body
        assert int(headers["Retry-After"]) >= 1
    assert plain[0] == 200


def test_explain_above_explanations_decode_off_the_inference_worker(vlm_cascade_models, tmp_path):
    """The bundle's explain_above rule explains unasked, on the VLM's loop thread: the batch's Engine.predict call
    never decodes one (auto_explain=False), and the answer still carries it; with no explanation slot free, the
    answer goes without one instead of failing."""
    models = vlm_cascade_models
    root = write_bundle(tmp_path, classifier_stage(models, 0.0, 1.0)
                        + detector_stage(models, 0.5, None, extra="exit_below = 0.0\nexit_above = 1.0")
                        + vlm_stage(models, "explain_above = 0.0\nmax_explain_tokens = 4"))
    engine = Engine.load(root, "cpu", "float32", max_batch=4)
    calls = []
    predict = engine.predict

    def recording_predict(images, **kwargs):
        if kwargs.get("boxes"):  # the batcher's calls (warmup's has no boxes)
            calls.append(kwargs.get("auto_explain", True))
        return predict(images, **kwargs)

    engine.predict = recording_predict

    async def scenario():
        async with serving(engine, root) as s:
            explained = await s.post("/v1/predict", {"image": b64(jpeg(41))})
            s.service.explanations = s.service.config.max_explanations  # every slot taken by asked explanations
            without = await s.post("/v1/predict", {"image": b64(jpeg(42))})
            s.service.explanations = 0
            return explained, without

    try:
        explained, without = asyncio.run(scenario())
    finally:
        engine.close()
    assert explained[0] == 200 and explained[1]["stage"] == "vlm" and explained[1]["explanation"]
    assert without[0] == 200 and "explanation" not in without[1]
    assert calls and not any(calls)
