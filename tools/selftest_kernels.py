"""Self-test steps for the kernels: each kernel (through its dispatch function: the Triton kernel or the GPU library
on CUDA, the plain-torch fallback on the CPU) against a float32 or dequantized reference, in the dtype production
runs (bf16), at decode sizes (one token per sequence) and prefill sizes (many)."""
from __future__ import annotations

import numpy as np
import torch

from tools.selftest_context import Context, Skip, check, max_error, relative_error

# Relative to the largest output: bf16 rounds to 8 significant bits (2^-9 relative at half an ulp), and the CPU
# fallbacks also dequantize in bf16; 2e-2 leaves room over that, far under a wrong answer (~1).
BF16_TOLERANCE = 2e-2
FP8_ACTIVATION_TOLERANCE = 0.12  # fp8 e4m3 activations (3 mantissa bits) against unquantized ones, relative


def paged_layout(lens: list[int], block: int, spare: int, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block tables (-1 padded) for sequences of `lens` tokens over shuffled blocks, the flat slot of each of their
    tokens (sequence by sequence), and the number of blocks."""
    pages = [-(-n // block) for n in lens]
    blocks = sum(pages) + spare
    perm = torch.randperm(blocks, generator=g).tolist()
    tables = torch.full((len(lens), max(max(pages), 1)), -1, dtype=torch.int32)
    slots = []
    for s, (n, p) in enumerate(zip(lens, pages)):
        tables[s, :p] = torch.tensor([perm.pop() for _ in range(p)], dtype=torch.int32)
        slots += [int(tables[s, j // block]) * block + j % block for j in range(n)]
    return tables, torch.tensor(slots, dtype=torch.int64), blocks


def attention_cases(ctx: Context) -> list[tuple[int, int, int]]:
    """(heads, kv heads, head_dim): GQA 1, 2, 4, 6 and 8; Qwen3-VL-2B is 16/8 x 128."""
    if ctx.cpu_mode:
        return [(4, 2, 16), (12, 2, 32)]
    return [(h, kv, d) for d in (64, 128) for h, kv in ((8, 8), (16, 8), (16, 4), (16, 2), (12, 2))]


def decode_lengths(ctx: Context, block: int) -> list[int]:
    lens = [1, block, block + 1, 5 * block + 3, 0]
    return lens if ctx.cpu_mode else lens + [200 * block + 7]


def step_kernels(ctx: Context, details: dict) -> None:
    """Each Triton kernel (compiled on CUDA, the interpreter on the CPU) against its torch reference, float32."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # an optional package may fail in other ways than ImportError on a new stack
        raise Skip(f"triton does not import ({type(e).__name__}: {e}): install the gpu extra") from None
    from kernels.kv_store import kv_store_reference
    from kernels.kv_store_triton import kv_store_triton
    from kernels.paged_attention import paged_decode_reference
    from kernels.paged_attention_triton import paged_decode_triton
    from kernels.preprocess import preprocess_reference
    from kernels.preprocess_triton import preprocess_triton
    from kernels.route import route_reference
    from kernels.route_triton import route_triton
    from kernels.vlm_preprocess import patchify_reference
    from kernels.vlm_preprocess_triton import patchify_triton
    from kernels.vote import vote_reference
    from kernels.vote_triton import vote_triton
    from runtime.models.preprocessor import preprocess_spec, vision_preprocess_spec

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
    for heads, kv_heads, head_dim in attention_cases(ctx):
        block = 16
        lens = decode_lengths(ctx, block)
        tables, _, blocks = paged_layout(lens, block, 2, g)
        k_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=g)
        v_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=g)
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
    vision = vision_preprocess_spec({"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16,
                                     "merge_size": 2})
    pixels = torch.randn(3, 64, 96, generator=g)
    out = torch.empty(24, vision.row_size, device=dev)
    patchify_triton(pixels.to(dev), vision, out)
    check(torch.equal(out.cpu(), patchify_reference(pixels, vision)), "patchify differs from the reference")
    details["max_error"] = {k: float(f"{v:.3g}") for k, v in worst.items()}


def step_paged_bf16(ctx: Context, details: dict) -> None:
    """bf16 KV store (prefill: every token of several sequences; decode: one each) and bf16 paged decode through
    the dispatchers, against the float32 reference on the same bf16 inputs."""
    from kernels.kv_store import kv_store, kv_store_reference
    from kernels.paged_attention import paged_decode, paged_decode_reference

    g, dev, bf16 = torch.Generator().manual_seed(3), ctx.device, torch.bfloat16
    for heads, kv_heads, head_dim in attention_cases(ctx):
        block = 16
        lens = decode_lengths(ctx, block)
        tables, slots, blocks = paged_layout(lens, block, 2, g)
        shape = (blocks, block, kv_heads, head_dim)
        key = f"{heads}/{kv_heads}x{head_dim}"
        ours = [torch.zeros(shape, dtype=bf16, device=dev) for _ in range(2)]
        want = [torch.zeros(shape, dtype=bf16) for _ in range(2)]
        prefill = [torch.randn(len(slots), kv_heads, head_dim, generator=g).to(bf16) for _ in range(2)]
        # decode: the last token of each sequence again, with a padding row (-1) as a fixed-size batch has
        last = torch.tensor([int(slots[sum(lens[:s + 1]) - 1]) for s, n in enumerate(lens) if n] + [-1])
        decode = [torch.randn(len(last), kv_heads, head_dim, generator=g).to(bf16) for _ in range(2)]
        for (k, v), where in ((prefill, slots), (decode, last)):
            kv_store(k.to(dev), v.to(dev), *ours, where.to(dev))
            kv_store_reference(k, v, *want, where)
        check(all(torch.equal(a.cpu(), b) for a, b in zip(ours, want)),
              f"bf16 kv store {key} differs from the reference")
        q = torch.randn(len(lens), heads, head_dim, generator=g).to(bf16)
        context = torch.tensor(lens, dtype=torch.int32)
        scale = head_dim ** -0.5
        got = paged_decode(q.to(dev), *ours, tables.to(dev), context.to(dev), scale)
        reference = paged_decode_reference(q.float(), *(c.float() for c in want), tables, context, scale)
        check(got.dtype == bf16, f"paged decode {key} returned {got.dtype}, expected bfloat16")
        err = relative_error(got, reference)
        details[f"decode {key}"] = float(f"{err:.3g}")
        check(err <= BF16_TOLERANCE, f"bf16 paged decode {key}: relative error {err:.3g} against float32 > "
                                     f"{BF16_TOLERANCE}")


def step_kv_int8(ctx: Context, details: dict) -> None:
    """int8 KV store (a prefill's tokens at once, then decode steps of one token a sequence, which may grow a
    block's scale and requantize it) and int8 paged decode through the dispatchers, against the references."""
    from kernels.kv_int8 import Int8KVCache, dequantize_blocks, paged_decode_int8, paged_decode_int8_reference, \
        store_int8, store_int8_reference

    g, dev, bf16 = torch.Generator().manual_seed(4), ctx.device, torch.bfloat16
    for heads, kv_heads, head_dim in attention_cases(ctx):
        block = 16
        prompt = [n for n in decode_lengths(ctx, block) if n]
        steps = 3
        tables, slots, blocks = paged_layout([n + steps for n in prompt], block, 2, g)
        key = f"{heads}/{kv_heads}x{head_dim}"
        ours = Int8KVCache.zeros(1, blocks, block, kv_heads, head_dim, dev)
        want = Int8KVCache.zeros(1, blocks, block, kv_heads, head_dim, torch.device("cpu"))
        starts = [sum(n + steps for n in prompt[:s]) for s in range(len(prompt))]
        written = torch.zeros(2, blocks * block, kv_heads, head_dim)  # every token's float key and value by slot
        batches = [torch.cat([slots[a:a + n] for a, n in zip(starts, prompt)])]  # the prefill
        batches += [torch.tensor([int(slots[a + n + i]) for a, n in zip(starts, prompt)]) for i in range(steps)]
        for where in batches:
            for kind in (0, 1):  # growing magnitudes: later tokens raise their block's scale
                x = (torch.randn(len(where), kv_heads, head_dim, generator=g) * (1 + 3 * torch.rand(1, generator=g))
                     ).to(bf16)
                written[kind, where] = x.float()
                store_int8(x.to(dev), ours[kind, 0], where.to(dev))
                store_int8_reference(x, want[kind, 0], where)
        values, scales = ours.values.cpu(), ours.scales.cpu()
        byte_error = (values.int() - want.values.int()).abs().max().item()
        same_scales = torch.allclose(scales, want.scales, rtol=1e-6, atol=0)
        check(byte_error <= 1 and same_scales, f"int8 kv store {key}: bytes differ by up to {byte_error} from the "
                                               f"reference (scales equal: {same_scales})")
        # Each store rounds to half a step of the block's scale at the time, and scales only grow: a token is within
        # half a step of the final scale per store that touched its block.
        used = torch.cat(batches)
        bound = 0.5 * len(batches) + 1e-3
        for kind in (0, 1):
            cache, _ = dequantize_blocks(want[kind, 0], torch.arange(blocks, dtype=torch.int32)[None], torch.float32)
            step = want.scales[kind, 0].repeat_interleave(block, 0)[:, :, None].clamp(min=1e-30)
            quant = ((cache.flatten(0, 1)[used] - written[kind, used]).abs() / step[used]).max().item()
            details[f"store {key} {'kv'[kind]} error/scale"] = round(quant, 3)
            check(quant <= bound, f"int8 kv store {key}: a token is {quant:.3g} scale steps from its value, > {bound}")
        lens = torch.tensor([n + steps for n in prompt], dtype=torch.int32)
        q = torch.randn(len(prompt), heads, head_dim, generator=g).to(bf16)
        scale = head_dim ** -0.5
        got = paged_decode_int8(q.to(dev), ours[0, 0], ours[1, 0], tables.to(dev), lens.to(dev), scale)
        reference = paged_decode_int8_reference(q.float(), want[0, 0], want[1, 0], tables, lens, scale)
        err = relative_error(got, reference)
        details[f"decode {key}"] = float(f"{err:.3g}")
        check(err <= BF16_TOLERANCE, f"int8 paged decode {key}: relative error {err:.3g} against the dequantized "
                                     f"reference > {BF16_TOLERANCE}")


def gemm_rows(ctx: Context) -> tuple[int, ...]:
    """Decode rows (1; 16 and 17 either side of a kernel's tile) and a prefill's."""
    return (1, 16, 17, 64) if ctx.cpu_mode else (1, 16, 17, 512)


def step_int4_gemm(ctx: Context, details: dict) -> None:
    """The int4 dequant-GEMM through its dispatcher, bf16 activations, against x @ the dequantized weight."""
    from kernels.int4_gemm import int4_gemm, pack_int4_k, unpack_int4_k
    from runtime.models.quantized_checkpoint_formats import dequantize_int4

    g, dev = torch.Generator().manual_seed(5), ctx.device
    shapes = [(256, 128, 64)] if ctx.cpu_mode else [(2048, 2048, 128), (2048, 6144, 128), (6144, 2048, 128)]
    for k, n, group in shapes:
        q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
        check(torch.equal(unpack_int4_k(pack_int4_k(q)), q), f"int4 pack/unpack {k}x{n} does not round-trip")
        scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
        zeros = (8 + torch.randint(-2, 3, (k // group, n), generator=g)).to(torch.bfloat16)
        weight = dequantize_int4(q, zeros, scales, group)  # (out, in) float32
        packed = pack_int4_k(q).to(dev)
        for m in gemm_rows(ctx):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            got = int4_gemm(x.to(dev), packed, scales.to(dev), zeros.to(dev), group)
            rel = relative_error(got, x.float() @ weight.T)
            details[f"{k}x{n} m={m}"] = float(f"{rel:.3g}")
            check(got.dtype == torch.bfloat16, f"int4 gemm returned {got.dtype}, expected bfloat16")
            check(rel <= BF16_TOLERANCE, f"int4 gemm {k}x{n} m={m}: relative error {rel:.3g} > {BF16_TOLERANCE}")


def fp8_weight(out_features: int, in_features: int, g: torch.Generator):
    """A block-scaled (128 x 128) fp8 weight from a random float one."""
    from runtime.models.quantized_checkpoint_formats import FP8_MAX, Fp8Weight

    w = torch.randn(out_features, in_features, generator=g) * 0.05
    blocks = w.view(out_features // 128, 128, in_features // 128, 128)
    scale_inv = blocks.abs().amax((1, 3)) / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).view(out_features, in_features).to(torch.float8_e4m3fn)
    return Fp8Weight(q, scale_inv, (128, 128))


def step_fp8_linear(ctx: Context, details: dict) -> None:
    """Fp8Linear (blockwise _scaled_mm where supported, else one per input block) against the float32 math on the
    same quantized activations, and those against x @ the dequantized weight. Without FP8 GEMMs only the reference
    math is checked, and the step is skipped saying why."""
    from runtime.models.quantized_checkpoint_layers import (Fp8Linear, fp8_blockwise_reference, fp8_blockwise_supported,
                                                            fp8_gemm_supported)

    g, dev = torch.Generator().manual_seed(6), ctx.device
    supported = fp8_gemm_supported(dev)
    details["blockwise"] = supported and fp8_blockwise_supported(dev)
    shapes = [(256, 256)] if ctx.cpu_mode else [(2048, 2048), (6144, 2048), (2048, 6144)]
    for out_features, in_features in shapes:
        weight = fp8_weight(out_features, in_features, g)
        bias = torch.randn(out_features, generator=g) * 0.1
        layer = Fp8Linear(weight, bias, torch.bfloat16, blockwise=details["blockwise"]).to(dev)
        dequantized = weight.dequantize()
        for m in gemm_rows(ctx):
            x = torch.randn(m, in_features, generator=g).to(torch.bfloat16)
            xq, sx = layer.quantize_input(x.to(dev))
            reference = fp8_blockwise_reference(xq.cpu(), sx.cpu(), weight.weight, layer.scale_b.cpu()) + bias
            name = f"{out_features}x{in_features} m={m}"
            rel = relative_error(reference, x.float() @ dequantized.T + bias)
            details[f"{name} activations"] = float(f"{rel:.3g}")
            check(rel <= FP8_ACTIVATION_TOLERANCE, f"fp8 {name}: quantized activations are {rel:.3g} (relative) from "
                                                   f"the float ones, > {FP8_ACTIVATION_TOLERANCE}")
            if supported:
                got = layer(x.to(dev))
                rel = relative_error(got, reference)
                details[name] = float(f"{rel:.3g}")
                check(rel <= BF16_TOLERANCE, f"Fp8Linear {name}: relative error {rel:.3g} against the float32 "
                                             f"math > {BF16_TOLERANCE}")
    if not supported:
        where = (f"sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))}" if ctx.on_cuda else "the CPU")
        raise Skip(f"FP8 GEMMs need CUDA sm90+; on {where} FP8 weights are dequantized at load (only the "
                   f"reference math was checked)")


def step_int8(ctx: Context, details: dict) -> None:
    """Int8Linear at m = 16 and 17 (cuBLASLt's int8 path starts at 17) in bf16 and fp16: finite, near float."""
    from runtime.models.int8_dynamic import Int8Linear

    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(3072, 768)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(768, 3072, generator=g) * 0.05)
    for dtype in (torch.bfloat16, torch.float16):
        layer = Int8Linear(linear.to(dtype)).to(ctx.device)
        for m in (16, 17):
            x = (torch.randn(m, 3072, generator=g) * 4).to(ctx.device, dtype)
            got = layer(x).float()
            want = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
            name = f"{str(dtype).removeprefix('torch.')} m={m}"
            check(bool(torch.isfinite(got).all()), f"{name}: non-finite outputs ({int((~torch.isfinite(got)).sum())})")
            rel = relative_error(got, want)
            details[name] = float(f"{rel:.3g}")
            check(rel <= 0.05, f"{name}: relative error {rel:.3g}")
