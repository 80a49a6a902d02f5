"""The VLM engine end to end on a tiny random Qwen3-VL: continuous batching, prefix caching and preemption do not
change any sequence's tokens (fp32, greedy); cancellation frees blocks; scoring and streaming."""
from __future__ import annotations

import pytest
import torch

from runtime.vlm.sequence import SamplingParams
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from fixtures.images import random_image
from fixtures.vlm_checkpoints import hf_inputs, make_qwen3_vl

QUESTION = "Is there roadwork in this image? Answer Yes or No."
ROOMY = VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256, max_num_batched_tokens=256, block_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_vl")
    return path, make_qwen3_vl(path, seed=2)


IMAGE_A, IMAGE_B, IMAGE_C = random_image(40, 56, seed=10), random_image(64, 32, seed=11), random_image(48, 48, 12)
# (prompt, images, new tokens): different lengths, text-only and two-image prompts, repeated images and prompts.
REQUESTS = [
    (QUESTION, [IMAGE_A], 12),
    ("Describe the street scene: cars, cones, workers, signs, excavators and barriers.", [], 16),
    ("Describe the street scene.", [IMAGE_B], 9),
    (QUESTION, [IMAGE_A], 12),  # same image and prompt as request 0: a prefix-cache hit
    ("Describe the street scene.", [IMAGE_A], 7),  # same image, other prompt: partial hit, vision cache
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                   {"type": "text", "text": QUESTION}]}], [IMAGE_C, IMAGE_B], 10),
]


def alone(path, prompt, images, n: int) -> list[int]:
    engine = VLMEngine.load(path, config=ROOMY)
    result, = engine.generate([prompt], [images], SamplingParams(max_new_tokens=n, ignore_eos=True))
    return result.token_ids


@pytest.fixture(scope="module")
def expected(checkpoint):
    path, _ = checkpoint
    return [alone(path, p, im, n) for p, im, n in REQUESTS]


def run_staggered(engine: VLMEngine, arrivals: dict[int, list[int]]) -> tuple[dict[int, list[int]], dict]:
    """Add REQUESTS[i] for i in arrivals[step] before that step; run until all finish."""
    tokens: dict[int, list[int]] = {}
    final = {}
    index_of = {}

    def collect(out):
        tokens.setdefault(index_of[out.request_id], []).extend(out.new_token_ids)
        if out.finished:
            final[index_of[out.request_id]] = out

    step = 0
    while len(final) < sum(len(v) for v in arrivals.values()):
        for i in arrivals.get(step, []):
            prompt, images, n = REQUESTS[i]
            rid = engine.add_request(prompt, images, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True),
                                     on_output=collect)
            index_of[rid] = i
        engine.step()
        step += 1
        assert step < 500
    return tokens, final


def test_continuous_batching_and_prefix_cache_do_not_change_tokens(checkpoint, expected):
    path, _ = checkpoint
    engine = VLMEngine.load(path, config=VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256,
                                                         max_num_batched_tokens=256, block_size=8, max_num_seqs=3))
    tokens, final = run_staggered(engine, {0: [0, 1], 2: [2], 3: [3, 4], 9: [5]})
    for i in range(len(REQUESTS)):
        assert tokens[i] == expected[i], f"request {i}"
        assert final[i].finish_reason == "length" and final[i].num_generated_tokens == REQUESTS[i][2]
    assert final[0].num_cached_tokens == 0
    # Request 3 repeats request 0 (image and prompt): every full block but the last is reused.
    assert final[3].num_cached_tokens == (final[3].num_prompt_tokens - 1) // 8 * 8
    # Request 4 shares request 0's image but not its question: the blocks before the question are reused, and
    # the placeholders in the partly-cached block take the vision tower's output from the vision cache.
    assert 0 < final[4].num_cached_tokens < final[4].num_prompt_tokens - 8
    stats = engine.stats()
    assert stats["vision_cache_hits"] >= 1 and stats["cached_prefill_tokens"] > 0
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == stats["waiting"] == 0


def test_preemption_does_not_change_tokens(checkpoint, expected):
    path, ref = checkpoint
    text = ref.config.text_config
    block_bytes = 2 * text.num_hidden_layers * 8 * text.num_key_value_heads * text.head_dim * 4
    # 13 blocks of 8 tokens: one 100-token sequence fits, four long ones at once do not.
    engine = VLMEngine.load(path, config=VLMEngineConfig(kv_cache_bytes=13 * block_bytes, max_model_len=100,
                                                         max_num_batched_tokens=256, block_size=8))
    tokens, final = run_staggered(engine, {0: [0, 1, 2, 5]})
    assert engine.stats()["preemptions"] > 0
    for i in (0, 1, 2, 5):
        assert tokens[i] == expected[i], f"request {i}"


def test_cancellation_frees_blocks_at_once(checkpoint):
    path, _ = checkpoint
    engine = VLMEngine.load(path, config=ROOMY)
    total = engine.stats()["num_blocks"]
    outputs = []
    rid = engine.add_request(QUESTION, [IMAGE_A], sampling=SamplingParams(max_new_tokens=50),
                             on_output=outputs.append)
    other = engine.add_request("Describe the street scene.", [], sampling=SamplingParams(max_new_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.stats()["free_blocks"] < total
    assert engine.cancel(rid) and not engine.cancel(rid)  # a second cancel finds nothing
    assert outputs[-1].finished and outputs[-1].finish_reason == "cancelled"
    assert engine.cancel(other)
    assert engine.stats()["free_blocks"] == total and not engine.has_unfinished()
    # A waiting request is cancelled before it holds anything.
    queued = engine.add_request(QUESTION, [IMAGE_B])
    assert engine.cancel(queued) and engine.step() == []


def test_closing_a_stream_cancels_it(checkpoint):
    path, _ = checkpoint
    engine = VLMEngine.load(path, config=ROOMY)
    stream = engine.stream(QUESTION, [IMAGE_A], SamplingParams(max_new_tokens=40, ignore_eos=True))
    first = [next(stream) for _ in range(3)]
    assert [len(o.new_token_ids) for o in first] == [1, 1, 1] and not first[-1].finished
    stream.close()
    assert engine.stats()["free_blocks"] == engine.stats()["num_blocks"] and not engine.has_unfinished()


def test_stream_tokens_text_and_counts(checkpoint):
    path, _ = checkpoint
    engine = VLMEngine.load(path, config=ROOMY)
    sampling = SamplingParams(max_new_tokens=10, ignore_eos=True)
    outs = list(engine.stream(QUESTION, [IMAGE_A], sampling))
    token_ids = [t for o in outs for t in o.new_token_ids]
    assert outs[-1].finished and outs[-1].num_generated_tokens == 10 == len(token_ids)
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(token_ids)
    again, = engine.generate([QUESTION], [[IMAGE_A]], sampling)
    assert again.token_ids == token_ids and again.num_cached_tokens > 0
    assert again.num_prompt_tokens == outs[-1].num_prompt_tokens


def test_score_is_softmax_over_yes_no_of_transformers_logits(checkpoint):
    path, ref = checkpoint
    engine = VLMEngine.load(path, config=ROOMY)
    images = [IMAGE_A, IMAGE_B, IMAGE_C]
    scores = engine.score(images, QUESTION)
    yes, no = engine.score_token_ids
    for image, score in zip(images, scores):
        rid = engine.add_request(QUESTION, [image])
        prompt = engine.requests[rid].token_ids
        engine.cancel(rid)
        with torch.no_grad():
            last = ref(**hf_inputs(path, prompt, [image])).logits[0, -1]
        expected = torch.softmax(last[[yes, no]], dim=0)[0].item()
        assert abs(score.p_yes - expected) < 1e-5
        assert score.num_prompt_tokens == len(prompt) and score.num_cached_tokens == 0
    # Scoring the same image again reuses the prompt's blocks and gives the same probability.
    again, = engine.score([IMAGE_B], QUESTION)
    assert again.num_cached_tokens > 0 and abs(again.p_yes - scores[1].p_yes) < 1e-6


def test_stop_tokens_and_sampling(checkpoint, expected):
    path, _ = checkpoint
    engine = VLMEngine.load(path, config=ROOMY)
    first = expected[0][0]
    result, = engine.generate([QUESTION], [[IMAGE_A]], SamplingParams(max_new_tokens=12, stop_token_ids=(first,)))
    assert result.token_ids == [first] and result.finish_reason == "stop"
    hot = SamplingParams(max_new_tokens=12, temperature=5.0, ignore_eos=True)
    runs = [VLMEngine.load(path, config=ROOMY).generate([QUESTION], [[IMAGE_A]], hot)[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1] != expected[0]  # seeded, and not greedy


def test_bench_runs_at_tiny_size(capsys):
    from bench import vlm

    result = vlm.main(["--tiny", "--concurrency", "1,2", "--threads", "1"])
    assert [r["concurrency"] for r in result["generation"]] == [1, 2]
    for row in result["generation"]:
        assert min(row["ours_prefill_tok_s"], row["hf_prefill_tok_s"], row["ours_decode_tok_s"],
                   row["hf_decode_tok_s"]) > 0
    cold, hit, partial = result["prefix_cache"]
    assert cold["cached_tokens"] == 0 < partial["cached_tokens"] < hit["cached_tokens"] < hit["prompt_tokens"]
    assert "served from the cache" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_unfused_formula(dtype):
    # The text model's RMSNorm normalizes with one fused kernel (the engine's prefill and decode speed); it must
    # equal the reference's float32 pow/mean/rsqrt chain, cast and weight outside.
    from runtime.models.qwen3_vl_text import RMSNorm

    norm = RMSNorm(128, 1e-6).to(dtype)
    norm.weight.data = torch.randn(128).to(dtype)
    x = torch.randn(96, 4, 128).to(dtype) * 3
    xf = x.float()
    unfused = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}  # bf16: torch's defaults (1 ulp)
    torch.testing.assert_close(norm(x), unfused, **tolerance)
