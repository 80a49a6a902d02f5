"""Hard-case capture: rules, sampling rates, caps, the crash-safe store, its FiftyOne and COCO files (checked against
FiftyOne's documented layout and loaded with pycocotools), tools.hardcases, the server capturing, and kill -9."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from runtime.cascade.engine import Engine
from runtime.cascade.results import Box, ImageResult
from runtime.image_decode import decode_image
from fixtures.checkpoints import make_vit
from fixtures.images import b64, jpeg
from fixtures.serving import ServerProcess, read_events, serving
from tools import hardcases as cli
from imagesets.hardcase_capture import CaptureConfig, HardCaseCapture, RateCaps, matched_rules
from imagesets.hardcase_store import CLASSES, DETECTIONS, INDEX, LABELS, HardCaseStore, image_id, read_index

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "default"
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))
ALL_ONE = {rule: 1.0 for rule in ("requested", "degraded", "vlm", "disagree", "band")}


def result(p: float, scores: dict | None = None, stage: str = "classifier", degraded: bool = False,
           boxes: list[Box] | None = None) -> ImageResult:
    return ImageResult(p, "roadwork" if p > 0.5 else "none", stage, scores or {stage: p}, degraded, boxes=boxes)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def capture(root: Path, clock: Clock | None = None, **config) -> HardCaseCapture:
    return HardCaseCapture(root, CaptureConfig(**{"rates": dict(ALL_ONE), **config}), lambda: "sha256:test",
                           vlm_stage="vlm", rng=random.Random(0), clock=clock or time.time)


def check_fiftyone_layout(root: Path) -> dict:
    """FiftyOneImageClassificationDataset as FiftyOne documents it: data/<uuid>.<ext> and labels.json with
    "classes" and "labels": {uuid: {"label": class id, "confidence", "attributes"}}, every uuid a file in data/."""
    labels = json.loads((root / LABELS).read_text())
    assert set(labels) == {"classes", "labels"} and labels["classes"] == list(CLASSES)
    files = {p.stem: p for p in (root / "data").iterdir()}
    for uuid, target in labels["labels"].items():
        assert uuid in files, uuid
        assert decode_image(files[uuid].read_bytes()).ndim == 3
        assert set(target) == {"label", "confidence", "attributes"}
        assert target["label"] in (0, 1) and 0.0 <= target["confidence"] <= 1.0
        for name, value in target["attributes"].items():  # flat fields FiftyOne can store on a Classification
            assert isinstance(value, (str, int, float, bool)) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)), (name, value)
    return labels


def check_coco(path: Path, data_dir: Path):
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    for image in coco.loadImgs(coco.getImgIds()):
        assert (data_dir / image["file_name"]).is_file()
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert w >= 0 and h >= 0 and ann["category_id"] in coco.cats and 0.0 <= ann["score"] <= 1.0
    return coco


# --- rules, rates, caps ------------------------------------------------------------------------------------

def test_rules():
    assert matched_rules(result(0.55), False, 0.1, "vlm") == ["band"]
    assert matched_rules(result(0.7), False, 0.1, "vlm") == []
    assert matched_rules(result(0.7), True, 0.1, "vlm") == ["requested"]
    assert matched_rules(result(0.2, {"classifier": 0.8, "detectors": 0.2}, "detectors"), False, 0.1, "vlm") == \
        ["disagree"]
    assert matched_rules(result(0.9, {"classifier": 0.8, "detectors": 0.7, "vlm": 0.9}, "vlm"), False, 0.1,
                         "vlm") == ["vlm"]
    assert matched_rules(result(0.45, {"classifier": 0.45}, degraded=True), True, 0.1, None) == \
        ["requested", "degraded", "band"]


def test_sampling_rates(tmp_path):
    never = capture(tmp_path / "a", rates={**ALL_ONE, "band": 0.0})
    assert all(never.offer(jpeg(i), result(0.5)) is None for i in range(50))
    assert never.matched["band"] == 50 and never.queue.qsize() == 0
    half = capture(tmp_path / "b", rates={**ALL_ONE, "band": 0.5}, per_minute=0, per_hour=0, per_day=0,
                   queue_size=1000)
    taken = sum(half.offer(jpeg(i), result(0.5)) == "band" for i in range(400))
    assert 160 <= taken <= 240  # seeded: deterministic, and near 200
    # An image matching several rules is tried rule by rule: a rate-0 rule does not stop a later one
    mixed = capture(tmp_path / "c", rates={**ALL_ONE, "requested": 0.0})
    assert mixed.offer(jpeg(1), result(0.5), requested=True) == "band"


def test_caps_per_minute_hour_day():
    caps = RateCaps({"minute": 2, "hour": 3, "day": 4})
    t = 0.0
    for expected in (None, None, "rate_minute"):
        assert caps.check(t) == expected
        if expected is None:
            caps.take(t)
    t += 61
    assert caps.check(t) is None
    caps.take(t)
    assert caps.check(t + 1) == "rate_hour"
    t += 3601
    caps.take(t)
    assert caps.check(t + 70) == "rate_day"
    assert caps.check(t + 86400 + 70) is None


def test_caps_queue_and_disk_drops_are_counted(tmp_path):
    clock = Clock()
    dropped = []
    c = capture(tmp_path / "caps", clock, per_minute=3, queue_size=10)
    c.on_dropped = dropped.append
    outcomes = [c.offer(jpeg(i), result(0.5)) for i in range(5)]
    assert outcomes == ["band"] * 3 + [None] * 2 and dropped == ["rate_minute"] * 2
    clock.now += 60.5
    assert c.offer(jpeg(9), result(0.5)) == "band"

    q = capture(tmp_path / "queue", queue_size=2)  # not started: nothing drains the queue
    assert [q.offer(jpeg(i), result(0.5)) for i in range(3)] == ["band", "band", None]
    assert q.dropped == {"queue_full": 1}

    d = capture(tmp_path / "disk", max_disk_mb=1e-6)  # one image is over it
    d.start()
    try:
        assert d.offer(jpeg(1), result(0.5)) == "band"
        deadline = time.monotonic() + 10
        while not d.captured and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.offer(jpeg(2), result(0.5)) is None and d.dropped == {"disk_full": 1}
    finally:
        d.close()


def test_duplicates_are_written_once_and_refund_their_cap(tmp_path):
    c = capture(tmp_path / "dup", per_minute=2)
    c.start()
    try:
        assert c.offer(jpeg(1), result(0.5)) == "band"
        assert c.offer(jpeg(1), result(0.5)) == "band"
        deadline = time.monotonic() + 10
        while sum(c.captured.values()) + sum(c.dropped.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.dropped == {"duplicate": 1}
        assert c.offer(jpeg(2), result(0.5)) == "band"  # the duplicate's slot came back
    finally:
        c.close()
    assert len(read_index(tmp_path / "dup")) == 2


# --- the store and its files -------------------------------------------------------------------------------

def fill(root: Path) -> list[bytes]:
    """Four captures: near the threshold, disagreeing with boxes, VLM-decided, requested (no detectors)."""
    images = [jpeg(i, (64 + 8 * i, 48)) for i in range(4)]
    boxes = [Box("deimv2", "cone", 0.9, (1.0, 2.0, 30.0, 40.0)), Box("deimv2", "barrier", 0.4, (5.0, 5.0, 9.0, 9.5))]
    results = [result(0.52), result(0.2, {"classifier": 0.7, "detectors": 0.2}, "detectors", boxes=boxes),
               result(0.9, {"classifier": 0.8, "detectors": 0.6, "vlm": 0.9}, "vlm", boxes=[]), result(0.05)]
    c = capture(root)
    c.start()
    for i, (image, r) in enumerate(zip(images, results)):
        assert c.offer(image, r, requested=i == 3) is not None
    c.close()
    return images


def test_store_writes_fiftyone_and_coco_layouts(tmp_path):
    images = fill(tmp_path)
    labels = check_fiftyone_layout(tmp_path)
    by_id = {image_id(im): im for im in images}
    assert set(labels["labels"]) == set(by_id)
    near = labels["labels"][image_id(images[0])]
    assert near["label"] == 1 and near["confidence"] == pytest.approx(0.52)
    attrs = near["attributes"]
    assert attrs["rules"] == ["band"] and attrs["model_digest"] == "sha256:test" and attrs["score_classifier"] == 0.52
    assert labels["labels"][image_id(images[1])]["attributes"]["rules"] == ["disagree"]
    assert labels["labels"][image_id(images[3])]["attributes"]["rules"] == ["requested"]
    coco = check_coco(tmp_path / DETECTIONS, tmp_path / "data")
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 2  # the two the detectors saw
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"cone", "barrier"}
    [cone] = coco.loadAnns(coco.getAnnIds(catIds=coco.getCatIds(catNms=["cone"])))
    assert cone["bbox"] == [1.0, 2.0, 29.0, 38.0] and cone["area"] == pytest.approx(29 * 38)


def test_recovery_from_a_crash_mid_write(tmp_path):
    images = fill(tmp_path)
    (tmp_path / INDEX).open("ab").write(b'{"id": "torn')            # a line a crash cut short
    (tmp_path / "data" / "ffffffffffffffffffffffffffffffff.jpg").write_bytes(images[0])  # image, no index line
    (tmp_path / ".tmp" / "labels.json.1.2").write_bytes(b"{half")    # a temp file never renamed
    assert len(read_index(tmp_path)) == 4  # readers skip the torn line
    with HardCaseStore(tmp_path) as store:
        assert len(store.samples) == 4
        assert store.add_image(jpeg(77), captured_at=1.0, rules=["requested"], captured_by="requested",
                               prediction=0.3, label="none", stage="classifier", model_digest="d", source="t") \
            is not None
    assert len(read_index(tmp_path)) == 5
    assert not any((tmp_path / ".tmp").iterdir())
    assert len(list((tmp_path / "data").iterdir())) == 5
    check_fiftyone_layout(tmp_path)
    with pytest.raises(RuntimeError, match="another process"):
        with HardCaseStore(tmp_path):
            HardCaseStore(tmp_path)


def test_cli_list_summary_export_merge(tmp_path, capsys):
    images = fill(tmp_path / "a")
    assert cli.main(["summary", str(tmp_path / "a"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 4 and summary["rules"] == {"band": 1, "disagree": 1, "vlm": 1, "requested": 1}
    assert summary["stages"] == {"classifier": 2, "detectors": 1, "vlm": 1} and summary["with_boxes"] == 2
    assert cli.main(["list", str(tmp_path / "a"), "--rule", "vlm", "--rule", "band"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert cli.main(["export", str(tmp_path / "a"), str(tmp_path / "fo"), "--min-p", "0.1", "--max-p", "0.6",
                     "--since", day, "--until", day]) == 0
    assert set(check_fiftyone_layout(tmp_path / "fo")["labels"]) == {image_id(images[0]), image_id(images[1])}
    assert cli.main(["export", str(tmp_path / "a"), str(tmp_path / "coco"), "--format", "coco"]) == 0
    coco = check_coco(tmp_path / "coco" / LABELS, tmp_path / "coco" / "data")
    assert len(coco.getImgIds()) == 2 and len(list((tmp_path / "coco" / "data").iterdir())) == 2

    c = capture(tmp_path / "b")  # a second replica: one image in common, one of its own
    c.start()
    c.offer(images[0], result(0.52))
    c.offer(jpeg(50), result(0.49))
    c.close()
    assert cli.main(["merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "5 added, 1 duplicates skipped" in capsys.readouterr().out
    assert len(check_fiftyone_layout(tmp_path / "m")["labels"]) == 5
    assert cli.main(["compact", str(tmp_path / "m")]) == 0


# --- the server capturing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_engine():
    engine = Engine.load(BUNDLE, "cpu", "float32", max_batch=8)
    yield engine
    engine.close()


def test_server_captures_by_rule_with_boxes_and_metrics(bundle_engine, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("band = 0.1\nper_minute = 100\n[rates]\nband = 1.0\nvlm = 1.0\ndisagree = 1.0\n")
    images = [p.read_bytes() for p in SAMPLES]
    extra, streamed = jpeg(123, (224, 224)), jpeg(124, (224, 224))

    async def scenario():
        async with serving(bundle_engine, BUNDLE, hardcases=tmp_path / "hc", hardcases_rules=rules,
                           cache_entries=0) as s:
            answers = [(await s.post("/v1/predict?detail=1", {"image": b64(im)}))[1] for im in images]
            requested = (await s.post("/v1/predict?capture=1&detail=1", {"image": b64(extra)}))[1]
            batch = (await s.post("/v1/predict/batch?capture=yes", {"images": [b64(images[0])]}))[0]
            assert batch == 200
            async with s.client.post(s.url + "/v1/predict/stream?capture=1&detail=1&explain=0", data=streamed,
                                     headers={"Content-Type": "image/jpeg"}) as response:
                stream_answer = dict((await read_events(response)))["result"]
            give_up = time.monotonic() + 20
            while s.service.hardcases.queue.qsize() and time.monotonic() < give_up:
                await asyncio.sleep(0.05)
            metrics = {rule: await s.metric("roadwork_hardcases_captured_total", rule=rule)
                       for rule in ("band", "vlm", "disagree", "requested")}
            return answers, requested, stream_answer, metrics

    answers, requested, stream_answer, metrics = asyncio.run(scenario())
    expect = {}
    for image, a in zip(images, answers):
        r = result(a["prediction"], a["scores"], a["stage"], a["degraded"])
        rules_hit = matched_rules(r, False, 0.1, "vlm")
        if rules_hit:
            expect[image_id(image)] = rules_hit
    expect[image_id(extra)] = matched_rules(result(requested["prediction"], requested["scores"], requested["stage"]),
                                            True, 0.1, "vlm")
    expect[image_id(streamed)] = matched_rules(result(stream_answer["prediction"], stream_answer["scores"],
                                                      stream_answer["stage"]), True, 0.1, "vlm")
    expect.setdefault(image_id(images[0]), ["requested"])  # the batch asked for it
    assert any("vlm" in r for r in expect.values()) and any("disagree" in r for r in expect.values())
    samples = {s.id: s for s in read_index(tmp_path / "hc")}
    assert expect == {k: s.rules for k, s in samples.items()}
    assert all(s.model_digest.startswith("sha256:") and s.source == "server" for s in samples.values())
    for s in samples.values():
        if s.stage in ("detectors", "vlm"):
            assert s.boxes is not None
    labels = check_fiftyone_layout(tmp_path / "hc")  # compacted on shutdown
    assert set(labels["labels"]) == set(samples)
    coco = check_coco(tmp_path / "hc" / DETECTIONS, tmp_path / "hc" / "data")
    assert len(coco.getAnnIds()) == sum(len(s.boxes) for s in samples.values() if s.boxes)
    assert sum(metrics.values()) == len(samples)


def test_kill_9_mid_capture_leaves_a_loadable_dataset(tmp_path):
    """A real server capturing every request (?capture=1) is killed with SIGKILL while requests are in flight: every
    file labels.json names exists and decodes, the index has no half line after recovery, and compaction lists
    every image the index holds."""
    model = tmp_path / "vit"
    make_vit(model, seed=2)
    rules = tmp_path / "rules.toml"
    rules.write_text("per_minute = 0\nper_hour = 0\nper_day = 0\ncompact_every_s = 0.2\nqueue_size = 1000\n")
    hc = tmp_path / "hc"
    with ServerProcess(model, "--hardcases", str(hc), "--hardcases-rules", str(rules)) as server:
        url, proc, give_up = server.url, server.proc, time.monotonic() + 120
        stop = threading.Event()

        def keep_sending() -> None:  # requests in flight, and captures queued, when the kill comes
            for n in itertools.count():
                if stop.is_set():
                    return
                body = json.dumps({"images": [b64(jpeg(1000 + 8 * n + k, (160, 120))) for k in range(8)]}).encode()
                request = urllib.request.Request(url + "/v1/predict/batch?capture=1", data=body,
                                                 headers={"Content-Type": "application/json"})
                try:
                    urllib.request.urlopen(request, timeout=30).close()
                except OSError:
                    return  # the server is gone

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        while len(read_index(hc)) < 15:
            assert time.monotonic() < give_up, "captures never reached the index"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        stop.set()
        sender.join(30)

    assert proc.returncode == -signal.SIGKILL
    check_fiftyone_layout(hc)  # as the crash left it: possibly behind the index, never naming a missing file
    indexed = {s.id for s in read_index(hc)}
    assert len(indexed) >= 15
    done = subprocess.run([sys.executable, "-m", "tools.hardcases", "compact", str(hc)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = check_fiftyone_layout(hc)
    assert set(labels["labels"]) == indexed
    assert (hc / INDEX).read_bytes().endswith(b"\n")
