"""The KServe v2 / Triton protocol through NVIDIA's own client (tritonclient[http]) against the real server on
loopback, and its answers against /v1/predict's."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.cascade.engine import Engine
from server.app import create_app, start_site
from server.service import SERVICE
from server.config import ServerConfig
from fixtures.checkpoints import make_vit
from fixtures.images import jpeg

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=11)
    return path


@contextlib.contextmanager
def server_thread(model_dir: Path, **settings):
    """The app on 127.0.0.1 with a free port, its event loop on a thread of its own (tritonclient is synchronous);
    yields (address "host:port", service). Stopped on exit, also after a failure."""
    engine = Engine.load(model_dir, device="cpu", dtype="float32", max_batch=8)
    config = ServerConfig(model=model_dir, port=0, **{"max_batch": 8, **settings})
    loop = asyncio.new_event_loop()
    app = create_app(engine, config)
    runner, host, port = loop.run_until_complete(start_site(app, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"{host}:{port}", app[SERVICE]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        engine.close()


def wait_ready(client, give_up_s: float = 60.0) -> None:
    deadline = time.monotonic() + give_up_s
    while not client.is_server_ready():
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.05)


def v1_predict(url: str, image: bytes) -> dict:
    request = urllib.request.Request(f"http://{url}/v1/predict", data=image, headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return orjson.loads(r.read())


def image_input(images: list[bytes], shape: list[int] | None = None, binary: bool = True):
    tensor = httpclient.InferInput("image", shape or [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape or [len(images)]), binary_data=binary)
    return tensor


def test_tritonclient_health_metadata_infer_and_stats(model_dir):
    images = [jpeg(300 + i) for i in range(16)]
    with server_thread(model_dir, cache_entries=0) as (url, service):
        client = httpclient.InferenceServerClient(url)
        try:
            wait_ready(client)
            assert client.is_server_live()
            assert client.is_model_ready(model_dir.name) and client.is_model_ready("roadwork")
            server = client.get_server_metadata()
            assert set(server["extensions"]) >= {"binary_tensor_data", "statistics"}
            meta = client.get_model_metadata("roadwork")
            assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
            assert {o["name"] for o in meta["outputs"]} == {"prediction", "label", "stage"}
            assert client.get_model_metadata(model_dir.name, model_version="1")["name"] == model_dir.name

            one = client.infer("roadwork", [image_input(images[:1])])
            assert one.as_numpy("prediction").dtype == np.float32 and one.as_numpy("prediction").shape == (1,)
            assert one.as_numpy("label") is None  # not requested

            outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("prediction", "label", "stage")]
            many = client.infer(model_dir.name, [image_input(images, [16, 1])], outputs=outputs, request_id="r-16")
            assert many.get_response()["id"] == "r-16"
            p16 = many.as_numpy("prediction")
            labels = [v.decode() for v in many.as_numpy("label")]
            stages = [v.decode() for v in many.as_numpy("stage")]
            assert p16.shape == (16,) and stages == ["classifier"] * 16

            # JSON (non-binary) outputs and base64 JSON input: the same answers
            as_json = client.infer("roadwork", [image_input([base64.b64encode(im) for im in images[:3]], binary=False)],
                                   outputs=[httpclient.InferRequestedOutput("prediction", binary_data=False)])
            np.testing.assert_allclose(as_json.as_numpy("prediction"), p16[:3], atol=TOL)

            for image, p, label in zip(images, p16, labels):
                v1 = v1_predict(url, image)
                assert v1["prediction"] == pytest.approx(float(p), abs=TOL)
                assert v1["label"] == label
            assert one.as_numpy("prediction")[0] == pytest.approx(p16[0], abs=TOL)

            stats = client.get_inference_statistics("roadwork")["model_stats"][0]
            assert stats["inference_count"] == 1 + 16 + 3 and stats["execution_count"] == 3
            inference = stats["inference_stats"]
            assert inference["success"]["count"] == 3 and inference["fail"]["count"] == 0
            assert inference["cache_miss"]["count"] == 20 and inference["compute_infer"]["ns"] > 0
        finally:
            client.close()


def test_tritonclient_errors_are_kserve_errors(model_dir):
    with server_thread(model_dir) as (url, service):
        client = httpclient.InferenceServerClient(url)
        try:
            wait_ready(client)
            with pytest.raises(InferenceServerException) as bad_image:
                client.infer("roadwork", [image_input([jpeg(1), b"\xff\xd8 not a jpeg"])])
            assert bad_image.value.status() == "422" and "image[1]" in bad_image.value.message()
            with pytest.raises(InferenceServerException) as unknown:
                client.infer("nope", [image_input([jpeg(1)])])
            assert unknown.value.status() == "404" and "roadwork" in unknown.value.message()
            with pytest.raises(InferenceServerException) as bad_output:
                client.infer("roadwork", [image_input([jpeg(1)])], outputs=[httpclient.InferRequestedOutput("boxes")])
            assert bad_output.value.status() == "400" and "boxes" in bad_output.value.message()
            fp32 = httpclient.InferInput("image", [1], "FP32")
            fp32.set_data_from_numpy(np.zeros(1, np.float32))
            with pytest.raises(InferenceServerException) as wrong_type:
                client.infer("roadwork", [fp32])
            assert wrong_type.value.status() == "400" and "BYTES" in wrong_type.value.message()
            assert client.get_inference_statistics("roadwork")["model_stats"][0]["inference_stats"]["fail"]["count"] == 3
        finally:
            client.close()


def test_tritonclient_config_repository_index_and_unknown_routes(model_dir):
    """What tritonclient calls beyond inference: the model config, the repository index, and any /v2 path we do
    not serve answering in KServe's error form, so the client raises its own exception with our message."""
    with server_thread(model_dir) as (url, service):
        client = httpclient.InferenceServerClient(url)
        try:
            wait_ready(client)
            config = client.get_model_config("roadwork")
            assert config["name"] == "roadwork" and config["input"] == [
                {"name": "image", "data_type": "TYPE_STRING", "dims": [-1]}]
            assert {o["name"]: o["data_type"] for o in config["output"]} == {
                "prediction": "TYPE_FP32", "label": "TYPE_STRING", "stage": "TYPE_STRING"}
            assert client.get_model_config(model_dir.name, model_version="1")["name"] == model_dir.name
            assert client.get_model_repository_index() == [{"name": model_dir.name, "version": "1", "state": "READY"}]
            with pytest.raises(InferenceServerException) as unknown_model:
                client.get_model_config("nope")
            assert unknown_model.value.status() == "404" and "'roadwork'" in unknown_model.value.message()
            with pytest.raises(InferenceServerException) as no_route:
                client.load_model("roadwork")  # POST /v2/repository/models/roadwork/load: not served
            assert no_route.value.status() == "404" and no_route.value.message()
            # The shapes side by side: /v2 paths {"error": "<message>"}, the rest /v1's {"error": {"code", ...}}.
            for path, shape in (("/v2/nope", str), ("/v2/models/roadwork/infer", str), ("/v1/nope", dict)):
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(f"http://{url}{path}", timeout=10)  # GET: unknown path or method
                assert e.value.code in (404, 405) and isinstance(orjson.loads(e.value.read())["error"], shape)
        finally:
            client.close()


def test_raw_binary_request_with_truncated_element_is_400(model_dir):
    """What tritonclient cannot send: a binary element cut short, checked by hand."""
    with server_thread(model_dir) as (url, service):
        client = httpclient.InferenceServerClient(url)
        try:
            wait_ready(client)
        finally:
            client.close()
        raw = struct.pack("<I", 100) + b"short"
        head = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(raw)}}]})
        request = urllib.request.Request(f"http://{url}/v2/models/roadwork/infer", data=head + raw,
                                         headers={"Inference-Header-Content-Length": str(len(head)),
                                                  "Content-Type": "application/octet-stream"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        assert e.value.code == 400
        assert "claims 100 bytes" in orjson.loads(e.value.read())["error"]
