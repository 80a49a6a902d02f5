"""Self-test steps for the models, graphs and the cascade: environment, CUDA graphs and their lifetime, decode graphs
and flashinfer against the eager and Triton paths, the bundled cascade on one and two devices, throughput."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tools.selftest_checkpoints import QWEN3_VL_2B_SHAPED, write_classifier, write_vlm
from tools.selftest_context import BUNDLE, SAMPLES, Context, Skip, check, max_error, relative_error

OPTIONAL_PACKAGES = ("triton", "flashinfer", "flash_attn", "orjson", "aiohttp", "uvloop", "safetensors", "tokenizers")
DECODE_PROMPTS = 8
DECODE_TOKENS = 16


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def step_environment(ctx: Context, details: dict) -> None:
    details.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                   triton_interpret=os.environ.get("TRITON_INTERPRET", ""), device=str(ctx.device))
    for name in OPTIONAL_PACKAGES:
        try:
            details[name] = getattr(importlib.import_module(name), "__version__", "imports")
        except Exception as e:  # an optional package may fail in other ways than ImportError on a new stack
            details[name] = f"unavailable: {type(e).__name__}: {e}"
    if ctx.on_cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        details.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())


def tiny_classifier(ctx: Context, dtype: torch.dtype):
    from runtime.models.classifier import load_classifier

    path = ctx.tmp / "tiny-classifier"  # shared by the steps of one run
    if not path.exists():  # renamed into place whole: a step killed while writing leaves no half checkpoint
        write_classifier(ctx.tmp / f"tiny-classifier.{os.getpid()}", "tiny").rename(path)
    return load_classifier(path, dtype, ctx.device)


def replay_error(runner, model, bucket: int, g: torch.Generator) -> tuple[float, torch.Tensor]:
    """Max error of one replay of `bucket` on a fresh random batch against eager, and the replayed logits."""
    x = torch.randn(bucket, *runner.input.shape[1:], generator=g).to(runner.device, runner.input.dtype)
    runner.input[:bucket].copy_(x)
    got = runner.run(bucket)[1].clone()
    with torch.inference_mode():
        want = model(x)[1]
    return max_error(got, want), got


def step_graphs(ctx: Context, details: dict) -> None:
    """Capture/replay against eager for every bucket; two different batches must give different outputs."""
    from graphs.runner import GraphRunner, default_buckets

    model = tiny_classifier(ctx, torch.float32)
    runner = GraphRunner(model, (3, 32, 32), torch.float32, ctx.device, default_buckets(4 if ctx.cpu_mode else 64))
    runner.warmup()
    details.update(buckets=list(runner.buckets), captured=sorted(runner.graphs))
    check(not ctx.on_cuda or set(runner.graphs) == set(runner.buckets), "not every bucket was captured")
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in runner.buckets:
        previous = None
        for _ in range(2):  # a replay that recomputes nothing would repeat the first batch's outputs
            err, got = replay_error(runner, model, b, g)
            worst = max(worst, err)
            check(previous is None or not torch.equal(got, previous), f"bucket {b}: two batches gave equal outputs")
            previous = got
    details["max_error"] = worst
    check(worst <= 1e-3, f"replay differs from eager by {worst:.3g}")
    runner.close()


def step_graph_lifetime(ctx: Context, details: dict) -> None:
    """Two graph sets captured on one thread; closing one and emptying the allocator's cache must leave the other
    replaying equal to eager (a shared capture stream would have freed the cuBLAS workspace it reads)."""
    ctx.require_cuda("needs CUDA graphs (CUDA only)")
    from graphs.runner import GraphRunner

    model = tiny_classifier(ctx, ctx.dtype)
    first, second = (GraphRunner(model, (3, 32, 32), ctx.dtype, ctx.device, (1, 2, 4)) for _ in range(2))
    first.warmup()
    second.warmup()
    first.close()
    del first
    torch.cuda.empty_cache()
    # Whatever was freed gets reused and overwritten before the surviving set replays.
    scribble = torch.full((64 << 20,), float("nan"), device=ctx.device)
    g = torch.Generator().manual_seed(7)
    worst = max(replay_error(second, model, b, g)[0] for b in second.buckets for _ in range(2))
    del scribble
    details["max_error"] = worst
    check(worst <= 2e-2, f"the surviving graph set differs from eager by {worst:.3g} after the other was closed")
    second.close()


def vlm_engine(path: Path, ctx: Context, decode_graphs: bool, num_seqs: int = DECODE_PROMPTS):
    from runtime.vlm.engine import VLMEngine, VLMEngineConfig

    config = VLMEngineConfig(kv_cache_bytes=1 << (25 if ctx.cpu_mode else 30), max_model_len=1024,
                             max_num_seqs=num_seqs, decode_graphs=decode_graphs)
    return VLMEngine.load(path, ctx.device, ctx.dtype, config)


def decode_requests() -> tuple[list[str], list[list[np.ndarray]]]:
    """DECODE_PROMPTS prompts, every other one with an image of its own."""
    prompts = [f"Describe street scene {i}: cones, workers, barriers?" for i in range(DECODE_PROMPTS)]
    images = [[random_image(224, 224, seed=i)] if i % 2 else [] for i in range(DECODE_PROMPTS)]
    return prompts, images


def first_difference(a: list[int], b: list[int]) -> str | None:
    """Where two token lists part, or None if they are equal."""
    if a == b:
        return None
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"position {i}: {a[i] if i < len(a) else 'end'} against {b[i] if i < len(b) else 'end'}"


def step_decode_graphs(ctx: Context, details: dict) -> None:
    """Greedy tokens through the bucketed decode path (CUDA graphs on CUDA; on the CPU the same padded buckets run
    eagerly, as CUDA graphs need CUDA) against the unpadded eager path: token-identical over DECODE_PROMPTS prompts,
    while a vision graph set replays on another thread. The bundled VLM (head_dim 32: Triton decode on CUDA) and,
    on CUDA, Qwen3-VL-2B's head shapes with random weights (flashinfer's graph wrappers where it is usable)."""
    from graphs.runner import GraphRunner
    from runtime.vlm.sequence import SamplingParams

    models = {"bundled": BUNDLE / "vlm"}
    if ctx.on_cuda:
        models["2b-shaped"] = write_vlm(ctx.tmp / "vlm-2b-shaped", QWEN3_VL_2B_SHAPED)
    prompts, images = decode_requests()
    sampling = SamplingParams(max_new_tokens=DECODE_TOKENS, ignore_eos=True)
    vision = GraphRunner(tiny_classifier(ctx, ctx.dtype), (3, 32, 32), ctx.dtype, ctx.device, (1, 4))
    vision.warmup()
    for name, path in models.items():
        eager = vlm_engine(path, ctx, decode_graphs=False)
        want = [r.token_ids for r in eager.generate(prompts, images, sampling)]
        del eager
        graphed = vlm_engine(path, ctx, decode_graphs=True)
        graphs = graphed.runner.decode_graphs
        stop, replays = threading.Event(), []

        def replay_vision() -> None:
            stream = torch.cuda.Stream(ctx.device) if ctx.on_cuda else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while not stop.is_set():
                    vision.run(4)
                    replays.append(1)
                    if stream is None:
                        time.sleep(0.001)  # the CPU's cores are the decode's too

        thread = threading.Thread(target=replay_vision, name="selftest-vision", daemon=True)
        thread.start()
        try:
            got = [r.token_ids for r in graphed.generate(prompts, images, sampling)]
        finally:
            stop.set()
            thread.join()
        details[name] = {"attention": graphed.runner.attention_backend, "cuda_graphs": graphs.graphs.use_cuda_graphs,
                         "decode_steps_by_bucket": dict(graphs.steps), "vision_replays": len(replays),
                         "tokens_compared": sum(map(len, want)), "distinct_tokens": len({t for r in want for t in r})}
        check(sum(graphs.steps.values()) > 0, f"{name}: no decode step went through the decode graphs")
        for i, (a, b) in enumerate(zip(got, want)):
            where = first_difference(a, b)
            check(where is None, f"{name}, prompt {i}: decode graphs and eager differ at {where}")
        graphs.close()
    vision.close()


def step_flashinfer(ctx: Context, details: dict) -> None:
    """The startup probe, then flashinfer's decode against the Triton kernel on the same bf16 pages."""
    ctx.require_cuda()
    from kernels.paged_attention_triton import paged_decode_triton
    from runtime.vlm import attention
    from tools.selftest_kernels import BF16_TOLERANCE, decode_lengths, paged_layout

    if attention.flashinfer_module() is None:
        raise Skip("flashinfer does not import (install its wheel to check it)")
    workspace = torch.zeros(attention.FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=ctx.device)
    g = torch.Generator().manual_seed(8)
    for heads, kv_heads in ((16, 8), (16, 2), (16, 4), (12, 2)):  # Qwen3-VL-2B's GQA 2, 8, 4 and 6
        spec = attention.DecodeAttentionSpec(heads, kv_heads, 128, 16, torch.bfloat16, 128 ** -0.5)
        why = attention.flashinfer_unusable(spec, workspace)
        key = f"{heads}/{kv_heads}"
        details[f"probe {key}"] = why or "usable"
        if why is not None:
            continue
        lens = decode_lengths(ctx, spec.block_size)
        tables, _, blocks = paged_layout(lens, spec.block_size, 2, g)
        shape = (blocks, spec.block_size, kv_heads, spec.head_dim)
        k, v = (torch.randn(shape, generator=g).to(ctx.device, torch.bfloat16) for _ in range(2))
        q = torch.randn(len(lens), heads, spec.head_dim, generator=g).to(ctx.device, torch.bfloat16)
        context = torch.tensor(lens, dtype=torch.int32)
        decode = attention.FlashInferDecodeAttention(spec, workspace)
        decode.plan(tables, context)
        got = decode(q, k, v, tables.to(ctx.device), context.to(ctx.device), spec.scale)
        want = paged_decode_triton(q, k, v, tables.to(ctx.device), context.to(ctx.device), spec.scale)
        real = (context > 0).to(ctx.device)  # flashinfer's padding rows read one token of page 0; ours give zeros
        err = relative_error(got[real], want[real])
        details[f"vs triton {key}"] = float(f"{err:.3g}")
        check(err <= BF16_TOLERANCE, f"flashinfer {key} differs from the Triton kernel by {err:.3g} (relative)")
    check(details["probe 16/8"] == "usable", f"flashinfer is unusable: {details['probe 16/8']}")


@dataclass(frozen=True)
class Thresholds:
    """Each stage's exit thresholds from the bundle's cascade.toml (the VLM has none: it always decides)."""

    by_stage: dict[str, tuple[float, ...]]

    @classmethod
    def read(cls, bundle: Path) -> Thresholds:
        stages = tomllib.loads((bundle / "cascade.toml").read_text())["stage"]
        return cls({s["name"]: tuple(s[k] for k in ("exit_below", "exit_above") if k in s) for s in stages})

    def margin(self, scores: dict[str, float]) -> float:
        """How far the closest of an image's stage scores sits from its stage's thresholds."""
        return min((abs(p - t) for name, p in scores.items() for t in self.by_stage.get(name, ())), default=1.0)


# A score within ROUTING_MARGIN of a threshold may route either way under bf16 drift (up to ~0.02): such images are
# compared by their common stages' scores only, not by the stage that decided.
ROUTING_MARGIN = 0.05
SCORE_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def compare_cascades(got: list, want: list, names: list[str], thresholds: Thresholds, tolerance: float,
                     details: dict) -> None:
    """Per-stage scores of `got` within `tolerance` of `want` where both ran the stage; the deciding stage equal
    where every score of `want` clears the thresholds by ROUTING_MARGIN."""
    routed = 0
    for name, a, b in zip(names, got, want):
        common = sorted(set(a.scores) & set(b.scores))
        err = max(abs(a.scores[s] - b.scores[s]) for s in common)
        clear = thresholds.margin(b.scores) >= ROUTING_MARGIN
        routed += clear
        details[name] = {"p": round(a.prediction, 4), "stage": a.stage, "reference": [round(b.prediction, 4), b.stage],
                         "max_score_error": round(err, 4), "stage_checked": clear}
        check(err <= tolerance, f"{name}: stage scores differ from the reference by {err:.3g} > {tolerance}")
        check(not clear or a.stage == b.stage, f"{name}: decided by {a.stage}, the reference by {b.stage}")
    details["stages_checked"] = routed


def load_samples() -> tuple[list[dict], list[np.ndarray]]:
    from runtime.image_decode import decode_image

    expected = json.loads((SAMPLES / "samples.json").read_text())
    return expected, [decode_image((SAMPLES / s["file"]).read_bytes()) for s in expected]


def cascade_reference(details: dict) -> list:
    """The bundled cascade in float32 on the CPU, checked against samples.json's recorded float32 answers."""
    from runtime.cascade.engine import Engine

    expected, images = load_samples()
    engine = Engine.load(BUNDLE, torch.device("cpu"), "float32", max_batch=8)
    try:
        results = engine.predict(images)
    finally:
        engine.close()
    worst = 0.0
    for s, r in zip(expected, results):
        worst = max(worst, abs(r.prediction - s["p"]["float32"]))
        check(r.stage == s["stage"]["float32"], f"{s['file']}: decided by {r.stage} on the CPU in float32, "
                                                f"recorded {s['stage']['float32']}")
    details["reference_max_p_error"] = round(worst, 4)
    tolerance = SCORE_TOLERANCE[torch.float32]
    check(worst <= tolerance, f"float32 P differs from samples.json by {worst:.3g} > {tolerance}")
    return results


def step_cascade(ctx: Context, details: dict) -> None:
    """The bundled cascade on the device (bf16, graphs captured) against the float32 CPU answers, which are checked
    against samples.json; explain_stream decodes on the VLM loop while predict runs."""
    from runtime.cascade.engine import Engine

    expected, images = load_samples()
    reference = cascade_reference(details)
    engine = Engine.load(BUNDLE, ctx.device, str(ctx.dtype).removeprefix("torch."), max_batch=8)
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

        engine.explain_stream(images[0], bool(expected[0]["label"]), on_output)
        results = engine.predict(images)
        check(done.wait(120), "explain_stream did not finish within 120 s")
        details["explanation"] = "".join(stream[:-1])[:200]
        check(stream[-1] in ("stop", "length"), f"explain_stream ended with {stream[-1]!r}")
    finally:
        engine.close()
    compare_cascades(results, reference, [s["file"] for s in expected], Thresholds.read(BUNDLE),
                     SCORE_TOLERANCE[ctx.dtype], details)


def step_cascade_split(ctx: Context, details: dict) -> None:
    """The bundled cascade with its detectors and VLM on a second GPU against the same cascade on one."""
    ctx.require_cuda("needs two CUDA devices (CUDA only)")
    count = torch.cuda.device_count()
    if count < 2:
        raise Skip(f"needs two CUDA devices, found {count}")
    from runtime.cascade.engine import Engine

    second = f"cuda:{((ctx.device.index or 0) + 1) % count}"  # the next GPU after the checked one
    split = ctx.tmp / "split-bundle"
    shutil.copytree(BUNDLE, split)
    toml = (split / "cascade.toml").read_text()
    for kind in ("detectors", "vlm"):
        toml = toml.replace(f'kind = "{kind}"\n', f'kind = "{kind}"\ndevice = "{second}"\n', 1)
    (split / "cascade.toml").write_text(toml)
    details["later_stages_on"] = second
    expected, images = load_samples()
    dtype = str(ctx.dtype).removeprefix("torch.")
    answers = []
    for bundle in (BUNDLE, split):
        engine = Engine.load(bundle, ctx.device, dtype, max_batch=8)
        try:
            engine.warmup()
            answers.append(engine.predict(images))
        finally:
            engine.close()
    compare_cascades(answers[1], answers[0], [s["file"] for s in expected], Thresholds.read(BUNDLE),
                     SCORE_TOLERANCE[ctx.dtype], details)


def step_vision(ctx: Context, details: dict) -> None:
    """Classifier images/s per batch bucket: DINOv3 ViT-S/16 and ViT-B/16 shapes, random weights."""
    from graphs.runner import GraphRunner, default_buckets
    from runtime.models.classifier import load_classifier

    for preset in ["tiny"] if ctx.cpu_mode else ["dinov3-vits16", "dinov3-vitb16"]:
        model = load_classifier(write_classifier(ctx.tmp / preset, preset), ctx.dtype, ctx.device)
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
        runner.close()
        del runner, model


TENSORRT_BATCHES = (1, 3, 8)
TENSORRT_TOLERANCE = 2e-2  # fp16 engine against the fp32 modules, of the logits' scale and on P(roadwork)


def step_tensorrt(ctx: Context, details: dict) -> None:
    """The tiny classifier exported to ONNX, built as an fp16 TensorRT engine into a fresh cache, against our fp32
    modules at batch 1, 3 and 8; a second load reads the engine from the cache."""
    from runtime.models.classifier import load_classifier
    from runtime.models.preprocessor import read_preprocess
    from runtime.models.tensorrt_classifier import TensorRTClassifier, missing_for_tensorrt

    missing = missing_for_tensorrt(ctx.device)
    if missing:
        raise Skip(f"needs {' and '.join(missing)}")
    for name in ("onnx", "onnxruntime"):  # tools.export writes and checks the graph with them
        if importlib.util.find_spec(name) is None:
            raise Skip(f"{name} does not import (python -m tools.export needs the onnx extra)")
    from tools import export as export_tool

    model_dir = write_classifier(ctx.tmp / f"tensorrt-classifier.{os.getpid()}", "tiny")
    export_tool.export(model_dir, ctx.tmp / "tensorrt-onnx")
    graph, preprocess = ctx.tmp / "tensorrt-onnx" / "classifier.onnx", read_preprocess(model_dir)
    cache_dir = ctx.tmp / "tensorrt-cache"
    reference = load_classifier(model_dir, torch.float32, ctx.device)
    start = time.perf_counter()
    engine = TensorRTClassifier.load(graph, model_dir, preprocess, ctx.device, max(TENSORRT_BATCHES), torch.float16,
                                     cache_dir)
    details.update(tensorrt=importlib.import_module("tensorrt").__version__, precision=engine.precision,
                   build_s=round(time.perf_counter() - start, 2))
    check(not engine.cached, "a fresh cache directory held an engine")
    g = torch.Generator().manual_seed(0)
    for b in TENSORRT_BATCHES:
        x = torch.randn(b, 3, preprocess.height, preprocess.width, generator=g).to(ctx.device)
        with torch.inference_mode():
            want_p, want_logits = reference(x)
        got_p, got_logits = engine(x)
        ctx.sync()
        errors = {"p": max_error(got_p, want_p), "logits": relative_error(got_logits, want_logits)}
        details[f"batch_{b}"] = {k: round(v, 5) for k, v in errors.items()}
        check(max(errors.values()) <= TENSORRT_TOLERANCE, f"batch {b}: the engine is {errors} off the fp32 modules "
                                                          f"(bound {TENSORRT_TOLERANCE})")
    start = time.perf_counter()
    again = TensorRTClassifier.load(graph, model_dir, preprocess, ctx.device, max(TENSORRT_BATCHES), torch.float16,
                                    cache_dir)
    details["cached_load_s"] = round(time.perf_counter() - start, 2)
    check(again.cached, f"the second load built again instead of reading {again.engine_path}")


def step_vlm(ctx: Context, details: dict) -> None:
    """VLM prefill and decode tokens/s (Qwen3-VL-2B head shapes, fewer layers, random weights; the bundled VLM on
    the CPU) and the decode attention backend chosen."""
    from runtime.vlm.sequence import SamplingParams

    path = BUNDLE / "vlm" if ctx.cpu_mode else write_vlm(ctx.tmp / "vlm", QWEN3_VL_2B_SHAPED)
    concurrency, new_tokens = (2, 4) if ctx.cpu_mode else (32, 64)
    engine = vlm_engine(path, ctx, decode_graphs=ctx.on_cuda, num_seqs=concurrency)
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
