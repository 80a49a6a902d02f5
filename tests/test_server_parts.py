"""The server's pure parts: result cache, base64/JSON parsing, settings from command line and environment."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest

from runtime.cascade.engine import ImageResult
from server.cache import ResultCache, image_key
from runtime.cascade.settings import DEFAULT_MODEL_DIR
from server.config import ServerConfig, parse_config
from server.errors import ApiError
from server.payload import decode_base64_image, parse_json_object


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def result(p: float) -> ImageResult:
    return ImageResult(p, "roadwork" if p > 0.5 else "none", "classifier", {"classifier": p})


def test_cache_lru_order_and_entry_bound():
    cache = ResultCache(max_entries=2, max_bytes=1 << 20, ttl_s=60)
    a, b, c = (image_key(bytes([i])) for i in range(3))
    cache.put(a, result(0.1))
    cache.put(b, result(0.2))
    assert cache.get(a).prediction == 0.1  # a is now the most recently used
    cache.put(c, result(0.3))
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    assert (len(cache), cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 3, 1, 1)


def test_cache_byte_bound():
    one = ResultCache.entry_size(image_key(b"x"), result(0.5))
    cache = ResultCache(max_entries=100, max_bytes=3 * one, ttl_s=60)
    for i in range(5):
        cache.put(image_key(bytes([i])), result(0.5))
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert [cache.get(image_key(bytes([i]))) is not None for i in range(5)] == [False, False, True, True, True]


def test_cache_ttl_expiry_and_refresh():
    clock = Clock()
    cache = ResultCache(max_entries=10, max_bytes=1 << 20, ttl_s=5, clock=clock)
    key = image_key(b"image")
    cache.put(key, result(0.9))
    clock.now += 4.9
    assert cache.get(key) is not None
    clock.now += 0.2
    assert cache.get(key) is None and len(cache) == 0 and cache.bytes == 0
    assert cache.stats.expirations == 1


def test_cache_disabled_stores_nothing():
    cache = ResultCache(max_entries=0, max_bytes=1 << 20, ttl_s=60)
    cache.put(image_key(b"a"), result(0.5))
    assert not cache.enabled and len(cache) == 0


def test_image_key_is_content_hash():
    assert image_key(b"same") == image_key(bytes(b"same")) != image_key(b"other")
    assert len(image_key(b"")) == 16


def test_base64_tolerance():
    data = bytes(range(256)) * 3
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    for form in (text, "data:image/jpeg;base64," + wrapped, "  " + wrapped + "\r\n", text.rstrip("="),
                 base64.urlsafe_b64encode(data).decode()):
        assert decode_base64_image(form, "image") == data


@pytest.mark.parametrize("value, code", [("abc$", "invalid_base64"), ("a", "invalid_base64"),
                                         ("", "invalid_field"), ("data:image/png;base64,", "invalid_field"),
                                         (None, "invalid_field"), (["x"], "invalid_field")])
def test_base64_rejections_name_the_field(value, code):
    with pytest.raises(ApiError) as caught:
        decode_base64_image(value, "images[7]")
    assert (caught.value.status, caught.value.code) == (400, code)
    assert "images[7]" in caught.value.message


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'"str"', b"\xff\xfe"])
def test_json_rejections(body):
    with pytest.raises(ApiError) as caught:
        parse_json_object(body)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_config_defaults_environment_and_command_line():
    config = parse_config([], environ={})
    assert config == ServerConfig() and config.model == DEFAULT_MODEL_DIR
    assert DEFAULT_MODEL_DIR == Path(__file__).resolve().parents[1] / "bundles" / "default"
    env = {"ROADWORK_PORT": "9000", "ROADWORK_MAX_DELAY_MS": "2.5", "ROADWORK_MODEL": "/models/x",
           "ROADWORK_ACCESS_LOG": "yes", "ROADWORK_DTYPE": "bfloat16", "ROADWORK_DEVICE": "cuda:1"}
    config = parse_config([], environ=env)
    assert (config.port, config.max_delay_ms, config.model, config.access_log, config.dtype, config.device) == \
        (9000, 2.5, Path("/models/x"), True, "bfloat16", "cuda:1")
    config = parse_config(["--port", "0", "--no-access-log", "--queue-size", "3"], environ=env)
    assert (config.port, config.access_log, config.queue_size, config.max_delay_ms) == (0, False, 3, 2.5)


@pytest.mark.parametrize("argv, env, batch", [
    ([], {}, 8), (["--device", "cuda"], {}, 32), ([], {"ROADWORK_DEVICE": "cuda:1"}, 32),
    (["--device", "cuda", "--max-batch", "5"], {}, 5), ([], {"ROADWORK_MAX_BATCH": "3"}, 3),
], ids=["cpu-default", "cuda-default", "cuda-index-default", "explicit-on-cuda", "environment"])
def test_max_batch_defaults_per_device(argv, env, batch):
    """8 images per engine call on CPU (ViT-B/16 runs slower per image at 32 there), 32 on CUDA, unless set."""
    assert parse_config(argv, environ=env).batch_size == batch


@pytest.mark.parametrize("argv, env", [(["--port", "70000"], {}), (["--device", "tpu"], {}),
                                       (["--queue-size", "0"], {}), ([], {"ROADWORK_PORT": "eighty"}),
                                       ([], {"ROADWORK_DTYPE": "int8"}), ([], {"ROADWORK_ACCESS_LOG": "maybe"}),
                                       (["--dtype", "float64"], {})])
def test_config_rejects_bad_values(argv, env, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_config(argv, environ=env)
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m server: error:")
