"""Registers and spills of the paged-decode Triton kernels (float cache, or int8 with --kernel int8) compiled for a
GPU architecture, without a GPU: Triton compiles to a cubin with its bundled ptxas and cuobjdump reads the resource
usage.

    env -u TRITON_INTERPRET python -m bench.kernel_registers --arch 90 --cases 8x128x16 2x128x16
    env -u TRITON_INTERPRET python -m bench.kernel_registers --kernel int8 --cases 8x128x16

A case is GROUPxHEAD_DIMxPAGE (query heads per kv head, head dim, block size), at the tile size the runtime uses."""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from kernels.kv_int8_triton import paged_decode_int8_kernel
from kernels.paged_attention import decode_tile_tokens
from kernels.paged_attention_triton import paged_decode_kernel

KERNELS = {"float": paged_decode_kernel, "int8": paged_decode_int8_kernel}

INT_ARGS = ("q_stride_seq", "q_stride_head", "out_stride_seq", "out_stride_head", "block_table_stride",
            "cache_stride_block", "cache_stride_token", "cache_stride_head")


def signature_of(kernel_name: str, constants: dict[str, int]) -> dict[str, str]:
    """bf16 queries and outputs; a bf16 cache, or int8 values with float32 scales."""
    cache = "*i8" if kernel_name == "int8" else "*bf16"
    signature = {"q_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
                 "scale": "fp32", **dict.fromkeys(INT_ARGS, "i32"), **dict.fromkeys(constants, "constexpr")}
    if kernel_name == "int8":
        signature.update(k_ptr=cache, v_ptr=cache, k_scales_ptr="*fp32", v_scales_ptr="*fp32")
    else:
        signature.update(k_cache_ptr=cache, v_cache_ptr=cache)
    names = KERNELS[kernel_name].arg_names
    return {name: signature[name] for name in names}  # in the kernel's argument order


def resource_usage(kernel_name: str, group: int, head_dim: int, page: int, kv_heads: int, arch: int,
                   num_warps: int) -> str:
    kernel = KERNELS[kernel_name]
    assert type(kernel).__name__ == "JITFunction", "unset TRITON_INTERPRET: the interpreter compiles nothing"
    group_pad, dim_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    constants = {"GROUP": group, "GROUP_PAD": group_pad, "HEAD_DIM": head_dim, "DIM_PAD": dim_pad, "PAGE": page,
                 "TOKENS": decode_tile_tokens(group_pad, dim_pad, page, on_cuda=True)}
    if kernel_name == "int8":
        constants["KV_HEADS"] = kv_heads
    names = kernel.arg_names
    source = triton.compiler.ASTSource(fn=kernel, signature=signature_of(kernel_name, constants),
                                       constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = next(line.strip() for line in out.splitlines() if "REG:" in line)
    return f"tokens/tile {constants['TOKENS']}: {usage}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: sm_90)")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--kernel", choices=sorted(KERNELS), default="float", help="float or int8 KV cache")
    parser.add_argument("--kv-heads", type=int, default=8, help="kv heads of the int8 scales' layout")
    parser.add_argument("--cases", nargs="+", default=["8x128x16", "2x128x16", "4x64x16"])
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, {args.kernel} cache, sm_{args.arch}, {args.num_warps} warps")
    for case in args.cases:
        group, head_dim, page = (int(v) for v in case.split("x"))
        usage = resource_usage(args.kernel, group, head_dim, page, args.kv_heads, args.arch, args.num_warps)
        print(f"{case}: {usage}")


if __name__ == "__main__":
    main()
