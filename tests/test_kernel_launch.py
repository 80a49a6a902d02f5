"""Every Triton launch runs under kernels/launch.py's launch_device (Triton launches on the current CUDA device, not on
its tensors'): read from the source of every kernels/*_triton.py, and recorded for the int8 KV cache and int4 GEMM
launchers (tests/test_gpu_paths.py records the others)."""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import kernels.int4_gemm_triton
import kernels.kv_int8_triton
from fixtures.triton_mode import KERNEL_DEVICE
from kernels.int4_gemm import pack_int4_k
from kernels.kv_int8 import Int8KVCache

KERNEL_SOURCES = sorted((Path(__file__).parents[1] / "kernels").glob("*_triton.py"))


def jit_functions(tree: ast.Module) -> set[str]:
    """Names of the module's functions decorated with triton.jit, with or without arguments."""
    def is_jit(d: ast.expr) -> bool:
        d = d.func if isinstance(d, ast.Call) else d
        return isinstance(d, ast.Attribute) and d.attr == "jit"
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(is_jit, f.decorator_list))}


def launches_outside_launch_device(tree: ast.Module) -> list[int]:
    """Lines of `kernel[grid](...)` calls of the module's jit functions not inside `with launch_device(...)`."""
    kernels = jit_functions(tree)
    found: list[int] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(i.context_expr, ast.Call) and isinstance(i.context_expr.func, ast.Name)
                                     and i.context_expr.func.id == "launch_device" for i in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in kernels and not guarded):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_every_launch_is_under_launch_device(path):
    tree = ast.parse(path.read_text())
    assert jit_functions(tree), f"{path.name} defines no triton.jit kernel"
    assert launches_outside_launch_device(tree) == [], f"{path.name}: launches outside launch_device"


def test_the_source_check_sees_an_unguarded_launch():
    tree = ast.parse("import triton\n@triton.jit\ndef k(x): pass\n"
                     "def run(x):\n    with launch_device(x.device):\n        k[(1,)](x)\n    k[(2,)](x)\n")
    assert launches_outside_launch_device(tree) == [7]


def test_int8_and_int4_launchers_launch_under_the_tensors_device(monkeypatch):
    launches: list[tuple[str, torch.device]] = []  # (module, device) of each launch_device block
    for module in (kernels.kv_int8_triton, kernels.int4_gemm_triton):
        monkeypatch.setattr(module, "launch_device", lambda device, name=module.__name__: (
            launches.append((name.split(".")[-1], device)), contextlib.nullcontext())[1])
    dev = KERNEL_DEVICE
    cache = Int8KVCache.zeros(1, 2, 4, 1, 8, dev)
    kernels.kv_int8_triton.store_int8_triton(torch.ones(2, 1, 8, device=dev), cache[0, 0],
                                             torch.tensor([0, 1], dtype=torch.int32, device=dev))
    kernels.kv_int8_triton.paged_decode_int8_triton(
        torch.randn(1, 2, 8, device=dev), cache[0, 0], cache[1, 0], torch.tensor([[0]], dtype=torch.int32, device=dev),
        torch.tensor([2], dtype=torch.int32, device=dev), 0.3)
    qweight = pack_int4_k(torch.zeros(32, 16, dtype=torch.uint8)).to(dev)
    kernels.int4_gemm_triton.int4_gemm_triton(torch.randn(1, 32, device=dev), qweight, torch.ones(1, 16, device=dev),
                                              torch.zeros(1, 16, device=dev), 32)
    # the store's three kernels under one block, the decode, the GEMM
    assert launches == [("kv_int8_triton", dev), ("kv_int8_triton", dev), ("int4_gemm_triton", dev)]
