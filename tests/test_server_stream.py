"""The VLM stage over HTTP: /v1/predict/stream (stage events, explanation tokens, result, disconnect), ?explain=1
on /v1/predict and the batch route, the result cache with explanations, and the roadwork_vlm_* metrics. A real
Engine on a tiny random-weight classifier + detector + Qwen3-VL bundle, a real aiohttp client on loopback."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine
from fixtures.checkpoints import make_vit
from fixtures.bundles import classifier_stage, detector_stage, vlm_stage, write_bundle
from fixtures.images import b64, jpeg
from fixtures.serving import Running, read_events, serving

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_EXPLAIN_TOKENS = 96  # long enough that a client can leave in the middle of an explanation


@pytest.fixture(scope="module")
def bundle(vlm_cascade_models, tmp_path_factory):
    """Exit thresholds 0 and 1 decide nothing early: every image goes classifier -> detectors -> VLM."""
    return write_bundle(tmp_path_factory.mktemp("vlm_bundle"),
                        classifier_stage(vlm_cascade_models, 0.0, 1.0)
                        + detector_stage(vlm_cascade_models, 0.5, None, extra="exit_below = 0.0\nexit_above = 1.0")
                        + vlm_stage(vlm_cascade_models, f"max_explain_tokens = {MAX_EXPLAIN_TOKENS}"))


@pytest.fixture(scope="module")
def engine(bundle):
    engine = Engine.load(bundle, "cpu", "float32", max_batch=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=3)
    return path


@pytest.fixture(scope="module")
def vit_engine(vit_dir):
    return Engine.load(vit_dir, "cpu", "float32", max_batch=4)


async def stream(s: Running, image: bytes, query: str = "") -> tuple[int, str, list[tuple[str, dict]]]:
    async with s.client.post(s.url + "/v1/predict/stream" + query, data=image,
                             headers={"Content-Type": "image/jpeg"}) as r:
        return r.status, r.content_type, await read_events(r)


async def metrics(s: Running) -> dict[tuple[str, tuple], float]:
    _, body, _ = await s.get("/metrics")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def test_stream_sends_each_stage_then_tokens_then_result(engine, bundle):
    image = jpeg(1)
    [direct] = engine.predict([decode_image(image)])

    async def scenario():
        async with serving(engine, bundle, cache_entries=0) as s:
            streamed = await stream(s, image, "?detail=1")
            explained = await s.post("/v1/predict?explain=1&detail=1", data=image, content_type="image/jpeg")
            return streamed, explained

    (status, content_type, events), (_, explained, _) = asyncio.run(scenario())
    assert status == 200 and content_type == "text/event-stream"
    names = [name for name, _ in events]
    assert names[:3] == ["stage"] * 3 and names[-1] == "result" and set(names[3:-1]) == {"token"}, names
    stages = [data for _, data in events[:3]]
    assert [(d["stage"], d["decided"]) for d in stages] == [("classifier", False), ("detectors", False),
                                                            ("vlm", True)]
    result = events[-1][1]
    assert [d["p"] for d in stages] == pytest.approx([direct.scores[d["stage"]] for d in stages], abs=1e-5)
    assert result["stage"] == "vlm" and result["prediction"] == pytest.approx(direct.prediction, abs=1e-5)
    assert set(result["scores"]) == {"classifier", "detectors", "vlm"}
    text = "".join(data["text"] for name, data in events if name == "token")
    assert text and result["explanation"] == text
    # Greedy decoding: the streamed explanation is the one /v1/predict?explain=1 writes inside the cascade.
    assert explained["explanation"] == text
    tokens = result["tokens"]
    assert tokens["prompt"] > 0 and 0 <= tokens["cached"] <= tokens["prompt"]
    assert 1 <= tokens["generated"] <= 1 + MAX_EXPLAIN_TOKENS  # the score's prefill samples no token
    assert (explained["tokens"]["prompt"], explained["tokens"]["generated"]) == (tokens["prompt"],
                                                                                 tokens["generated"])


def test_disconnect_mid_explanation_frees_its_kv_blocks(engine, bundle):
    async def scenario():
        async with serving(engine, bundle, cache_entries=0) as s:
            before = await metrics(s)
            async with aiohttp.ClientSession() as leaving:
                response = await leaving.post(s.url + "/v1/predict/stream", data=jpeg(2),
                                              headers={"Content-Type": "image/jpeg"})
                first = await read_events(response, until="token")
                live = engine.vlm_stats()  # the explanation holds KV blocks while it decodes
                response.close()  # the client hangs up mid-explanation
            give_up = time.monotonic() + 10
            key = ("roadwork_streams_total", (("outcome", "client_disconnected"),))
            while (after := await metrics(s)).get(key, 0) < 1:  # counted once the handler finished
                assert time.monotonic() < give_up, "the stream handler never noticed the disconnect"
                await asyncio.sleep(0.02)
            return before, first, live, after, engine.vlm_stats()

    before, first, live, after, stats = asyncio.run(scenario())
    assert [name for name, _ in first] == ["stage", "stage", "stage", "token"]
    assert live["running"] == 1 and live["kv_blocks_used"] > 0
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
    assert after[("roadwork_vlm_kv_blocks", (("state", "used"),))] == 0
    generated = ("roadwork_vlm_tokens_total", (("kind", "generated"),))
    assert after[generated] - before[generated] < MAX_EXPLAIN_TOKENS  # it did not decode to the end


def test_explain_on_predict_and_batch_and_the_cache(engine, bundle):
    first, second = jpeg(3), jpeg(4)

    async def scenario():
        async with serving(engine, bundle) as s:
            async def answer(path: str, payload: dict) -> dict:
                status, body, _ = await s.post(path, payload)
                assert status == 200, body
                return body

            plain = await answer("/v1/predict?detail=1", {"image": b64(first)})
            cost_s = s.service.batcher.image_cost_s
            explained = await answer("/v1/predict?explain=1", {"image": b64(first)})  # the cached answer lacks it
            # The explanation decodes on the VLM loop thread, not in the batch: admission's per-image estimate
            # measures scoring only (the recomputed score moves it by one smoothed sample at most).
            assert s.service.batcher.image_cost_s < 3 * cost_s
            again = await answer("/v1/predict?explain=true", {"image": b64(first)})
            unasked = await answer("/v1/predict", {"image": b64(first)})
            batch = await answer("/v1/predict/batch?explain=1&detail=1", {"images": [b64(first), b64(second)]})
            return plain, explained, again, unasked, batch, await stream(s, first)

    plain, explained, again, unasked, batch, streamed = asyncio.run(scenario())
    assert "explanation" not in plain and plain["tokens"]["generated"] == 0 and plain["tokens"]["prompt"] > 0
    assert explained["cached"] is False and isinstance(explained["explanation"], str)
    assert again["cached"] is True and again["explanation"] == explained["explanation"]
    # The explained answer replaced the plain one in the cache.
    assert unasked["cached"] is True and unasked["explanation"] == explained["explanation"]
    assert unasked["prediction"] == explained["prediction"] == pytest.approx(plain["prediction"], abs=1e-5)
    [cached, computed] = batch["results"]
    assert cached["cached"] is True and cached["explanation"] == explained["explanation"]
    assert computed["cached"] is False and isinstance(computed["explanation"], str)
    assert computed["tokens"]["generated"] >= 1
    status, _, events = streamed
    assert status == 200 and [name for name, _ in events] == ["token", "result"]  # no stages: from the cache
    assert events[0][1]["text"] == explained["explanation"] and events[1][1]["cached"] is True


def test_vlm_metrics_follow_the_runtime(engine, bundle):
    async def scenario():
        async with serving(engine, bundle, cache_entries=0) as s:
            await s.post("/v1/predict", {"image": b64(jpeg(5))})
            await s.post("/v1/predict", {"image": b64(jpeg(5))})  # the same prompt and image: prefix-cache hits
            _, body, _ = await s.get("/metrics")
            return body, engine.vlm_stats()

    body, stats = asyncio.run(scenario())
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    values = {(s.name, tuple(s.labels.values())): s.value
              for name in ("roadwork_vlm_tokens", "roadwork_vlm_kv_blocks", "roadwork_vlm_prefix_cache_hit_ratio",
                           "roadwork_vlm_sequences", "roadwork_vlm_preemptions")
              for s in families[name].samples}
    assert families["roadwork_vlm_tokens"].type == "counter" and families["roadwork_vlm_kv_blocks"].type == "gauge"
    for kind in ("prompt", "cached", "generated"):
        assert values[("roadwork_vlm_tokens_total", (kind,))] == stats[f"{kind}_tokens"]
    assert stats["cached_tokens"] > 0 and stats["prompt_tokens"] > stats["cached_tokens"]
    assert values[("roadwork_vlm_prefix_cache_hit_ratio", ())] == pytest.approx(
        stats["cached_tokens"] / stats["prompt_tokens"])
    assert values[("roadwork_vlm_kv_blocks", ("used",))] + values[("roadwork_vlm_kv_blocks", ("free",))] \
        == stats["kv_blocks_total"]
    assert values[("roadwork_vlm_sequences", ("running",))] == 0
    assert values[("roadwork_vlm_preemptions_total", ())] == stats["preemptions"]
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_engine_closed_under_a_stream_ends_it_with_an_error_event(bundle):
    closing = Engine.load(bundle, "cpu", "float32", max_batch=4)

    async def scenario():
        async with serving(closing, bundle, cache_entries=0) as s:
            async with s.client.post(s.url + "/v1/predict/stream", data=jpeg(10),
                                     headers={"Content-Type": "image/jpeg"}) as response:
                first = await read_events(response, until="token")
                await asyncio.get_running_loop().run_in_executor(None, closing.close)
                return first, await read_events(response)

    try:
        first, rest = asyncio.run(scenario())
    finally:
        closing.close()
    assert first[-1][0] == "token"
    assert rest[-1] == ("error", {"error": {"code": "shutting_down",
                                            "message": "the vlm stage stopped before the explanation finished"}})
    assert {name for name, _ in rest[:-1]} <= {"token"}


# --- a bundle without a VLM: one stage event, no explanation; errors before and after the stream opens ---------

def test_stream_without_vlm_and_explain_refused(vit_engine, vit_dir):
    image = jpeg(6)
    [direct] = vit_engine.predict([decode_image(image)])

    async def scenario():
        async with serving(vit_engine, vit_dir) as s:
            return (await stream(s, image), await s.post("/v1/predict?explain=1", {"image": b64(image)}),
                    await s.post("/v1/predict/stream?explain=1", {"image": b64(image)}),
                    await s.post("/v1/predict/batch?explain=1", {"images": [b64(image)]}), await metrics(s))

    (status, content_type, events), predict, streamed, batch, after = asyncio.run(scenario())
    assert status == 200 and content_type == "text/event-stream"
    assert events[0] == ("stage", {"stage": "classifier", "p": pytest.approx(direct.prediction, abs=1e-5),
                                   "decided": True})
    assert [name for name, _ in events] == ["stage", "result"]
    assert "explanation" not in events[1][1] and events[1][1]["tokens"] is None
    for answer in (predict, streamed, batch):
        assert (answer[0], answer[1]["error"]["code"]) == (400, "explain_unavailable")
    assert not any(name.startswith("roadwork_vlm_") for name, _ in after)


def test_stream_errors_before_and_after_it_opens(vit_engine, vit_dir):
    async def scenario():
        async with serving(vit_engine, vit_dir, timeout_s=0.3, max_delay_ms=2000) as s:
            bad_base64 = await s.post("/v1/predict/stream", {"image": "@@@@"})
            bad_flag = await s.post("/v1/predict/stream?detail=maybe", {"image": b64(jpeg(7))})
            text = await s.post("/v1/predict/stream", data=b"hello", content_type="text/plain")
            undecodable = await s.post("/v1/predict/stream", data=b"GIF89a....", content_type="image/gif")
            late = await stream(s, jpeg(8))  # waits 2 s for a batch: the 0.3 s deadline passes after the stream opened
            return bad_base64, bad_flag, text, undecodable, late, await metrics(s)

    bad_base64, bad_flag, text, undecodable, late, after = asyncio.run(scenario())
    assert (bad_base64[0], bad_base64[1]["error"]["code"]) == (400, "invalid_base64")
    assert (bad_flag[0], bad_flag[1]["error"]["code"]) == (400, "invalid_query")
    assert "detail" in bad_flag[1]["error"]["message"]
    assert (text[0], text[1]["error"]["code"]) == (415, "unsupported_media_type")
    assert (undecodable[0], undecodable[1]["error"]["code"]) == (422, "undecodable_image")
    status, content_type, events = late
    assert status == 200 and content_type == "text/event-stream"
    assert events == [("error", {"error": {"code": "deadline_exceeded",
                                           "message": "no answer within the 0.3 s deadline"}})]
    assert after[("roadwork_streams_total", (("outcome", "deadline_exceeded"),))] == 1
    assert after[("roadwork_queue_dropped_total", (("reason", "deadline"),))] == 1


def test_stream_disconnect_while_queued_drops_the_image(vit_engine, vit_dir):
    async def scenario():
        async with serving(vit_engine, vit_dir, max_delay_ms=1500) as s:
            async with aiohttp.ClientSession() as leaving:
                # The stream opens once the image is queued, before its batch runs.
                response = await leaving.post(s.url + "/v1/predict/stream", data=jpeg(9),
                                              headers={"Content-Type": "image/jpeg"})
                assert response.status == 200 and len(s.service.batcher) == 1
                response.close()
            give_up = time.monotonic() + 2.0
            while (await metrics(s)).get(("roadwork_queue_dropped_total", (("reason", "client_disconnected"),)),
                                         0) < 1:
                assert time.monotonic() < give_up, "the disconnected stream's image is still queued"
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.6)  # past the batch delay: the dropped image must not be computed
            return len(s.service.batcher), await s.metric("roadwork_batch_size_count")

    assert asyncio.run(scenario()) == (0, 0)
