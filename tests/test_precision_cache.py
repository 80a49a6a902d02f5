"""The precision cache (runtime/models/precision_cache.py): a start whose model, machine, libraries and settings
were measured before reads the choice, in milliseconds; any change to the key measures again."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.checkpoints import make_vit
from runtime.cascade import precision as precision_module
from runtime.cascade.engine import Engine
from runtime.models import auto_precision, precision_cache
from runtime.models.auto_precision import FP32, Candidate

FBGEMM = Candidate(torch.float32, "int8-fbgemm")


@pytest.fixture
def vit(tmp_path):
    make_vit(tmp_path / "vit")
    return tmp_path / "vit"


@pytest.fixture
def measured(monkeypatch) -> list:
    """The speed measurement replaced (fbgemm 2.5x fp32; accuracy is really checked); every load a new process's."""
    calls = []

    def measure_speed(candidates, linears, rows, budget_s):
        calls.append(rows)
        return {c: {FP32: 1.0, FBGEMM: 0.4}.get(c, 10.0) for c in candidates}

    monkeypatch.setattr(auto_precision, "measure_speed", measure_speed)
    # The tiny random ViT's int8 drifts 0.015 on the calibration images: let it pass, these tests are of the cache.
    monkeypatch.setattr(auto_precision, "CHOOSE_DRIFT", auto_precision.MAX_DRIFT)
    return calls


def start(model, monkeypatch, cache, max_batch: int = 4) -> Engine:
    monkeypatch.setattr(precision_module, "CHOICES", {})  # a fresh process: nothing remembered in memory
    return Engine.load(model, "cpu", "auto", max_batch=max_batch, quantize="auto", precision_cache=cache)


def test_a_cached_start_reads_the_choice(vit, tmp_path, monkeypatch, measured, caplog):
    cache = tmp_path / "cache" / "precision.json"
    first = start(vit, monkeypatch, cache).describe()["precision"]
    assert len(measured) == 1 and first["chosen"] == "fp32+int8-fbgemm" and first["cached_at"] is None
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["fields"]["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    with caplog.at_level(logging.INFO, logger="runtime.models.auto_precision"):
        engine = start(vit, monkeypatch, cache)
    again = engine.describe()["precision"]
    assert len(measured) == 1  # not measured again
    assert again["chosen"] == first["chosen"] and again["cached_at"] == entry["measured_at"]
    assert [t["verdict"] for t in again["trials"]] == [t["verdict"] for t in first["trials"]]
    assert again["measure_seconds"] < 0.2
    assert engine.describe()["stages"][0]["quantize"] == "int8-fbgemm"
    assert "read from the precision cache" in caplog.text


def test_new_weights_or_settings_measure_again(vit, tmp_path, monkeypatch, measured):
    cache = tmp_path / "precision.json"
    start(vit, monkeypatch, cache)
    start(vit, monkeypatch, cache, max_batch=2)
    assert len(measured) == 2
    weights = vit / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    start(vit, monkeypatch, cache)
    assert len(measured) == 3
    assert len(json.loads(cache.read_text())["entries"]) == 3
    start(vit, monkeypatch, cache, max_batch=2)  # the old weights' entries do not match the new bytes
    assert len(measured) == 4


def test_unchanged_files_are_not_hashed_again(vit, tmp_path, monkeypatch, measured):
    cache = tmp_path / "precision.json"
    hashed = []
    real = precision_cache.file_sha256
    monkeypatch.setattr(precision_cache, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    start(vit, monkeypatch, cache)
    assert "model.safetensors" in hashed and "config.json" in hashed
    hashed.clear()
    start(vit, monkeypatch, cache)
    assert hashed == []


@pytest.mark.parametrize("content", ["{not json", '{"entries": []}'])
def test_an_unreadable_cache_is_measured_and_rewritten(vit, tmp_path, monkeypatch, measured, caplog, content):
    cache = tmp_path / "precision.json"
    cache.write_text(content)
    with caplog.at_level(logging.WARNING, logger="runtime.models.precision_cache"):
        start(vit, monkeypatch, cache)
    assert len(measured) == 1 and "measuring again" in caplog.text
    assert len(json.loads(cache.read_text())["entries"]) == 1


def test_a_malformed_entry_is_measured_again(vit, tmp_path, monkeypatch, measured, caplog):
    cache = tmp_path / "precision.json"
    start(vit, monkeypatch, cache)
    data = json.loads(cache.read_text())
    (entry,) = data["entries"].values()
    entry["choice"]["chosen"]["dtype"] = "not_a_dtype"
    cache.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="runtime.models.auto_precision"):
        engine = start(vit, monkeypatch, cache)
    assert len(measured) == 2 and "is malformed" in caplog.text
    assert engine.describe()["precision"]["chosen"] == "fp32+int8-fbgemm"


def test_an_unwritable_cache_still_serves(vit, tmp_path, monkeypatch, measured, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="runtime.models.precision_cache"):
        engine = start(vit, monkeypatch, blocker / "precision.json")  # its directory cannot be made
    assert engine.describe()["precision"]["chosen"] == "fp32+int8-fbgemm" and "cannot be written" in caplog.text


def test_server_flag(tmp_path):
    from server.config import parse_config
    assert parse_config([], environ={}).precision_cache_path == precision_cache.default_path()
    assert parse_config(["--precision-cache", "off"], environ={}).precision_cache_path is None
    assert parse_config([], environ={"ROADWORK_PRECISION_CACHE": str(tmp_path / "p.json")}
                        ).precision_cache_path == tmp_path / "p.json"
    assert precision_cache.default_path().parts[-2:] == ("roadwork-cascade", "precision.json")


def test_replicas_starting_together_measure_once(vit, tmp_path, monkeypatch, measured):
    """Two starts at once on one cache (threads here; flock holds between open files as between processes): one
    measures while the other waits on the lock, then reads its entry."""
    import threading
    import time

    from runtime.models.precision_cache import PrecisionCache
    from runtime.models.preprocessor import read_preprocess

    real = auto_precision.measure_speed

    def slow(*args):
        time.sleep(0.5)  # the second start arrives while the first measures
        return real(*args)

    monkeypatch.setattr(auto_precision, "measure_speed", slow)
    cache, choices = PrecisionCache(tmp_path / "precision.json"), []

    def replica():
        choices.append(auto_precision.choose_cached(vit, torch.device("cpu"), read_preprocess(vit), 4, None, None, cache))

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(measured) == 1 and len(choices) == 2
    assert choices[0].candidate == choices[1].candidate
    assert sorted(c.cached_at is None for c in choices) == [False, True]
