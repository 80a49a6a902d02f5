"""The values a user sets by name (--dtype, --quantize, --backend, --max-batch; cascade.toml's `quantize`, `backend`,
`dtype` and `kv_cache_dtype`), written once for every layer. No torch here: flags are checked before torch loads.
What the precision names do: runtime/cascade/precision.py (resolution, `auto`), runtime/models/int8_dynamic.py."""

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names
DTYPE_MODES = ("auto", *DTYPES)
INT8_BACKENDS = ("int8", "int8-fbgemm", "int8-onednn")
QUANTIZE_MODES = ("auto", "none", *INT8_BACKENDS)
KV_CACHE_DTYPES = ("auto", "int8")  # "auto": the VLM's run dtype
# What runs the classifier: our modules, or the tools.export graph on ONNX Runtime or as a TensorRT engine (CUDA).
BACKENDS = ("torch", "onnxruntime", "tensorrt")
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")  # run the graph in the classifier's `onnx` key
BACKEND_MODES = ("auto", *BACKENDS)  # --backend; "auto": each classifier's cascade.toml `backend` (torch where unset)

REQUEST_DEADLINE_S = 9.0  # the validators' timeout: a request's deadline, and the VLM's scoring wait without one

# Images per model call when none is set. On CPU ViT-B/16 runs slower per image at 32 than at 8 (BENCHMARKS.md,
# sections 3 and 5).
MAX_BATCH = {"cpu": 8, "cuda": 32}


def default_max_batch(device: str) -> int:
    """`device`: "cpu", "cuda" or "cuda:N"."""
    return MAX_BATCH[device.partition(":")[0]]
