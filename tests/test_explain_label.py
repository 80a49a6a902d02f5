"""Explanations never contradict the answer: with the bundled default cascade, every sample's explanation opens with
the bundle's yes word iff its label is "roadwork" and with its no word iff "none", on each path that writes one
(/v1/predict?explain=1, the first token event of /v1/predict/stream, and Engine.predict(explain=...)); and
VLMEngine's answer_prefix, which forces that opening."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from runtime.cascade.engine import Engine
from runtime.image_decode import decode_image
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from runtime.vlm.sequence import SamplingParams
from fixtures.serving import read_events, serving

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "default"
SAMPLES = REPO / "samples"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.load(BUNDLE)  # the server's defaults: CPU, the engine's dtype choice
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def samples() -> list[bytes]:
    return [(SAMPLES / e["file"]).read_bytes() for e in json.loads((SAMPLES / "samples.json").read_text())]


def agrees(engine: Engine, label: str, explanation: str) -> bool:
    vlm = engine.cascade.vlm.spec
    return (explanation.startswith(vlm.yes_token) == (label == "roadwork")
            and explanation.startswith(vlm.no_token) == (label == "none"))


def test_http_explanations_open_with_the_label(engine, samples):
    async def scenario():
        async with serving(engine, BUNDLE, cache_entries=0) as s:
            answers = [await s.post("/v1/predict?explain=1", data=image, content_type="image/jpeg")
                       for image in samples]
            async with s.client.post(s.url + "/v1/predict/stream", data=samples[0],
                                     headers={"Content-Type": "image/jpeg"}) as r:
                events = await read_events(r)
            return answers, events

    answers, events = asyncio.run(scenario())
    assert [status for status, _, _ in answers] == [200] * len(samples)
    bodies = [body for _, body, _ in answers]
    assert {b["label"] for b in bodies} == {"roadwork", "none"}  # the samples hold both answers
    for body in bodies:
        assert agrees(engine, body["label"], body["explanation"]), body
    # Streamed, the forced answer is the first text a client sees.
    tokens = [data["text"] for name, data in events if name == "token"]
    result = events[-1][1]
    assert tokens and agrees(engine, result["label"], tokens[0]) and "".join(tokens) == result["explanation"]


def test_engine_explanations_open_with_the_label(engine, samples):
    results = engine.predict([decode_image(image) for image in samples], explain=[True] * len(samples))
    for r in results:
        assert r.explanation is not None and agrees(engine, r.label, r.explanation), r


def test_answer_prefix_is_prompt_and_opens_the_text(samples):
    """A forced prefix is decoded as if the model had written it: the same tokens follow as for a token-id prompt
    that ends with it, its text opens the first output, and it counts as prompt, not generated, tokens."""
    vlm = VLMEngine.load(BUNDLE / "vlm", config=VLMEngineConfig(kv_cache_bytes=1 << 24))
    image = decode_image(samples[0])
    sampling = SamplingParams(max_new_tokens=8)
    for forced in vlm.score_token_ids:
        prompt = vlm.prompt_ids("Describe the roadwork you see, briefly.", 1)
        [plain] = vlm.generate([prompt + [forced]], [[image]], sampling)
        outputs = []
        vlm.add_request(prompt, [image], sampling=sampling, answer_prefix=(forced,), on_output=outputs.append)
        while not outputs or not outputs[-1].finished:
            vlm.step()
        word = vlm.tokenizer.decode([forced])
        assert outputs[0].text.startswith(word) and outputs[0].new_token_ids == plain.token_ids[:1]
        assert "".join(o.text for o in outputs) == word + plain.text
        assert [t for o in outputs for t in o.new_token_ids] == plain.token_ids
        last = outputs[-1]
        assert (last.num_prompt_tokens, last.num_generated_tokens) == (plain.num_prompt_tokens, len(plain.token_ids))
