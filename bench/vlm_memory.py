"""VLM memory: weight and KV bytes of Qwen3-VL 2B / 4B / 8B per format, how many concurrent 224x224 scoring requests
fit beside the vision cascade on an 80 GB GPU, and measured CPU figures on small models.

  python -m bench.vlm_memory [--json out.json]

Shapes: the public config.json values of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct, written below (no weights needed).
Bytes are counted from our model built on the meta device, as each format is held once loaded on CUDA:
  bf16:  every tensor 2 bytes
  fp8:   every Linear but lm_head 1 byte per weight + Fp8Linear's float32 scale per (row, 128-input block)
  int4:  the language model's Linears (AWQ / compressed-tensors releases leave the vision tower and lm_head in
         bf16) 0.5 byte per weight + bf16 scale and zero per (128-input group, output column), as Int4Linear holds them
KV per token: 2 (k, v) x layers x kv_heads x head_dim x bytes, + int8's float32 scale per (block of 16, head).
A 224x224 scoring request: 7 x 7 = 49 image tokens + PROMPT_TEXT_TOKENS of chat template and question, prefill only,
in 16-token blocks. Budget: 80 GB minus the vision cascade (VISION_RESERVE_GIB, not measured here: no GPU) minus
the VLM's weights and activation headroom (VLM_HEADROOM_GIB); what is left is KV cache.

Measured (CPU): seconds per scoring call of 4 images for a small VLM in each weight format (loaded from checkpoints
written by fixtures/quantized_checkpoints.py; on CPU every format is dequantized at load, so speed should match
float), and the int8 KV cache's drift against the float cache on the bundled VLM (bundles/default/vlm)."""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.common import machine, print_table, time_interleaved, write_json
from runtime.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from runtime.options import KV_CACHE_DTYPES
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from runtime.vlm.sequence import SamplingParams

GIB = 2 ** 30
GPU_BYTES = 80 * 10 ** 9  # "80 GB" H100
VISION_RESERVE_GIB = 6.0  # classifier + detector weights, CUDA-graph pools and activations: an assumption, see docs
VLM_HEADROOM_GIB = 3.0  # VLM activations (vision tower on a batch, prefill of max_num_batched_tokens), workspace
PROMPT_TEXT_TOKENS = 24  # <|im_start|>user\n <|vision_start|> ... <|vision_end|> question <|im_end|>\n<|im_start|>assistant\n
BLOCK = 16
IMAGE_TOKENS = (224 // 16 // 2) ** 2  # patch 16, 2x2 merge


def _text(hidden, inter, layers, heads, tied):
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                     mrope_interleaved=True), tie_word_embeddings=tied)


def _vision(depth, hidden, inter, out, deepstack):
    return dict(depth=depth, hidden_size=hidden, intermediate_size=inter, num_heads=16, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=out, num_position_embeddings=2304,
                deepstack_visual_indexes=deepstack, hidden_act="gelu_pytorch_tanh")


# Qwen/Qwen3-VL-*-Instruct config.json (text_config, vision_config, tie_word_embeddings).
QWEN3_VL = {
    "2B": (_text(2048, 6144, 28, 16, True), _vision(24, 1024, 4096, 2048, [5, 11, 17]), True),
    "4B": (_text(2560, 9728, 36, 32, True), _vision(24, 1024, 4096, 2560, [5, 11, 17]), True),
    "8B": (_text(4096, 12288, 36, 32, False), _vision(27, 1152, 4304, 4096, [8, 16, 24]), False),
}


def model_config(name: str) -> Qwen3VLConfig:
    text, vision, tied = QWEN3_VL[name]
    return Qwen3VLConfig.from_dict({"model_type": "qwen3_vl", "text_config": text, "vision_config": vision,
                                    "tie_word_embeddings": tied})


def weight_bytes(cfg: Qwen3VLConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = sum(p.numel() for p in model.parameters())
    out = {"bf16": 2 * total}
    fp8 = 2 * total
    int4 = 2 * total
    for n, m in linear.items():
        o, i = m.out_features, m.in_features
        if n != "lm_head":
            fp8 += o * i * (1 - 2) + o * math.ceil(i / 128) * 4
        if n.startswith("language_model."):
            int4 += o * i * (0.5 - 2) + 2 * 2 * o * math.ceil(i / 128)
    out["fp8"], out["int4"] = fp8, int(int4)
    return out


def kv_bytes_per_token(cfg: Qwen3VLConfig) -> dict[str, float]:
    t = cfg.text
    values = 2 * t.num_layers * t.num_kv_heads * t.head_dim
    return {"bf16": 2.0 * values, "int8": values + 2 * t.num_layers * t.num_kv_heads * 4 / BLOCK}


def memory_rows() -> list[dict]:
    tokens = IMAGE_TOKENS + PROMPT_TEXT_TOKENS
    blocks = -(-tokens // BLOCK)
    rows = []
    for name in QWEN3_VL:
        cfg = model_config(name)
        weights, kv = weight_bytes(cfg), kv_bytes_per_token(cfg)
        for wfmt, wbytes in weights.items():
            for kvfmt, per_token in kv.items():
                free = GPU_BYTES - (VISION_RESERVE_GIB + VLM_HEADROOM_GIB) * GIB - wbytes
                per_request = blocks * BLOCK * per_token
                rows.append({"model": name, "weights": wfmt, "weights_GiB": wbytes / GIB, "kv": kvfmt,
                             "kv_KiB_per_token": per_token / 1024, "kv_MiB_per_request": per_request / 2**20,
                             "concurrent_224px_requests": int(free // per_request)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Measured on the CPU
# ----------------------------------------------------------------------------------------------------------------

QUESTION = "Is there roadwork in this image? Answer Yes or No."
SMALL = dict(  # bench.vlm's "small" preset, with a 64-multiple vision width so every format's groups divide it
    text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                     rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=8, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                       out_hidden_size=512, num_position_embeddings=2304, deepstack_visual_indexes=[1, 3, 5]),
    tie_word_embeddings=True)


def images_224(n: int, seed: int = 0) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def speed_rows(rounds: int) -> list[dict]:
    from fixtures.quantized_checkpoints import write_quantized
    from fixtures.vlm_checkpoints import make_qwen3_vl
    config = VLMEngineConfig(kv_cache_bytes=1 << 26, max_model_len=512, block_size=16)
    images = images_224(4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_qwen3_vl(root / "float", SMALL, seed=0, min_pixels=224 * 224, max_pixels=224 * 224)
        for method in ("fp8", "awq", "pack-quantized"):
            write_quantized(root / "float", root / method, method, group=128)
        engines = {m: VLMEngine.load(root / m, config=config) for m in ("float", "fp8", "awq", "pack-quantized")}
        sizes = {m: sum(f.stat().st_size for f in (root / m).glob("*.safetensors")) for m in engines}
        # a new image each call: no prefix-cache or vision-cache hits
        counter = iter(range(10 ** 6))
        calls = {m: (lambda e=e: e.score(images_224(4, seed=next(counter) + 1), QUESTION)) for m, e in engines.items()}
        times = time_interleaved(calls, rounds=rounds)
        p = {m: [s.p_yes for s in e.score(images, QUESTION)] for m, e in engines.items()}
    return [{"format": m, "checkpoint_MiB": sizes[m] / 2**20, "s_per_4_images": times[m],
             "vs_float": times[m] / times["float"],
             "max_abs_dP_vs_float": max(abs(a - b) for a, b in zip(p[m], p["float"]))} for m in engines]


def drift_rows(bundle_vlm: Path, samples: Path, explain_tokens: int) -> list[dict]:
    """int8 vs float KV cache on the bundled VLM over the sample images."""
    images = [np.array(Image.open(f).convert("RGB")) for f in sorted(samples.glob("*.jpg"))]
    runs = {}
    for kv in KV_CACHE_DTYPES:
        engine = VLMEngine.load(bundle_vlm, config=VLMEngineConfig(kv_cache_bytes=1 << 26, kv_cache_dtype=kv))
        scores = [s.p_yes for s in engine.score(images, QUESTION)]
        texts = engine.generate(["Describe the roadwork you see, briefly."] * len(images), [[im] for im in images],
                                SamplingParams(max_new_tokens=explain_tokens, ignore_eos=True))
        runs[kv] = scores, [t.token_ids for t in texts]
    (pf, tf), (pq, tq) = runs["auto"], runs["int8"]
    same = sum(a == b for x, y in zip(tf, tq) for a, b in zip(x, y))
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tf, tq)]
    return [{"images": len(images), "yes_no_agreement": sum((a > 0.5) == (b > 0.5) for a, b in zip(pf, pq)) / len(pf),
             "max_abs_dP": max(abs(a - b) for a, b in zip(pf, pq)),
             "mean_abs_dP": sum(abs(a - b) for a, b in zip(pf, pq)) / len(pf),
             "explanation_token_agreement": same / sum(len(x) for x in tf),
             "min_tokens_before_first_difference": min(first_diff)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--explain-tokens", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    info = machine()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(info)
    memory = memory_rows()
    print(f"\nper 224x224 scoring request: {IMAGE_TOKENS} image + {PROMPT_TEXT_TOKENS} text tokens in {BLOCK}-token "
          f"blocks; 80 GB - vision cascade {VISION_RESERVE_GIB} GiB - VLM headroom {VLM_HEADROOM_GIB} GiB - weights")
    print_table(memory, ["model", "weights", "weights_GiB", "kv", "kv_KiB_per_token", "kv_MiB_per_request",
                         "concurrent_224px_requests"])
    root = Path(__file__).resolve().parent.parent
    drift = drift_rows(root / "bundles/default/vlm", root / "samples", args.explain_tokens)
    print("\nint8 KV cache vs float KV cache, bundled VLM (fp32), samples/*.jpg")
    print_table(drift, list(drift[0]))
    speed = []
    if not args.skip_speed:
        speed = speed_rows(args.rounds)
        print("\nCPU: score() of 4 distinct 224x224 images, small VLM, fp32 (interleaved medians)")
        print_table(speed, list(speed[0]))
    write_json(args.json, {"memory": memory, "drift": drift, "speed": speed})


if __name__ == "__main__":
    main()
