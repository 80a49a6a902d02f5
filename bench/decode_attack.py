"""Issue 13's decode attack: four scan-bomb JPEGs (fixtures.hostile.scan_bomb, 1,510 scans at 4096x4096, ~180 KB),
then one validator-sized request; prints what the normal request got, how long it took and /readyz meanwhile.

    python -m bench.decode_attack [--tree DIR]

--tree runs `python -m server` (default bundle, cache off) from another checkout, e.g. the code before the fix."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

from bench.load import make_jpegs, start_listening, wait_ready
from fixtures.hostile import scan_bomb

REPO = Path(__file__).resolve().parents[1]


async def attack(tree: Path) -> dict:
    bomb, normal = scan_bomb(1500, (4096, 4096)), make_jpegs(1, 224)[0]
    proc, url = await start_listening([sys.executable, "-m", "server", "--port", "0", "--cache-entries", "0"],
                                      cwd=tree)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as client:
            await wait_ready(client, url)

            async def post(data: bytes) -> tuple[int, float]:
                start = time.monotonic()
                async with client.post(url + "/v1/predict", data=data, headers={"Content-Type": "image/jpeg"}) as r:
                    await r.read()
                    return r.status, round(time.monotonic() - start, 3)

            bombs = [asyncio.create_task(post(bomb)) for _ in range(4)]
            await asyncio.sleep(0.5)
            status, took = await post(normal)
            async with client.get(url + "/readyz") as r:
                ready = r.status
            finished = [b.result() for b in bombs if b.done()]
            for b in bombs:
                b.cancel()
    finally:
        proc.terminate()
        await proc.wait()
    return {"tree": str(tree), "bomb_bytes": len(bomb), "normal_status": status, "normal_s": took,
            "readyz_meanwhile": ready, "bombs_answered_by_then": finished}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_attack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose server to attack (default: this)")
    report = asyncio.run(attack(parser.parse_args(argv).tree.resolve()))
    print(report)
    return 0 if report["normal_status"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
