"""VLM stage: our paged-KV engine vs transformers' `generate` on the same random Qwen3-VL weights, same dtype.

  python -m bench.vlm --preset small --concurrency 1,8,32 --new-tokens 32
  python -m bench.vlm --tiny

Each request is one 224x224 image (distinct per request, as validator images are) + a question through the chat
template. For each concurrency c:
  prefill tok/s: prompt tokens of c requests / time to their first token (ours: the engine's first step(s);
                 transformers: one generate call on the batch of c, timed by a streamer);
  decode tok/s:  c x (new_tokens - 1) / the time from the first token to the last.
Prefix cache: the same image + question scored again (prefill only), and the same image with another question.
All figures come from one run, ratios are ours / transformers."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import DTYPES, machine, print_table, write_json
from runtime.vlm.sequence import SamplingParams
from runtime.vlm.engine import VLMEngine, VLMEngineConfig

QUESTION = "Is there roadwork in this image? Answer Yes or No."
OTHER_QUESTION = "Describe the street scene: cars, cones, workers, signs, excavators and barriers."

PRESETS = {
    # Qwen3-VL-2B's layout (head_dim 128, GQA 2:1, MRoPE [24, 20, 20], DeepStack) at a CPU-friendly size.
    "small": dict(
        text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                              mrope_section=[24, 20, 20], mrope_interleaved=True)),
        vision_config=dict(depth=8, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                           out_hidden_size=512, num_position_embeddings=2304, deepstack_visual_indexes=[1, 3, 5]),
        tie_word_embeddings=True),
}


def make_checkpoint(preset: str, path: Path):
    from fixtures.vlm_checkpoints import TINY, make_qwen3_vl  # transformers: a benchmark/test dependency only

    cfg = TINY if preset == "tiny" else PRESETS[preset]
    patch = cfg["vision_config"]["patch_size"]
    # Qwen3-VL's own pixel range (min 256x256) for patch 16; the tiny model's patch 8 gets a 4x smaller one.
    min_pixels, max_pixels = (256 * 256, 16384 * 1024) if patch == 16 else (64 * 64, 128 * 128)
    return make_qwen3_vl(path, cfg, min_pixels=min_pixels, max_pixels=max_pixels)


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def ours_generation(path: Path, config: VLMEngineConfig, dtype: torch.dtype, c: int, new_tokens: int, seed: int
                    ) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, prompt tokens) for c concurrent requests on a fresh engine."""
    engine = VLMEngine.load(path, dtype=dtype, config=config)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request(QUESTION, [im], sampling=sampling) for im in images(c, seed)]
    prompt_tokens = sum(engine.requests[i].num_prompt_tokens for i in ids)
    t0 = time.perf_counter()
    while any(engine.requests[i].num_generated_tokens == 0 for i in ids):
        engine.step()
    t1 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, prompt_tokens


class TokenClock:
    """A transformers streamer that notes when each generation step hands over its tokens."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generation(path: Path, model, c: int, new_tokens: int, seed: int, prompt: list[int]) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one transformers generate call on a batch of c requests."""
    from fixtures.vlm_checkpoints import IMAGE_PAD
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = Qwen2VLImageProcessorPil.from_pretrained(path)(images=images(c, seed), return_tensors="pt")
    inputs = {"input_ids": torch.tensor([prompt] * c),
              "mm_token_type_ids": torch.tensor([[int(t == IMAGE_PAD) for t in prompt]] * c),
              "attention_mask": torch.ones(c, len(prompt), dtype=torch.long),
              "pixel_values": pixels["pixel_values"].to(model.dtype), "image_grid_thw": pixels["image_grid_thw"]}
    clock = TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    assert out.shape[1] == len(prompt) + new_tokens
    # put() #0 is the prompt, #1 the first new token (after the prefill), the rest one per decode step.
    return clock.times[1] - t0, clock.times[-1] - clock.times[1]


def prefix_cache(path: Path, config: VLMEngineConfig, dtype: torch.dtype) -> list[dict]:
    engine = VLMEngine.load(path, dtype=dtype, config=config)
    image, other = images(2, seed=123)
    engine.score([other], QUESTION)  # warm-up: first-call costs stay out of the timed rows
    rows = []
    for case, question in (("cold", QUESTION), ("same image + prompt", QUESTION),
                           ("same image, other prompt", OTHER_QUESTION)):
        t0 = time.perf_counter()
        score, = engine.score([image], question)
        seconds = time.perf_counter() - t0
        rows.append({"case": case, "prompt_tokens": score.num_prompt_tokens, "cached_tokens": score.num_cached_tokens,
                     "computed_tokens": score.num_prompt_tokens - score.num_cached_tokens, "ms": seconds * 1e3})
    return rows


def run(preset: str, dtype: torch.dtype, concurrency: list[int], new_tokens: int, repeats: int) -> dict:
    config = VLMEngineConfig(kv_cache_bytes=1 << 30, max_model_len=1024, max_num_seqs=max(concurrency),
                             max_num_batched_tokens=8192, block_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        model = make_checkpoint(preset, path).to(dtype)
        warm = VLMEngine.load(path, dtype=dtype, config=config)
        warm.generate([QUESTION], [images(1, seed=99)], SamplingParams(max_new_tokens=2, ignore_eos=True))
        rid = warm.add_request(QUESTION, images(1, seed=99))  # every request's prompt has these token ids
        prompt = warm.requests[rid].token_ids
        warm.cancel(rid)
        rows = []
        for c in concurrency:
            # Untimed: first runs at a batch size pay one-time costs (oneDNN primitives, allocator growth).
            ours_generation(path, config, dtype, c, 3, seed=0)
            hf_generation(path, model, c, 3, 0, prompt)
            # Alternated, ours then theirs per repeat: on a shared machine a load change between a block of our
            # runs and a block of theirs would land on one side of the ratio only.
            pairs = [(ours_generation(path, config, dtype, c, new_tokens, seed=c * 7 + r),
                      hf_generation(path, model, c, new_tokens, c * 7 + r, prompt)) for r in range(repeats)]
            ours, theirs = zip(*pairs)
            prompt_tokens = ours[0][2]
            decode_tokens = c * (new_tokens - 1)
            row = {"concurrency": c, "prompt_tokens": prompt_tokens,
                   "ours_prefill_tok_s": prompt_tokens / statistics.median(o[0] for o in ours),
                   "hf_prefill_tok_s": prompt_tokens / statistics.median(t[0] for t in theirs),
                   "ours_decode_tok_s": decode_tokens / statistics.median(o[1] for o in ours),
                   "hf_decode_tok_s": decode_tokens / statistics.median(t[1] for t in theirs)}
            row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"]
            row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
            rows.append(row)
        cache_rows = prefix_cache(path, config, dtype)
    return {"preset": preset, "dtype": str(dtype), "new_tokens": new_tokens, "generation": rows,
            "prefix_cache": cache_rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", *sorted(PRESETS)])
    ap.add_argument("--tiny", action="store_true", help="the tiny test model, few tokens (a smoke run)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrent sequences")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, new_tokens, repeats = ("tiny", 8, 1) if args.tiny else (args.preset, args.new_tokens, args.repeats)
    result = run(preset, DTYPES[args.dtype], [int(c) for c in args.concurrency.split(",")], new_tokens, repeats)
    print(f"preset {preset}, {args.dtype}, {new_tokens} new tokens per request, {machine()}")
    print_table(result["generation"], ["concurrency", "prompt_tokens", "ours_prefill_tok_s", "hf_prefill_tok_s",
                                       "prefill_ratio", "ours_decode_tok_s", "hf_decode_tok_s", "decode_ratio"])
    print("\nprefix cache (score requests: one prefill each)")
    print_table(result["prefix_cache"], ["case", "prompt_tokens", "cached_tokens", "computed_tokens", "ms"])
    cold, hit = result["prefix_cache"][0], result["prefix_cache"][1]
    print(f"repeated prompt: {hit['cached_tokens'] / hit['prompt_tokens']:.0%} of prefill tokens served from the "
          f"cache, prefill time x{cold['ms'] / hit['ms']:.1f} faster")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
