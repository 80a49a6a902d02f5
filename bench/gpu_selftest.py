"""One-shot check of the GPU paths on a fresh machine: `PYTHONPATH=. python -m bench.gpu_selftest --out DIR`.

Runs from the source tree without installing the project (orjson, flashinfer and flash-attn are optional), in
order of risk, each step isolated (a failure is recorded and the next step runs):

  environment  versions, the GPU, which optional packages import
  kernels      every Triton kernel (resize both orderings, route, vote, KV store, paged decode, patchify) against
               its torch reference at many shapes
  graphs       graph capture/replay against eager for every bucket; replaying two different batches changes outputs
  flashinfer   the startup probe and flashinfer's decode against the reference (when it imports)
  int8         Int8Linear at m = 16 and 17 (cuBLASLt's int8 path starts at 17) in bf16 and fp16: finite, near float
  cascade      the bundled cascade on the samples against samples.json's recorded answers, predict and
               explain_stream running concurrently
  vision       classifier img/s per batch bucket (DINOv3 ViT-S/16 and ViT-B/16 shapes, random weights, bf16)
  vlm          VLM prefill and decode tok/s (Qwen3-VL-2B head shapes, fewer layers, random weights)

Writes DIR/report.json (every step: status, seconds, details, error) and DIR/summary.txt. Exit status 1 if a step
failed. --cpu runs every step's logic on the CPU with small shapes (Triton under its interpreter; CUDA-only parts
reported as skipped): what CI runs. Steps past --budget-s seconds are skipped, so the run ends in time."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "default"
SAMPLES = ROOT / "samples"
log = logging.getLogger("gpu_selftest")


class Skip(Exception):
    """A step that cannot run here (no CUDA, no flashinfer, ...): reported as skipped with this reason."""


@dataclass
class Context:
    device: torch.device
    cpu_mode: bool
    tmp: Path

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.cpu_mode else torch.bfloat16

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class StepResult:
    name: str
    status: str  # "pass", "fail", "skip"
    seconds: float
    details: dict = field(default_factory=dict)
    error: str | None = None


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().float().cpu() - want.detach().float().cpu()).abs().max().item() if want.numel() else 0.0


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def step_environment(ctx: Context, details: dict) -> None:
    details.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                   triton_interpret=os.environ.get("TRITON_INTERPRET", ""), device=str(ctx.device))
    for name in ("triton", "transformers", "orjson", "flashinfer", "flash_attn", "aiohttp", "uvloop"):
        try:
            details[name] = getattr(importlib.import_module(name), "__version__", "imports")
        except Exception as e:  # an optional package may fail in other ways than ImportError on a new stack
            details[name] = f"unavailable: {type(e).__name__}: {e}"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        details.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())


def step_kernels(ctx: Context, details: dict) -> None:
    from kernels.kv_store import kv_store_reference
    from kernels.kv_store_triton import kv_store_triton
    from kernels.paged_attention import paged_decode_reference
    from kernels.paged_attention_triton import paged_decode_triton
    from kernels.preprocess import preprocess_reference
    from kernels.preprocess_triton import preprocess_triton
    from runtime.models.preprocessor import preprocess_spec, vision_preprocess_spec
    from kernels.route import route_reference
    from kernels.route_triton import route_triton
    from kernels.vlm_preprocess import patchify_reference
    from kernels.vlm_preprocess_triton import patchify_triton
    from kernels.vote import vote_reference
    from kernels.vote_triton import vote_triton

    dev, rng, g = ctx.device, np.random.default_rng(0), torch.Generator().manual_seed(0)
    size = 32 if ctx.cpu_mode else 224
    shapes = [(50, 37), (7, 5)] if ctx.cpu_mode else [(224, 224), (480, 640), (4000, 3000), (17, 1024), (1, 1),
                                                      (3000, 200)]
    worst: dict[str, float] = {}
    for kind, tol in (("ViTImageProcessor", 1e-5), ("DINOv3ViTImageProcessorFast", 1e-4)):
        for resample in (2, 3):
            spec = preprocess_spec({"image_processor_type": kind, "resample": resample,
                                                            "size": {"height": size, "width": size}})
            for h, w in shapes:
                image = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                want, got = torch.empty(3, size, size), torch.empty(3, size, size, device=dev)
                preprocess_reference(image, spec, want)
                preprocess_triton(image.to(dev), spec, got)
                err = max_error(got, want)
                key = f"preprocess {kind[:6]} resample={resample}"
                worst[key] = max(worst.get(key, 0.0), err)
                check(err <= tol, f"{key} {h}x{w}: max error {err:.3g} > {tol}")
    for batch in ([1, 3, 8] if ctx.cpu_mode else [1, 3, 8, 32, 100, 256]):
        prob = torch.rand(batch, generator=g)
        outs = []
        for fn, d in ((route_reference, torch.device("cpu")), (route_triton, dev)):
            bufs = (torch.zeros(batch, dtype=torch.int8, device=d), torch.zeros(batch, dtype=torch.int32, device=d),
                    torch.zeros(1, dtype=torch.int32, device=d))
            fn(prob.to(d), torch.tensor([batch], dtype=torch.int32, device=d), 0.3, 0.7, *bufs)
            outs.append([b.cpu() for b in bufs])
        check(all(torch.equal(a, b) for a, b in zip(*outs)), f"route batch {batch} differs from the reference")
    for rows, lengths in ((3, [5, 1]), (9, [300, 7, 64])):
        scores = torch.randn(rows, sum(lengths), generator=g) * 3 - 2
        offsets = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
        k = len(lengths)
        args = (torch.rand(k, generator=g), torch.rand(k, generator=g) + 0.5, torch.rand(rows, generator=g))
        outs = []
        for fn, d in ((vote_reference, torch.device("cpu")), (vote_triton, dev)):
            bufs = (torch.zeros(rows, k, device=d), torch.zeros(rows, device=d), torch.zeros(rows, device=d))
            fn(scores.to(d), offsets.to(d), *(a.to(d) for a in args), 0.5, 2 / 3, *bufs)
            outs.append(bufs)
        err = max(max_error(a, b) for a, b in zip(*outs))
        worst["vote"] = max(worst.get("vote", 0.0), err)
        check(err <= 1e-5, f"vote rows={rows}: max error {err:.3g}")
    cases = [(2, 1, 16, 4), (4, 2, 16, 8)] if ctx.cpu_mode else [
        (h, kv, d, 16) for d in (64, 128) for h, kv in ((8, 8), (8, 4), (8, 2), (16, 2), (12, 2))]
    for heads, kv_heads, head_dim, block in cases:
        lens = [1, block, block + 1, 5 * block + 3, 0]
        blocks = sum(-(-n // block) for n in lens) + 2
        k_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=g)
        v_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=g)
        perm = torch.randperm(blocks, generator=g).tolist()
        tables = torch.full((len(lens), max(-(-n // block) for n in lens)), -1, dtype=torch.int32)
        for s, n in enumerate(lens):
            tables[s, :-(-n // block)] = torch.tensor([perm.pop() for _ in range(-(-n // block))], dtype=torch.int32)
        q = torch.randn(len(lens), heads, head_dim, generator=g)
        context = torch.tensor(lens, dtype=torch.int32)
        want = paged_decode_reference(q, k_cache, v_cache, tables, context, head_dim ** -0.5)
        got = paged_decode_triton(*(t.to(dev) for t in (q, k_cache, v_cache, tables, context)), head_dim ** -0.5)
        err = max_error(got, want)
        key = f"paged decode {heads}/{kv_heads}x{head_dim}"
        worst[key] = err
        check(err <= 1e-4, f"{key}: max error {err:.3g}")
        tokens = torch.randn(7, kv_heads, head_dim, generator=g)
        slots = torch.tensor([0, 5, -1, 9, 3, -1, 11])
        caches = [torch.zeros_like(k_cache) for _ in range(2)]
        kv_store_reference(tokens, tokens, caches[0], caches[1], slots)
        there = [torch.zeros_like(k_cache, device=dev) for _ in range(2)]
        kv_store_triton(tokens.to(dev), tokens.to(dev), *there, slots.to(dev, torch.int32))
        check(torch.equal(there[0].cpu(), caches[0]), f"kv store {kv_heads}x{head_dim} differs from the reference")
    vision = vision_preprocess_spec({"image_processor_type": "Qwen2VLImageProcessor",
                                                            "patch_size": 16, "merge_size": 2})
    pixels = torch.randn(3, 64, 96, generator=g)
    out = torch.empty(24, vision.row_size, device=dev)
    patchify_triton(pixels.to(dev), vision, out)
    check(torch.equal(out.cpu(), patchify_reference(pixels, vision)), "patchify differs from the reference")
    details["max_error"] = {k: float(f"{v:.3g}") for k, v in worst.items()}


def step_graphs(ctx: Context, details: dict) -> None:
    from bench.common import make_checkpoint
    from graphs.runner import GraphRunner, default_buckets
    from runtime.models.classifier import load_classifier

    make_checkpoint("tiny", ctx.tmp / "graphs")
    model = load_classifier(ctx.tmp / "graphs", torch.float32, ctx.device)
    runner = GraphRunner(model, (3, 32, 32), torch.float32, ctx.device, default_buckets(4 if ctx.cpu_mode else 64))
    runner.warmup()
    details.update(buckets=list(runner.buckets), captured=sorted(runner.graphs))
    check(ctx.device.type != "cuda" or set(runner.graphs) == set(runner.buckets), "not every bucket was captured")
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in runner.buckets:
        previous = None
        for _ in range(2):  # two different batches: a replay that recomputes nothing would repeat the first
            x = torch.randn(b, 3, 32, 32, generator=g).to(ctx.device)
            runner.input[:b].copy_(x)
            got = runner.run(b)[1].clone()
            with torch.inference_mode():
                want = model(x)[1]
            worst = max(worst, max_error(got, want))
            check(previous is None or not torch.equal(got, previous), f"bucket {b}: two batches gave equal outputs")
            previous = got
    details["max_error"] = worst
    check(worst <= 1e-3, f"replay differs from eager by {worst:.3g}")


def step_flashinfer(ctx: Context, details: dict) -> None:
    if ctx.device.type != "cuda":
        raise Skip("needs CUDA")
    from runtime.vlm import attention

    if attention.flashinfer_module() is None:
        raise Skip("flashinfer does not import (install its wheel to check it)")
    workspace = torch.zeros(attention.FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=ctx.device)
    for heads, kv_heads in ((16, 8), (16, 2), (12, 2)):  # Qwen3-VL-2B's ratio, GQA 8, and one flashinfer lacks
        spec = attention.DecodeAttentionSpec(heads, kv_heads, 128, 16, torch.bfloat16, 128 ** -0.5)
        why = attention.flashinfer_unusable(spec, workspace)
        details[f"probe {heads}/{kv_heads}"] = why or "usable"
    check(details["probe 16/8"] == "usable", f"flashinfer is unusable: {details['probe 16/8']}")


def step_int8(ctx: Context, details: dict) -> None:
    from runtime.models.quant import Int8Linear

    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(3072, 768)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(768, 3072, generator=g) * 0.05)
    for dtype in (torch.bfloat16, torch.float16):
        layer = Int8Linear(linear.to(dtype)).to(ctx.device)
        for m in (16, 17):
            x = (torch.randn(m, 3072, generator=g) * 4).to(ctx.device, dtype)
            got = layer(x).float()
            want = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32),
                                              layer.bias.float())
            name = f"{str(dtype).removeprefix('torch.')} m={m}"
            check(bool(torch.isfinite(got).all()), f"{name}: non-finite outputs ({int((~torch.isfinite(got)).sum())})")
            rel = (max_error(got, want) / want.abs().max().item())
            details[name] = float(f"{rel:.3g}")
            check(rel <= 0.05, f"{name}: relative error {rel:.3g}")


def step_cascade(ctx: Context, details: dict) -> None:
    from runtime.cascade.engine import Engine
    from runtime.image_decode import decode_image

    expected = json.loads((SAMPLES / "samples.json").read_text())
    images = [decode_image((SAMPLES / s["file"]).read_bytes()) for s in expected]
    dtype = "float32" if ctx.cpu_mode else "bfloat16"
    engine = Engine.load(BUNDLE, ctx.device, dtype, max_batch=8)
    try:
        engine.warmup()
        details["cuda_graphs"] = engine.describe()["cuda_graphs"]
        stream: list = []
        done = threading.Event()

        def on_output(out) -> None:
            stream.append(out.text)
            if out.finished:
                stream.append(out.finish_reason)
                done.set()

        # Decodes on the VLM loop while predict runs below; the sample's recorded label is the cascade's answer.
        engine.explain_stream(images[0], bool(expected[0]["label"]), on_output)
        results = engine.predict(images)
        check(done.wait(120), "explain_stream did not finish within 120 s")
        details["explanation"] = "".join(t for t in stream[:-1])[:200]
        check(stream[-1] in ("stop", "length"), f"explain_stream ended with {stream[-1]!r}")
        worst = 0.0
        for s, r in zip(expected, results):
            want_p, want_stage = s["p"][dtype], s["stage"][dtype]
            worst = max(worst, abs(r.prediction - want_p))
            details[s["file"]] = {"p": round(r.prediction, 4), "stage": r.stage, "recorded": [want_p, want_stage]}
            check(r.stage == want_stage, f"{s['file']}: decided by {r.stage}, recorded {want_stage}")
        details["max_p_error"] = round(worst, 4)
        check(worst <= 0.02, f"P differs from samples.json by {worst:.3g}")
    finally:
        engine.close()


def step_vision(ctx: Context, details: dict) -> None:
    from bench.common import make_checkpoint
    from graphs.runner import GraphRunner, default_buckets
    from runtime.models.classifier import load_classifier

    presets = ["tiny"] if ctx.cpu_mode else ["dinov3-vits16", "dinov3-vitb16"]
    for preset in presets:
        make_checkpoint(preset, ctx.tmp / preset)
        model = load_classifier(ctx.tmp / preset, ctx.dtype, ctx.device)
        size = 32 if preset == "tiny" else 224
        runner = GraphRunner(model, (3, size, size), ctx.dtype, ctx.device, default_buckets(2 if ctx.cpu_mode else 256))
        runner.warmup()
        rates = {}
        for b in runner.buckets:
            runner.input[:b].normal_()
            ctx.sync()
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < (0.05 if ctx.cpu_mode else 0.5):
                runner.run(b)
                runs += 1
            ctx.sync()
            rates[b] = round(b * runs / (time.perf_counter() - start), 1)
        details[preset] = {"img_s_by_bucket": rates, "dtype": str(ctx.dtype).removeprefix("torch.")}
        del runner, model


def step_vlm(ctx: Context, details: dict) -> None:
    from fixtures.images import random_image
    from fixtures.vlm_checkpoints import QWEN3_VL_2B_SHAPED, TINY, make_qwen3_vl
    from runtime.vlm.engine import VLMEngine, VLMEngineConfig
    from runtime.vlm.sequence import SamplingParams

    path = ctx.tmp / "vlm"
    make_qwen3_vl(path, TINY if ctx.cpu_mode else QWEN3_VL_2B_SHAPED, seed=0)
    concurrency, new_tokens = (2, 4) if ctx.cpu_mode else (32, 64)
    config = VLMEngineConfig(kv_cache_bytes=1 << (24 if ctx.cpu_mode else 31), max_model_len=1024,
                             max_num_seqs=concurrency)
    engine = VLMEngine.load(path, ctx.device, ctx.dtype, config)
    details["decode_attention"] = engine.runner.attention_backend
    details["decode_attention_note"] = engine.runner.attention_note
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate(["warm up"], sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    ids = [engine.add_request("Describe the roadwork.", [random_image(224, 224, seed=i)], sampling=sampling)
           for i in range(concurrency)]
    prompt_tokens = sum(engine.requests[i].num_prompt_tokens for i in ids)
    ctx.sync()
    t0 = time.perf_counter()
    while any(engine.requests[i].num_generated_tokens == 0 for i in ids):
        engine.step()
    ctx.sync()
    t1 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    ctx.sync()
    t2 = time.perf_counter()
    details.update(concurrency=concurrency, prompt_tokens=prompt_tokens,
                   prefill_tok_s=round(prompt_tokens / (t1 - t0), 1),
                   decode_tok_s=round(concurrency * (new_tokens - 1) / (t2 - t1), 1))


STEPS: list[tuple[str, Callable[[Context, dict], None]]] = [
    ("environment", step_environment), ("kernels", step_kernels), ("graphs", step_graphs),
    ("flashinfer", step_flashinfer), ("int8", step_int8), ("cascade", step_cascade), ("vision", step_vision),
    ("vlm", step_vlm),
]


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run_step(name: str, fn: Callable[[Context, dict], None], ctx: Context) -> StepResult:
    details: dict = {}
    start = time.perf_counter()
    try:
        fn(ctx, details)
        status, error = "pass", None
    except Skip as e:
        status, error = "skip", str(e)
    except Exception as e:  # every failure is the step's result; the next step still runs
        status, error = "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    finally:
        if ctx.device.type == "cuda":
            try:
                torch.cuda.synchronize(ctx.device)
                torch.cuda.empty_cache()
            except Exception as e:  # a sticky CUDA error: later steps will report it too
                details["cuda_after_step"] = repr(e)
    return StepResult(name, status, round(time.perf_counter() - start, 2), details, error)


def summary(results: list[StepResult], mode: str) -> str:
    lines = [f"gpu_selftest ({mode}): " + ", ".join(f"{sum(r.status == s for r in results)} {s}"
                                                    for s in ("pass", "fail", "skip"))]
    for r in results:
        line = f"{r.status.upper():4} {r.name:12} {r.seconds:7.1f} s"
        if r.error:
            line += "  " + r.error.splitlines()[0]
        elif r.name in ("vision", "vlm", "flashinfer", "int8"):
            line += "  " + json.dumps(r.details)[:300]
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json and summary.txt")
    parser.add_argument("--cpu", action="store_true", help="every step's logic on the CPU, small shapes (CI)")
    parser.add_argument("--device", default="cuda:0", help="the GPU to check (default cuda:0)")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip steps that would start after this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported (steps import them)
    device = torch.device("cpu" if args.cpu else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "cpu" if args.cpu else str(device)
    results: list[StepResult] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(device, args.cpu, Path(tmp))
        for name, fn in STEPS:
            if args.only and name not in args.only:
                continue
            if device.type == "cuda" and not torch.cuda.is_available() and name != "environment":
                results.append(StepResult(name, "skip", 0.0, error="CUDA is not available (use --cpu)"))
            elif time.perf_counter() - start > args.budget_s:
                results.append(StepResult(name, "skip", 0.0, error=f"over the {args.budget_s:.0f} s budget"))
            else:
                log.info("step %s", name)
                results.append(run_step(name, fn, ctx))
            (args.out / "report.json").write_text(json.dumps(  # after every step: a crash keeps what ran
                {"mode": mode, "seconds": round(time.perf_counter() - start, 1),
                 "steps": [r.__dict__ for r in results]}, indent=2))
    text = summary(results, mode)
    (args.out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
