"""The HTTP server end to end: a real Engine on a tiny random-weight ViT, a real aiohttp client on loopback."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine
from server.service import Service
from runtime.options import default_max_batch
from fixtures.checkpoints import make_vit
from fixtures.images import b64, jpeg, png
from fixtures.serving import MAX_BATCH, serving

TOL = 1e-5  # same weights, fp32; only the batch composition differs between server and direct calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=3)
    return path


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.load(model_dir, device="cpu", dtype="float32", max_batch=MAX_BATCH)


def direct(engine: Engine, images: list[bytes]) -> list[float]:
    """What the server must answer: Engine.predict on the same decoded images (no server involved)."""
    return [r.prediction for r in engine.predict([decode_image(data) for data in images])]


def run(coro):
    return asyncio.run(coro)


# --- answers ---------------------------------------------------------------------------------------------

def test_predict_forms_match_engine(engine, model_dir):
    images = [jpeg(i) for i in range(4)]
    expected = direct(engine, images)

    async def scenario():
        async with serving(engine, model_dir, cache_entries=0) as s:
            plain = await s.post("/v1/predict", {"image": b64(images[0])})
            wrapped = "data:image/jpeg;base64," + "\n".join(b64(images[1])[i:i + 76]
                                                             for i in range(0, len(b64(images[1])), 76))
            data_url = await s.post("/v1/predict", {"image": wrapped})
            raw = await s.post("/v1/predict?detail=1", data=images[2], content_type="image/jpeg")
            unpadded = await s.post("/v1/predict", {"image": b64(images[3]).rstrip("=")})
            return plain, data_url, raw, unpadded

    answers = run(scenario())
    for (status, body, _), want in zip(answers, expected):
        assert status == 200, body
        assert body["prediction"] == pytest.approx(want, abs=TOL)
        assert 0.0 <= body["prediction"] <= 1.0
        assert body["label"] == ("roadwork" if body["prediction"] > 0.5 else "none")
        assert body["stage"] == "classifier" and body["cached"] is False and body["degraded"] is False
        assert set(body["timings_ms"]) == {"decode", "queue", "compute", "total"}
    assert "scores" not in answers[0][1]
    assert answers[2][1]["scores"]["classifier"] == pytest.approx(expected[2], abs=TOL)


def test_multipart_uploads_answer_like_raw_bytes(engine, model_dir):
    """`curl -F image=@x.jpg` (a form part named image, other parts ignored) answers what the raw bytes answer, on
    /v1/predict and /v1/predict/stream; a form without that part, or cut short, is a 400 naming it."""
    image = jpeg(7)
    [want] = direct(engine, [image])
    boundary = "b0undary"

    def form(*parts: tuple[str, bytes], close: bool = True) -> bytes:
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x\"\r\n"
                        f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
        return body + (f"--{boundary}--\r\n".encode() if close else b"")

    async def scenario():
        async with serving(engine, model_dir, cache_entries=0) as s:
            data = aiohttp.FormData()
            data.add_field("note", "ignored")
            data.add_field("image", image, filename="x.jpg", content_type="image/jpeg")
            async with s.client.post(s.url + "/v1/predict", data=data) as r:  # aiohttp writes the form itself
                by_client = r.status, await r.json()
            async with s.client.post(s.url + "/v1/predict/stream?explain=0", data=form(("image", image)),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              "X-Request-ID": "form-1"}) as r:
                streamed = r.status, await r.text()
                assert r.headers["X-Request-ID"] == "form-1"  # a stream's headers leave before the middleware sees it
            typed = f"multipart/form-data; boundary={boundary}"
            return by_client, streamed, {
                "no_image": await s.post("/v1/predict", data=form(("file", image)), content_type=typed),
                "truncated": await s.post("/v1/predict", data=form(("image", image), close=False)[:-2],
                                          content_type=typed),
                "no_boundary": await s.post("/v1/predict", data=form(("image", image)),
                                            content_type="multipart/form-data"),
                "empty_part": await s.post("/v1/predict", data=form(("image", b"")), content_type=typed),
                "many_parts": await s.post("/v1/predict", data=form(*[("x", b"1")] * 40, ("image", image)),
                                           content_type=typed),
            }

    (status, body), (stream_status, events), errors = run(scenario())
    assert status == 200 and body["prediction"] == pytest.approx(want, abs=TOL), body
    assert stream_status == 200 and "event: result" in events, events
    result = orjson.loads(events.split("event: result\ndata: ")[1].split("\n")[0])
    assert result["prediction"] == pytest.approx(want, abs=TOL)
    assert {name: (code, answer["error"]["code"]) for name, (code, answer, _) in errors.items()} == {
        "no_image": (400, "missing_field"), "truncated": (400, "invalid_multipart"),
        "no_boundary": (400, "invalid_multipart"), "empty_part": (400, "invalid_field"),
        "many_parts": (400, "missing_field")}
    assert "curl -F image=@photo.jpg" in errors["no_image"][1]["error"]["message"]
    assert "['file']" in errors["no_image"][1]["error"]["message"]


def test_a_client_request_id_is_kept_and_echoed(engine, model_dir):
    """A plain X-Request-ID (up to 64 of [A-Za-z0-9._:-]) is the request's id in our answer and logs; anything else
    (too long, spaces, control characters: it would go into log lines and headers) is replaced by a new one."""
    async def scenario():
        async with serving(engine, model_dir, cache_entries=0) as s:
            out = {}
            for given in ("trace-42:a.b_c", "x" * 65, "two words", "a\tb"):
                _, _, headers = await s.post("/v1/predict", {"image": b64(jpeg(0))}, headers={"X-Request-ID": given})
                out[given] = headers["X-Request-ID"]
            _, _, headers = await s.post("/v1/predict", {"image": b64(jpeg(0))})
            return out, headers["X-Request-ID"]

    given, fresh = run(scenario())
    assert given["trace-42:a.b_c"] == "trace-42:a.b_c"
    for bad in ("x" * 65, "two words", "a\tb"):
        assert given[bad] != bad and len(given[bad]) == 16
    assert len(fresh) == 16


def test_batch_mixes_good_and_bad_images_in_order(engine, model_dir):
    good = [jpeg(10 + i) for i in range(5)]
    huge = png(jpeg(99, size=(400, 300)))  # 120k pixels: over the limit below
    expected = direct(engine, good)

    async def scenario():
        async with serving(engine, model_dir, max_pixels=100_000) as s:
            images = [b64(good[0]), b64(b"\xff\xd8\xff\xe0 truncated jpeg"), b64(good[1]), "not base64 at all!",
                      b64(good[2]), b64(huge), 42, b64(good[3]), b64(good[4])]
            return await s.post("/v1/predict/batch", {"images": images})

    status, body, _ = run(scenario())
    assert status == 200
    results = body["results"]
    assert len(results) == 9
    codes = {i: r["error"]["code"] for i, r in enumerate(results) if "error" in r}
    assert codes == {1: "undecodable_image", 3: "invalid_base64", 5: "image_too_large", 6: "invalid_field"}
    assert "images[3]" in results[3]["error"]["message"] and "images[6]" in results[6]["error"]["message"]
    got = [results[i]["prediction"] for i in (0, 2, 4, 7, 8)]
    assert got == pytest.approx(expected, abs=TOL)


def test_image_synapse_round_trip(engine, model_dir):
    image = jpeg(20, size=(224, 224))
    [expected] = direct(engine, [image])
    synapse = {"name": "ImageSynapse", "timeout": 12.0, "total_size": 0, "header_size": 0,
               "dendrite": {"ip": "1.2.3.4", "port": 8091, "hotkey": "5Fvalidator", "nonce": 7},
               "axon": {"ip": "5.6.7.8", "port": 8091, "hotkey": "5Fminer"}, "computed_body_hash": "",
               "required_hash_fields": [], "image": b64(image), "prediction": -1.0, "testnet_label": 1}

    async def scenario():
        async with serving(engine, model_dir) as s:
            return await s.post("/ImageSynapse", synapse)

    status, body, _ = run(scenario())
    assert status == 200
    assert body["prediction"] == pytest.approx(expected, abs=TOL)
    assert {k: v for k, v in body.items() if k != "prediction"} == {k: v for k, v in synapse.items()
                                                                     if k != "prediction"}
    assert list(body) == list(synapse)


def test_cache_hit_same_bytes_any_form(engine, model_dir):
    image = jpeg(30)

    async def scenario():
        async with serving(engine, model_dir) as s:
            first = await s.post("/v1/predict", {"image": b64(image)})
            again = await s.post("/v1/predict", data=image, content_type="image/jpeg")
            batch = await s.post("/v1/predict/batch", {"images": [b64(image), b64(jpeg(31))]})
            hits, misses = await s.metric("roadwork_cache_hits_total"), await s.metric("roadwork_cache_misses_total")
            computed = await s.metric("roadwork_batch_size_sum")
            return first, again, batch, hits, misses, computed

    first, again, batch, hits, misses, computed = run(scenario())
    assert first[1]["cached"] is False and again[1]["cached"] is True
    assert again[1]["prediction"] == first[1]["prediction"]
    assert [r["cached"] for r in batch[1]["results"]] == [True, False]
    assert (hits, misses, computed) == (2, 2, 2)


def test_concurrent_requests_share_one_batch(engine, model_dir):
    images = [jpeg(40 + i) for i in range(MAX_BATCH)]
    expected = direct(engine, images)

    async def scenario():
        # A long delay: the batch must start because it is full, not because the delay ran out.
        async with serving(engine, model_dir, max_delay_ms=10_000) as s:
            start = time.monotonic()
            answers = await asyncio.gather(*(s.post("/v1/predict", {"image": b64(im)}) for im in images))
            took = time.monotonic() - start
            return answers, took, await s.metric("roadwork_batch_size_count"), \
                await s.metric("roadwork_batch_size_sum")

    answers, took, batches, batched_images = run(scenario())
    assert [a[0] for a in answers] == [200] * MAX_BATCH
    assert [a[1]["prediction"] for a in answers] == pytest.approx(expected, abs=TOL)
    assert (batches, batched_images) == (1, MAX_BATCH)
    assert took < 8.0  # well before the 10 s delay


# --- errors ----------------------------------------------------------------------------------------------

def test_error_statuses(engine, model_dir):
    image = jpeg(50)

    async def scenario():
        async with serving(engine, model_dir, max_body_mb=0.05, max_pixels=1000, max_batch_images=3) as s:
            return {
                "bad_json": await s.post("/v1/predict", data=b"{not json", content_type="application/json"),
                "json_list": await s.post("/v1/predict", [1, 2]),
                "no_image": await s.post("/v1/predict", {"img": b64(image)}),
                "image_not_str": await s.post("/v1/predict", {"image": 5}),
                "bad_base64": await s.post("/v1/predict", {"image": "@@@@"}),
                "too_big": await s.post("/v1/predict", data=b"\xff" * 100_000, content_type="image/jpeg"),
                "too_many": await s.post("/v1/predict/batch", {"images": [b64(image)] * 4}),
                "empty_batch": await s.post("/v1/predict/batch", {"images": []}),
                "text": await s.post("/v1/predict", data=b"hello", content_type="text/plain"),
                "batch_raw": await s.post("/v1/predict/batch", data=image, content_type="image/jpeg"),
                "not_image": await s.post("/v1/predict", data=b"GIF89a....", content_type="image/gif"),
                "pixels": await s.post("/v1/predict", data=png(jpeg(51, size=(64, 64))), content_type="image/png"),
                "no_route": await s.post("/v1/nope", {"image": b64(image)}),  # /v2 paths: test_kserve.py
                "method": await s.post("/v1/predict", {"image": b64(image)}, method="PUT"),
            }

    answers = run(scenario())
    expected = {"bad_json": (400, "invalid_json"), "json_list": (400, "invalid_json"),
                "no_image": (400, "missing_field"), "image_not_str": (400, "invalid_field"),
                "bad_base64": (400, "invalid_base64"), "too_big": (413, "body_too_large"),
                "too_many": (413, "too_many_images"), "empty_batch": (400, "invalid_field"),
                "text": (415, "unsupported_media_type"), "batch_raw": (415, "unsupported_media_type"),
                "not_image": (422, "undecodable_image"), "pixels": (422, "image_too_large"),
                "no_route": (404, "not_found"), "method": (405, "method_not_allowed")}
    for name, (status, code) in expected.items():
        got_status, body, _ = answers[name]
        assert (got_status, body["error"]["code"]) == (status, code), (name, body)
        assert body["error"]["message"]
    assert answers["too_many"][1]["error"]["message"] == "images has 4 entries; the limit is 3"
    assert "4096" in answers["pixels"][1]["error"]["message"] and "1000" in answers["pixels"][1]["error"]["message"]
    assert answers["method"][2]["Allow"] == "POST"


def test_full_queue_rejects_at_once(engine, model_dir):
    images = [jpeg(60 + i) for i in range(4)]

    async def scenario():
        async with serving(engine, model_dir, queue_size=2, max_delay_ms=1500) as s:
            waiting = [asyncio.create_task(s.post("/v1/predict", {"image": b64(im)})) for im in images[:2]]
            give_up = time.monotonic() + 10.0
            while len(s.service.batcher) < 2:
                assert time.monotonic() < give_up, "the two requests never queued"
                await asyncio.sleep(0.005)
            rejected = await s.post("/v1/predict", {"image": b64(images[2])})
            batch_rejected = await s.post("/v1/predict/batch", {"images": [b64(images[3])]})
            rejected_early = not any(task.done() for task in waiting)  # answered before the queued batch ran
            queued = await asyncio.gather(*waiting)
            never_fits = await s.post("/v1/predict/batch", {"images": [b64(jpeg(64 + i)) for i in range(3)]})
            return rejected, batch_rejected, rejected_early, never_fits, queued, \
                await s.metric("roadwork_queue_dropped_total", reason="queue_full")

    rejected, batch_rejected, rejected_early, never_fits, queued, dropped = run(scenario())
    assert never_fits[0] == 413 and never_fits[1]["error"]["code"] == "too_many_images"
    for status, body, headers in (rejected, batch_rejected):
        assert status == 503 and body["error"]["code"] == "queue_full"
        assert int(headers["Retry-After"]) >= 1
    assert rejected_early
    assert [q[0] for q in queued] == [200, 200]
    assert dropped == 2


def test_burst_beyond_queue_is_refused_before_decoding(engine, model_dir):
    images = [jpeg(120 + i) for i in range(12)]

    async def scenario():
        async with serving(engine, model_dir, queue_size=3, max_delay_ms=300) as s:
            answers = await asyncio.gather(*(s.post("/v1/predict", {"image": b64(im)}) for im in images))
            return answers, await s.metric("roadwork_decode_duration_seconds_count")

    answers, decoded = run(scenario())
    statuses = sorted(a[0] for a in answers)
    assert statuses.count(200) >= 3 and set(statuses) <= {200, 503}
    assert decoded == statuses.count(200)  # refused requests cost no decode time


def test_work_that_cannot_meet_its_deadline_is_refused_at_once(engine, model_dir):
    """Admission compares the estimated wait (work ahead x measured per-image compute time) with the time left
    before the request's deadline; the synapse's own `timeout` sets that deadline here."""
    release = threading.Event()

    async def scenario():
        try:
            return await admission(release)
        finally:
            release.set()  # a failing assertion must not leave the inference thread held

    async def admission(release: threading.Event):
        async with serving(engine, model_dir, max_delay_ms=0) as s:
            for i in range(3):  # real batches: the server measures its per-image cost
                assert (await s.post("/v1/predict", {"image": b64(jpeg(400 + i))}))[0] == 200
            cost_s = s.service.batcher.image_cost_s
            assert cost_s is not None and cost_s > 0
            held = asyncio.ensure_future(s.service.batcher.run_on_worker(release.wait, 10))
            ahead = asyncio.create_task(s.post("/v1/predict/batch", {"images": [b64(jpeg(410 + i))
                                                                                for i in range(MAX_BATCH)]}))
            give_up = time.monotonic() + 5.0
            while s.service.batcher.estimated_wait_s(1) < (MAX_BATCH + 1) * cost_s:  # the batch is on the worker
                assert time.monotonic() < give_up, "the batch ahead never counted in the estimated wait"
                await asyncio.sleep(0.005)
            wait_s = s.service.batcher.estimated_wait_s(1)
            hopeless = await s.post("/ImageSynapse", {"image": b64(jpeg(420)), "prediction": -1.0,
                                                      "timeout": wait_s / 2})
            feasible = asyncio.create_task(s.post("/ImageSynapse", {"image": b64(jpeg(421)), "prediction": -1.0,
                                                                    "timeout": 30.0}))
            await asyncio.sleep(0.05)
            release.set()
            await held
            return hopeless, await feasible, await ahead, \
                await s.metric("roadwork_queue_dropped_total", reason="deadline_unreachable")

    hopeless, feasible, ahead, refused = run(scenario())
    assert hopeless[0] == 503 and hopeless[1]["error"]["code"] == "queue_full", hopeless
    assert "exceeds" in hopeless[1]["error"]["message"] and "Retry-After" in hopeless[2]
    assert feasible[0] == 200 and 0 <= feasible[1]["prediction"] <= 1
    assert ahead[0] == 200 and all("prediction" in r for r in ahead[1]["results"])
    assert refused == 1


def test_deadline_drops_queued_work_uncomputed(engine, model_dir):
    async def scenario():
        async with serving(engine, model_dir, timeout_s=0.3, max_delay_ms=2000) as s:
            start = time.monotonic()
            expired = await s.post("/v1/predict", {"image": b64(jpeg(70))})
            took = time.monotonic() - start
            # The synapse's own timeout, when shorter, is the deadline.
            synapse = await s.post("/ImageSynapse", {"image": b64(jpeg(71)), "prediction": -1.0, "timeout": 0.1})
            await asyncio.sleep(0.05)
            return expired, took, synapse, await s.metric("roadwork_queue_dropped_total", reason="deadline"), \
                await s.metric("roadwork_batch_size_count"), len(s.service.batcher)

    expired, took, synapse, dropped, batches, depth = run(scenario())
    assert expired[0] == 504 and expired[1]["error"]["code"] == "deadline_exceeded"
    assert 0.29 < took < 2.0  # the 0.3 s deadline, not the 2 s batch delay
    assert synapse[0] == 504
    assert (dropped, batches, depth) == (2, 0, 0)  # dropped, never computed


def test_client_disconnect_drops_queued_work(engine, model_dir):
    async def scenario():
        async with serving(engine, model_dir, max_delay_ms=1500) as s:
            async with aiohttp.ClientSession() as impatient:
                request = asyncio.create_task(impatient.post(
                    s.url + "/v1/predict", data=orjson.dumps({"image": b64(jpeg(80))}),
                    headers={"Content-Type": "application/json"}))
                give_up = time.monotonic() + 10.0
                while len(s.service.batcher) < 1:  # queued, waiting for its batch
                    assert time.monotonic() < give_up, "the request never queued"
                    await asyncio.sleep(0.005)
                request.cancel()  # the client gives up: its connection closes
                with pytest.raises(asyncio.CancelledError):
                    await request
            give_up = time.monotonic() + 2.0
            while await s.metric("roadwork_queue_dropped_total", reason="client_disconnected") < 1:
                assert time.monotonic() < give_up, "disconnected request still queued"
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.6)  # past the batch delay: the dropped image must not be computed
            return len(s.service.batcher), await s.metric("roadwork_batch_size_count"), \
                await s.metric("roadwork_http_requests_total", route="/v1/predict", status="499")

    depth, batches, disconnected = run(scenario())
    assert (depth, batches, disconnected) == (0, 0, 1)


# --- health, readiness, models, metrics ------------------------------------------------------------------

def test_ready_only_after_warmup_and_health_meanwhile(engine, model_dir):
    """The inference thread is held busy before the app starts, so warmup cannot have run yet."""
    release = threading.Event()
    image = jpeg(90)
    [expected] = direct(engine, [image])

    async def scenario():
        held = []

        def hold_worker(service: Service) -> None:
            held.append(asyncio.ensure_future(service.batcher.run_on_worker(release.wait, 10)))

        async with serving(engine, model_dir, wait_ready=False, before_start=hold_worker) as s:
            health = await s.get("/healthz")
            not_ready = await s.get("/readyz")
            early = asyncio.create_task(s.post("/v1/predict", {"image": b64(image)}))
            models_before = orjson.loads((await s.get("/v1/models"))[1])
            metric_before = await s.metric("roadwork_ready")
            release.set()
            await s.wait_ready()
            return health, not_ready, await early, models_before, metric_before, await s.metric("roadwork_ready")

    health, not_ready, early, models_before, ready_before, ready_after = run(scenario())
    assert health[0] == 200 and orjson.loads(health[1]) == {"status": "alive"}
    assert not_ready[0] == 503 and orjson.loads(not_ready[1])["status"] == "warming_up"
    assert early[0] == 200 and early[1]["prediction"] == pytest.approx(expected, abs=TOL)
    assert models_before["ready"] is False and (ready_before, ready_after) == (0, 1)


def test_models_describes_engine_and_settings(engine, model_dir):
    async def scenario():
        async with serving(engine, model_dir, queue_size=77) as s:
            described = await s.get("/v1/models")
        async with serving(engine, model_dir, max_batch=None) as s:  # unset: the device's default
            return described, orjson.loads((await s.get("/v1/models"))[1])

    (status, body, content_type), unset = run(scenario())
    assert unset["server"]["max_batch"] == default_max_batch("cpu") == 8
    described = orjson.loads(body)
    assert status == 200 and content_type.startswith("application/json")
    assert described["ready"] is True
    # Paths relative to the bundle: clients learn which model is served, not where the server's files lie.
    assert described["engine"]["model_dir"] == "."
    assert str(model_dir) not in body.decode()
    assert {k: v for k, v in described["engine"].items() if k not in ("model_dir", "stages")} == \
        {k: v for k, v in orjson.loads(orjson.dumps(engine.describe())).items() if k not in ("model_dir", "stages")}
    assert described["server"]["queue_size"] == 77 and described["server"]["max_batch"] == MAX_BATCH


def test_metrics_exposition(engine, model_dir):
    async def scenario():
        async with serving(engine, model_dir) as s:
            await s.post("/v1/predict", {"image": b64(jpeg(100))})
            await s.post("/v1/predict", {"image": "%%%"})
            return await s.get("/metrics")

    status, body, content_type = run(scenario())
    text = body.decode()
    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("roadwork_http_requests", "roadwork_http_request_duration_seconds", "roadwork_queue_wait_seconds",
                 "roadwork_batch_size", "roadwork_queue_depth", "roadwork_cache_hits", "roadwork_cache_misses",
                 "roadwork_stage_exits", "roadwork_compute_duration_seconds", "roadwork_decode_duration_seconds",
                 "roadwork_ready", "process_cpu_seconds", "process_resident_memory_bytes"):
        assert name in families, name
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["roadwork_http_requests"].samples if s.name.endswith("_total")}
    assert requests[("/v1/predict", "200")] == 1 and requests[("/v1/predict", "400")] == 1
    exits = [s for s in families["roadwork_stage_exits"].samples if s.name.endswith("_total")]
    assert [(s.labels["stage"], s.value) for s in exits] == [("classifier", 1)]
    assert "_created" not in text  # no creation-time twin of every counter and histogram
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in families:  # README's list of metrics stays complete
        if name.startswith("roadwork_"):
            assert name in readme, name
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_two_apps_in_one_process_have_separate_metrics(engine, model_dir):
    async def scenario():
        async with serving(engine, model_dir) as a, serving(engine, model_dir) as b:
            await a.post("/v1/predict", {"image": b64(jpeg(110))})
            return await a.metric("roadwork_batch_size_count"), await b.metric("roadwork_batch_size_count")

    assert run(scenario()) == (1, 0)
