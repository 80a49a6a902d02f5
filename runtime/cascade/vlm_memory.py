"""Sizing a VLM stage before anything is allocated: the engine config whose weights, KV pool and decode workspace
must fit the device's free memory, so a bundle that does not fit fails at startup. Its run dtype:
runtime/cascade/precision.py."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from graphs.runner import default_buckets
from runtime.cascade.bundle import VLMStageSpec
from runtime.config import read_json
from runtime.errors import ModelLoadError
from runtime.models.qwen3_vl import MODEL_TYPE, Qwen3VLConfig
from runtime.models.quantized_checkpoint_layers import loaded_weight_bytes
from runtime.vlm.attention import FLASHINFER_WORKSPACE_BYTES, choose_decode_backend, flashinfer_module
from runtime.vlm.block_manager import KVCacheSpec
from runtime.vlm.engine import VLMEngineConfig

log = logging.getLogger(__name__)

GIB = 2 ** 30
MAX_MODEL_LEN = 4096  # prompt + explanation tokens of one sequence (at most the model's max_position_embeddings)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: CUDA's free bytes, or MemAvailable for the CPU (None where it is not known)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_config(spec: VLMStageSpec, where: str) -> Qwen3VLConfig:
    try:
        return Qwen3VLConfig.from_dict(read_json(spec.model / "config.json"))
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}: {spec.model}: {e} (a vlm stage needs a '{MODEL_TYPE}' model)") from e


def engine_config(spec: VLMStageSpec, where: str, device: torch.device, dtype: torch.dtype) -> VLMEngineConfig:
    """The engine's config, after checking that weights + KV pool fit the device (nothing allocated yet)."""
    cfg = read_config(spec, where)
    text = cfg.text
    config = VLMEngineConfig(kv_cache_bytes=int(spec.kv_cache_gb * GIB),
                             max_model_len=min(MAX_MODEL_LEN, text.max_position_embeddings),
                             max_num_seqs=spec.max_num_seqs, yes_token=spec.yes_token, no_token=spec.no_token,
                             kv_cache_dtype=spec.kv_cache_dtype)
    kv_dtype = torch.int8 if spec.kv_cache_dtype == "int8" else dtype
    kv = KVCacheSpec(text.num_layers, text.num_kv_heads, text.head_dim, config.block_size, kv_dtype)
    one_seq = -(-config.max_model_len // config.block_size) * kv.bytes_per_block
    if config.kv_cache_bytes < one_seq:
        raise ModelLoadError(f"{where}: key 'kv_cache_gb' = {spec.kv_cache_gb} is less than one "
                             f"{config.max_model_len}-token sequence needs ({one_seq / GIB:.4g} GiB of {kv_dtype} keys "
                             f"and values); raise it")
    pool = kv.num_blocks(config.kv_cache_bytes, config.max_model_len) * kv.bytes_per_block
    weights = loaded_weight_bytes(spec.model, dtype, cfg.tie_word_embeddings, device)
    extra = runtime_bytes(cfg, config, device, dtype)
    free = free_bytes(device)
    if free is None:
        log.warning("%s: free memory on %s is unknown; not checking that the VLM fits", where, device)
    elif weights + pool + extra > free:
        raise ModelLoadError(
            f"{where}: the VLM does not fit on {device}: weights {weights / GIB:.3g} GiB ({dtype}) + KV cache "
            f"{pool / GIB:.3g} GiB (key 'kv_cache_gb' = {spec.kv_cache_gb})"
            + (f" + decode workspace and graph outputs {extra / GIB:.3g} GiB" if extra else "")
            + f" = {(weights + pool + extra) / GIB:.3g} GiB, but only {free / GIB:.3g} GiB is free; lower "
            f"kv_cache_gb (one {config.max_model_len}-token sequence needs {one_seq / GIB:.3g} GiB), or put the stage "
            f"on another device (key 'device')")
    log.info("%s: weights %.3g GiB + KV cache %.3g GiB + decode workspace and graph outputs %.3g GiB on %s (%s GiB "
             "free)", where, weights / GIB, pool / GIB, extra / GIB, device,
             "unknown" if free is None else f"{free / GIB:.3g}")
    return config


def runtime_bytes(cfg: Qwen3VLConfig, config: VLMEngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Device memory the engine holds besides weights and KV cache: flashinfer's float workspace when it will be
    chosen, and on CUDA the decode graphs' logits (each bucket keeps its float32 (bucket, vocab) output; the
    largest bucket's model-dtype logits are the biggest temporary in their shared pool). Other graph temporaries
    are per-token activations, small next to these, and not counted."""
    if device.type != "cuda":
        return 0
    text = cfg.text
    total = 0
    if choose_decode_backend(device, dtype, text.head_dim, flashinfer_module() is not None,
                             text.num_heads // text.num_kv_heads) == "flashinfer":
        total += FLASHINFER_WORKSPACE_BYTES
    buckets = default_buckets(config.max_num_seqs)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return total + text.vocab_size * (4 * sum(buckets) + itemsize * buckets[-1])
