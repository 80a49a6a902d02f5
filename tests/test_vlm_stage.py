"""The VLM stage in the cascade on tiny random-weight checkpoints: routing after the detectors (or the classifier),
answers equal to VLMEngine on the same image and prompt, stage callbacks, explanations and streams, cancellation,
the memory budget, and the breaker."""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from runtime.cascade.bundle import VLMStageSpec
from runtime.cascade.engine import Engine
from runtime.cascade.precision import vlm_run_dtype
from runtime.options import REQUEST_DEADLINE_S
from runtime.models import auto_precision
from runtime.models.auto_precision import FP32, Candidate, PrecisionChoice
from runtime.models.qwen3_vl import Qwen3VLConfig
from runtime.errors import ModelLoadError
from runtime.vlm.sequence import SamplingParams
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from fixtures.bundles import classifier_stage, detector_stage, thresholds_splitting, vlm_stage, write_bundle
from fixtures.images import tinted_images

PROMPT = "Is there roadwork in this image? Answer Yes or No."
EXPLAIN = "Describe the roadwork you see, briefly."
STAGES = ["classifier", "detectors", "vlm"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def engines():
    """Engine.load, closing every engine (and its vlm loop thread) after the test."""
    loaded: list[Engine] = []

    def load(bundle: Path, max_batch: int = 4) -> Engine:
        loaded.append(Engine.load(bundle, "cpu", "float32", max_batch=max_batch))
        return loaded[-1]

    yield load
    for engine in loaded:
        engine.close()


@pytest.fixture(scope="module")
def routing(vlm_cascade_models, tmp_path_factory) -> dict:
    """Thresholds with which the classifier decides 6 of the 12 images, the detectors 2 of the other 6."""
    imgs = tinted_images()
    probs = [r.prediction for r in Engine.load(vlm_cascade_models / "cls", "cpu", "float32").predict(imgs)]
    low, high = thresholds_splitting(probs, 3, 3)
    two = write_bundle(tmp_path_factory.mktemp("two"), classifier_stage(vlm_cascade_models, low, high)
                       + detector_stage(vlm_cascade_models, 0.5, None))
    voted = {i: r.scores["detectors"] for i, r in enumerate(Engine.load(two, "cpu", "float32").predict(imgs))
             if r.stage == "detectors"}
    det_low, det_high = thresholds_splitting(list(voted.values()), 1, 1)
    return dict(images=imgs, low=low, high=high, det_low=det_low, det_high=det_high, voted=voted)


def three_stages(models: Path, r: dict, path: Path, vlm_extra: str = "") -> Path:
    exits = f"exit_below = {r['det_low']!r}\nexit_above = {r['det_high']!r}"
    detectors = detector_stage(models, 0.5, None, extra=exits)
    return write_bundle(path, classifier_stage(models, r["low"], r["high"]) + detectors + vlm_stage(models, vlm_extra))


def reference_engine(models: Path) -> VLMEngine:
    return VLMEngine.load(models / "vlm", config=VLMEngineConfig(kv_cache_bytes=1 << 24))


def test_undecided_images_reach_the_vlm_and_take_its_answer(vlm_cascade_models, routing, tmp_path, engines):
    imgs = routing["images"]
    engine = engines(three_stages(vlm_cascade_models, routing, tmp_path))
    events = []
    results = engine.predict(imgs, on_stage=lambda *event: events.append(event))  # 3 chunks of 4
    stages = [r.stage for r in results]
    assert (stages.count("classifier"), stages.count("detectors"), stages.count("vlm")) == (6, 2, 4)
    to_vlm = [i for i, s in enumerate(stages) if s == "vlm"]
    want = reference_engine(vlm_cascade_models).score([imgs[i] for i in to_vlm], PROMPT)
    for i, ref in zip(to_vlm, want):
        r = results[i]
        assert r.prediction == pytest.approx(ref.p_yes, abs=1e-5) and r.scores["vlm"] == r.prediction
        assert list(r.scores) == STAGES and r.scores["detectors"] == pytest.approx(routing["voted"][i], abs=1e-5)
        assert r.label == ("roadwork" if r.prediction > 0.5 else "none") and not r.degraded
        assert r.tokens == {"prompt": ref.num_prompt_tokens, "cached": ref.num_cached_tokens, "generated": 0}
        assert r.explanation is None and r.detector_scores.keys() == {"a"}
    for r in results:
        if r.stage != "vlm":
            assert r.tokens is None and r.explanation is None and "vlm" not in r.scores and not r.degraded
    # Decided images never reach the VLM: the prompt tokens it counted are exactly the undecided images'.
    stats = engine.vlm_stats()
    assert stats["prompt_tokens"] == sum(results[i].tokens["prompt"] for i in to_vlm)
    assert stats["generated_tokens"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]

    # on_stage: once per image per stage it reached, in stage order, with that stage's p; decided only at the end.
    seen = defaultdict(list)
    for i, stage, p, decided in events:
        seen[i].append((stage, p, decided))
    for i, r in enumerate(results):
        assert [(s, p) for s, p, _ in seen[i]] == list(r.scores.items())
        assert [d for _, _, d in seen[i]] == [False] * (len(r.scores) - 1) + [True]
    # Chunk by chunk (indexes of the whole call), and within a chunk each stage after the one before it.
    order = [(i // 4, STAGES.index(stage)) for i, stage, _, _ in events]
    assert order == sorted(order) and len(events) == 12 + 6 + 4


def test_explanations_and_streams(vlm_cascade_models, routing, tmp_path, engines):
    imgs = routing["images"]
    bundle = write_bundle(tmp_path, classifier_stage(vlm_cascade_models, routing["low"], routing["high"])
                          + vlm_stage(vlm_cascade_models))
    engine = engines(bundle)
    plain = engine.predict(imgs)
    assert {r.stage for r in plain} == {"classifier", "vlm"} and all(r.explanation is None for r in plain)
    scored = next(i for i, r in enumerate(plain) if r.stage == "vlm")
    exited = next(i for i, r in enumerate(plain) if r.stage == "classifier")
    reference = reference_engine(vlm_cascade_models)

    def greedy(image, roadwork: bool):
        """The explanation as the stage asks for it: the answer forced to open with the decided yes/no token."""
        yes, no = reference.score_token_ids
        prompt = reference.prompt_ids(EXPLAIN, 1) + [yes if roadwork else no]
        result, = reference.generate([prompt], [[image]], SamplingParams(max_new_tokens=48))
        return result, reference.tokenizer.decode([yes if roadwork else no]) + result.text

    with pytest.raises(ValueError, match="explain has 1 entries for 12 images"):
        engine.predict(imgs, explain=[True])
    results = engine.predict(imgs, explain=[i in (scored, exited) for i in range(len(imgs))])
    for i, r in enumerate(results):
        assert r.prediction == pytest.approx(plain[i].prediction, abs=1e-5) and r.stage == plain[i].stage
        if i not in (scored, exited):
            assert r.explanation is None
    ref, text = greedy(imgs[exited], results[exited].label == "roadwork")
    assert results[exited].explanation == text and ref.text
    assert results[exited].tokens == {"prompt": ref.num_prompt_tokens, "cached": 0, "generated": len(ref.token_ids)}
    ref, text = greedy(imgs[scored], results[scored].label == "roadwork")
    r = results[scored]
    assert r.explanation == text
    # Scoring and explaining add up; the explanation's prompt starts with the scored image's cached blocks.
    assert r.tokens["prompt"] == plain[scored].tokens["prompt"] + ref.num_prompt_tokens
    assert r.tokens["generated"] == len(ref.token_ids) and r.tokens["cached"] > 0

    # A full stream gives the explanation's text, chunk by chunk, on the vlm loop thread.
    chunks, done, threads = [], threading.Event(), set()

    def collect(out):
        chunks.append(out)
        threads.add(threading.current_thread().name)
        if out.finished:
            done.set()

    engine.explain_stream(imgs[scored], r.label == "roadwork", collect)
    assert done.wait(60)
    assert "".join(c.text for c in chunks) == text and chunks[-1].finish_reason == ref.finish_reason
    assert chunks[-1].generated_tokens == len(ref.token_ids) and threads == {"vlm loop (vlm)"}

    # Cancelling a stream (a slow consumer: the test acts while it runs) frees its blocks before cancel returns.
    assert ref.finish_reason == "length"  # uncancelled, it would run all 48 steps
    outputs, first = [], threading.Event()

    def slow(out):
        outputs.append(out)
        first.set()
        time.sleep(0.01)

    request_id = engine.explain_stream(imgs[exited], True, slow)
    assert first.wait(60)
    assert engine.cancel(request_id)
    assert outputs[-1].finished and outputs[-1].finish_reason == "cancelled" and outputs[-1].generated_tokens < 48
    stats = engine.vlm_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["kv_blocks_used"] == 0
    assert stats["running"] == stats["waiting"] == 0
    assert not engine.cancel(request_id)  # already ended

    # A consumer that raises has its stream cancelled. Calling the engine from on_output (the loop thread) raises
    # instead of waiting on itself forever.
    ended, errors = threading.Event(), []

    def raising(out):
        if out.finished:
            ended.set()
            return
        try:
            engine.vlm_stats()
        except RuntimeError as e:
            errors.append(str(e))
            raise

    engine.explain_stream(imgs[0], False, raising)
    assert ended.wait(60)
    assert errors == ["vlm stage 'vlm': called from its own loop thread (inside an on_output callback); raise from "
                      "on_output to cancel that stream instead"]
    stats = engine.vlm_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == 0

    # explain_above: every image whose final p is above it is explained (here: half of them).
    cut = sum(thresholds_splitting([r.prediction for r in plain], 6, 6)) / 2
    above = write_bundle(tmp_path / "above", classifier_stage(vlm_cascade_models, routing["low"], routing["high"])
                         + vlm_stage(vlm_cascade_models, f"explain_above = {cut!r}\nmax_explain_tokens = 4"))
    results = engines(above).predict(imgs)
    assert [r.explanation is not None for r in results] == [r.prediction > cut for r in plain]
    assert sum(r.explanation is not None for r in results) == 6


def test_warmup_describe_close(vlm_cascade_models, routing, tmp_path, engines):
    engine = engines(three_stages(vlm_cascade_models, routing, tmp_path, vlm_extra="time_budget_ms = 5000"))
    engine.warmup()
    stats = engine.vlm_stats()
    assert stats["prompt_tokens"] == stats["cached_tokens"] == stats["generated_tokens"] == 0  # warmup not counted
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] > 0 and stats["preemptions"] == 0
    info = engine.describe()
    json.dumps(info)
    _, detectors, vlm = info["stages"]
    assert (detectors["exit_below"], detectors["exit_above"]) == (routing["det_low"], routing["det_high"])
    assert vlm["name"] == "vlm" and vlm["kind"] == "vlm" and vlm["model_type"] == "qwen3_vl"
    assert vlm["device"] == "cpu" and vlm["prompt"] == PROMPT and vlm["kv_cache_gb"] == 0.02
    assert vlm["kv_blocks"] == stats["kv_blocks_total"] and vlm["breaker"] == "closed"
    assert vlm["time_budget_ms"] == 5000 and vlm["model"] == str(vlm_cascade_models / "vlm")
    assert vlm["dtype"] == "float32"  # dtype auto without a measurement: the engine's
    assert engine.stage_states() == {"detectors": "closed", "vlm": "closed"}

    # Closing ends a stream in flight and stops the loop thread.
    outputs, first = [], threading.Event()

    def slow(out):
        outputs.append(out)
        first.set()
        time.sleep(0.01)

    engine.explain_stream(routing["images"][0], True, slow)
    assert first.wait(60)
    engine.close()
    engine.close()
    assert not engine.cascade.vlm.loop.thread.is_alive()
    assert outputs[-1].finished and outputs[-1].finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="vlm stage 'vlm' is closed"):
        engine.explain_stream(routing["images"][0], True, outputs.append)
    assert engine.cancel(0) is False
    stats = engine.vlm_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["generated_tokens"] > 0
    results = engine.predict(routing["images"])  # the closed stage fails: its images keep the detectors' answer
    assert {r.stage for r in results} == {"classifier", "detectors"} and sum(r.degraded for r in results) == 4


def test_without_a_vlm_stage(vlm_cascade_models, routing):
    engine = Engine.load(vlm_cascade_models / "cls", "cpu", "float32")
    assert engine.vlm_stats() is None
    for call in (lambda: engine.explain_stream(routing["images"][0], True, print), lambda: engine.cancel(0)):
        with pytest.raises(RuntimeError, match="this bundle has no vlm stage"):
            call()
    results = engine.predict(routing["images"][:3], explain=[True] * 3)
    assert [(r.explanation, r.tokens) for r in results] == [(None, None)] * 3
    engine.close()


def test_failing_vlm_degrades_opens_and_recovers(vlm_cascade_models, routing, tmp_path, engines):
    imgs = routing["images"]
    bundle = write_bundle(tmp_path, classifier_stage(vlm_cascade_models, routing["low"], routing["high"])
                          + vlm_stage(vlm_cascade_models, "failure_threshold = 1\ncooldown_s = 5.0"))
    engine = engines(bundle, max_batch=16)
    vlm = engine.cascade.vlm
    now = [0.0]
    vlm.breaker.clock = lambda: now[0]
    healthy = engine.predict(imgs)
    calls = []

    def broken(*args, **kwargs):  # the engine's forward pass raises, inside the loop thread's step
        calls.append(1)
        raise RuntimeError("injected VLM failure")

    vlm.engine.runner.run = broken

    def check_degraded(results):
        for r, h in zip(results, healthy):
            if h.stage == "vlm":
                assert r.degraded and r.stage == "classifier" and r.prediction == h.scores["classifier"]
                assert r.scores.keys() == {"classifier"} and r.tokens is None and r.explanation is None
            else:
                assert r == h

    check_degraded(engine.predict(imgs, explain=[True] * len(imgs)))  # fails: open, so no explanations either
    assert engine.stage_states() == {"vlm": "open"} and len(calls) == 1
    stats = engine.vlm_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == stats["waiting"] == 0
    check_degraded(engine.predict(imgs))  # open: not called
    assert len(calls) == 1
    now[0] = 5.0
    del vlm.engine.runner.run  # recovered: the probe succeeds and closes the breaker
    results = engine.predict(imgs)
    assert engine.stage_states() == {"vlm": "closed"}
    for r, h in zip(results, healthy):
        assert r.stage == h.stage and r.prediction == pytest.approx(h.prediction, abs=1e-5) and not r.degraded
    vlm.time_budget_s = 0.0  # every scoring call overruns
    results = engine.predict(imgs)
    assert engine.stage_states() == {"vlm": "open"} and sum(r.degraded for r in results) == 6


def test_scoring_waits_until_the_callers_deadline(vlm_cascade_models, routing, tmp_path, engines):
    """Engine.predict's deadline reaches the VLM: scoring waits for what is left of it (REQUEST_DEADLINE_S without
    one), within the stage's time budget; once it has passed, the VLM's images are degraded."""
    imgs = routing["images"]
    bundle = write_bundle(tmp_path, classifier_stage(vlm_cascade_models, routing["low"], routing["high"])
                          + vlm_stage(vlm_cascade_models, "failure_threshold = 1\ncooldown_s = 5.0"))
    engine = engines(bundle, max_batch=16)
    vlm = engine.cascade.vlm
    assert vlm.score_timeout(None) == REQUEST_DEADLINE_S
    assert 50.0 < vlm.score_timeout(time.monotonic() + 60.0) <= 60.0
    assert vlm.score_timeout(time.monotonic() - 1.0) == 0.0
    vlm.time_budget_s = 0.5
    assert vlm.score_timeout(time.monotonic() + 60.0) == vlm.score_timeout(None) == 0.5
    vlm.time_budget_s = None
    seen = []
    score = vlm.score
    vlm.score = lambda images, digests=None, deadline=None: seen.append(deadline) or score(images, digests, deadline)
    deadline = time.monotonic() + 60.0
    results = engine.predict(imgs, deadline=deadline)
    assert seen == [deadline] and not any(r.degraded for r in results)
    results = engine.predict(imgs, deadline=time.monotonic() - 1.0)
    assert sum(r.degraded for r in results) == 6 and engine.stage_states() == {"vlm": "open"}
    stats = engine.vlm_stats()
    assert stats["running"] == stats["waiting"] == 0


@pytest.mark.parametrize("extra, kv_cache_gb, message", [
    ("", 1e6, r"stage 2 \('vlm'\): the VLM does not fit on cpu: weights [0-9.e-]+ GiB \(torch.float32\) \+ KV cache "
              r"1e\+06 GiB \(key 'kv_cache_gb' = 1000000.0\) = 1e\+06 GiB, but only [0-9.e+]+ GiB is free; lower "
              r"kv_cache_gb \(one 4096-token sequence needs [0-9.e-]+ GiB\), or put the stage on another device"),
    ("", 0.001, r"stage 2 \('vlm'\): key 'kv_cache_gb' = 0.001 is less than one 4096-token sequence needs"),
    ('yes_token = "Maybe"', 0.02, r"stage 2 \('vlm'\): 'Maybe' encodes to \d+ tokens"),
    ('device = "gpu7"', 0.02, "stage 'vlm': device 'gpu7' is not a valid torch device"),
], ids=["kv-over-free-memory", "kv-under-one-sequence", "yes-not-one-token", "bad-device"])
def test_load_errors(vlm_cascade_models, tmp_path, extra, kv_cache_gb, message):
    text = classifier_stage(vlm_cascade_models, 0.2, 0.8) + vlm_stage(vlm_cascade_models, extra, kv_cache_gb)
    with pytest.raises(ModelLoadError, match=message):
        Engine.load(write_bundle(tmp_path, text), "cpu", "float32")


def test_vlm_model_must_be_qwen3_vl(vlm_cascade_models, tmp_path):
    text = classifier_stage(vlm_cascade_models, 0.2, 0.8) + vlm_stage(vlm_cascade_models).replace(
        str(vlm_cascade_models / "vlm"), str(vlm_cascade_models / "cls"))
    message = r"stage 2 \('vlm'\): .*model_type 'dinov3_vit' is not 'qwen3_vl' \(a vlm stage needs"
    with pytest.raises(ModelLoadError, match=message):
        Engine.load(write_bundle(tmp_path, text), "cpu", "float32")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_checks_cuda_memory(vlm_cascade_models, routing, tmp_path, engines):
    imgs = routing["images"]
    cpu = engines(three_stages(vlm_cascade_models, routing, tmp_path / "cpu")).predict(imgs)
    engine = Engine.load(three_stages(vlm_cascade_models, routing, tmp_path / "cuda"), "cuda", "float32", max_batch=4)
    conv_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, to compare with the CPU
    try:
        engine.warmup()
        results = engine.predict(imgs)
    finally:
        torch.backends.cudnn.allow_tf32 = conv_tf32
        engine.close()
    # Exit decisions could flip only within rounding of a threshold; the thresholds sit in gaps.
    for r, c in zip(results, cpu):
        assert r.stage == c.stage and r.prediction == pytest.approx(c.prediction, abs=1e-3)
    free, _ = torch.cuda.mem_get_info()
    text = (classifier_stage(vlm_cascade_models, 0.2, 0.8)
            + vlm_stage(vlm_cascade_models, kv_cache_gb=2 * free / 2 ** 30))
    with pytest.raises(ModelLoadError, match=r"stage 2 \('vlm'\): the VLM does not fit on cuda:0: .* GiB is free"):
        Engine.load(write_bundle(tmp_path / "big", text), "cuda", "float32")


def test_the_vlm_runs_in_its_own_dtype(vlm_cascade_models, routing, tmp_path, engines):
    engine = engines(three_stages(vlm_cascade_models, routing, tmp_path, vlm_extra='dtype = "bfloat16"'))
    assert engine.dtype == torch.float32 and engine.describe()["stages"][2]["dtype"] == "bfloat16"
    assert engine.cascade.vlm.engine.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    results = engine.predict(routing["images"])
    assert all(0.0 <= r.prediction <= 1.0 for r in results) and any(r.stage == "vlm" for r in results)


def test_vlm_dtype_auto_measures_bf16_at_the_vlms_own_products(vlm_cascade_models, monkeypatch):
    spec = VLMStageSpec("vlm", vlm_cascade_models / "vlm")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    bf16 = Candidate(torch.bfloat16)
    auto = PrecisionChoice(Candidate(torch.float32, "int8-fbgemm"), "auto")
    measured = []

    def measure_speed(candidates, linears, rows, budget_s):
        measured.append((candidates, {(layer.in_features, layer.out_features, count) for layer, count in linears},
                         rows))
        return {FP32: 1.0, bf16: speeds[bf16]}

    monkeypatch.setattr(auto_precision, "measure_speed", measure_speed)
    speeds = {bf16: 0.4}
    assert vlm_run_dtype(spec, "here", cpu, torch.float32, auto) == torch.bfloat16
    text = Qwen3VLConfig.from_dict(json.loads((spec.model / "config.json").read_text())).text
    h, kv = text.hidden_size, text.num_kv_heads * text.head_dim
    candidates, shapes, rows = measured[0]
    assert candidates == [FP32, bf16] and rows == spec.max_num_seqs
    assert (h, kv, 2 * text.num_layers) in shapes and (h, text.intermediate_size, 2 * text.num_layers) in shapes
    for slower in (1.0, None):  # within the noise margin; dropped as over 4x slower
        speeds = {bf16: slower}
        assert vlm_run_dtype(spec, "here", cpu, torch.float32, auto) == torch.float32
    measured.clear()
    assert vlm_run_dtype(spec, "here", cpu, torch.float32, None) == torch.float32  # nothing chosen by auto
    assert vlm_run_dtype(spec, "here", cpu, torch.float32, replace(auto, how="explicit")) == torch.float32
    assert vlm_run_dtype(spec, "here", cuda, torch.float16, auto) == torch.float16  # CUDA: the engine's choice
    assert vlm_run_dtype(replace(spec, dtype="float32"), "here", cpu, torch.bfloat16, auto) == torch.float32
    assert measured == []
