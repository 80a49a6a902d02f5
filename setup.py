from setuptools import find_packages, setup

setup(
    name="roadwork-cascade",
    version="0.1.0",
    description="Single-process inference server: is there roadwork in this street image?",
    python_requires=">=3.11",  # tomllib (runtime/cascade/bundle.py)
    packages=find_packages(include=["kernels*", "runtime*", "server*", "graphs*", "bench*", "train*", "tools*", "fixtures*"]),
    include_package_data=True,
    install_requires=[
        # Exact pin: on CPU machines this resolves to the 2.13.0+cpu wheel instead of a multi-GB CUDA build.
        "torch==2.13.0",
        "triton>=3.2",
        "numpy>=1.26",
        "pillow>=10.0",
        "safetensors>=0.4",
        "aiohttp>=3.9",
        "uvloop>=0.19",
        "orjson>=3.9",
        "prometheus-client>=0.20",
        # The VLM stage's tokenizer (runtime/vlm/tokenizer.py): tokenizer.json and the chat template.
        "tokenizers>=0.20",
        "jinja2>=3.1",
    ],
    extras_require={
        "gpu": ["cuda-python", "tensorrt", "flash-attn", "flashinfer-python"],
        "test": ["pytest>=8", "hypothesis>=6", "transformers==5.23.0"],
        "fuzz": ["atheris>=2.3"],  # python -m bench.fuzz (falls back to hypothesis without it)
    },
)
