"""BASELINE, not our server: the subnet's reference miner's way of answering, served for comparison only.

    python -m bench.miner_baseline --model DIR [--host 127.0.0.1] [--port 0] [--dtype fp32]

As the reference miner's forward_image does (NATIX streetvision-subnet 2.0.4, neurons/miner.py): take the
ImageSynapse JSON ({"image": base64 JPEG, "prediction": -1.0, "testnet_label": -1, ...}), base64-decode the
image, open it with PIL, and run a transformers pipeline("image-classification") on it synchronously inside
the async handler, so the event loop is blocked and requests are answered one at a time. The reply is the
synapse with `prediction` set to the roadwork label's score; on any error the prediction stays -1.0 (the
miner logs and returns the synapse unchanged). The model loads before the port opens, so GET /readyz is 200
from the first answer on; GET /healthz likewise.

This exists for bench/serve_vs_miner.py; transformers is a benchmark dependency here, never the runtime's."""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import logging
import re
import signal
import sys

import orjson
import torch
from aiohttp import web
from PIL import Image

log = logging.getLogger("bench.miner_baseline")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def roadwork_label(id2label: dict) -> str:
    names = [str(v) for v in id2label.values()]
    hits = [n for n in names if "roadwork" in re.sub(r"[^a-z]", "", n.lower())]
    if len(hits) != 1:
        raise ValueError(f"cannot tell which label means roadwork from id2label {names}")
    return hits[0]


def make_app(model_dir: str, dtype: torch.dtype) -> web.Application:
    from transformers import pipeline  # the baseline's own dependency

    classify = pipeline("image-classification", model=model_dir, dtype=dtype, device="cpu")
    label = roadwork_label(classify.model.config.id2label)

    async def image_synapse(request: web.Request) -> web.Response:
        try:
            synapse = orjson.loads(await request.read())
            assert isinstance(synapse, dict) and isinstance(synapse.get("image"), str)
        except (orjson.JSONDecodeError, AssertionError):
            return web.json_response({"error": "body must be an ImageSynapse JSON object with an 'image' string"},
                                     status=400)
        try:
            image = Image.open(io.BytesIO(base64.b64decode(synapse["image"])))
            scores = classify(image, top_k=None)  # blocks the event loop, as the reference miner does
            synapse["prediction"] = next(s["score"] for s in scores if s["label"] == label)
        except (binascii.Error, OSError, ValueError, StopIteration) as e:
            log.error("error performing inference: %s", e)
        return web.Response(body=orjson.dumps(synapse), content_type="application/json")

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application(client_max_size=32 * 2**20)
    app.router.add_post("/ImageSynapse", image_synapse)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/healthz", ok)
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    log.info("listening on http://%s:%d (baseline: transformers pipeline, one request at a time)",
             bound_host, bound_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face ViTForImageClassification directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the reference miner runs fp32")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app(args.model, DTYPES[args.dtype])
    asyncio.run(serve(app, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
