"""Coverage-guided fuzzing of the request surface: payload parsing (JSON, base64, content types) and image
decoding of every accepted format, with the server's limits.

    python -m bench.fuzz [--runs 100000] [--target all|payload|decode] [--engine atheris|hypothesis] [--json F]

atheris (libFuzzer; `pip install -e '.[fuzz]'`) mutates a seed corpus made here on the spot: valid JPEG (baseline,
progressive, CMYK, grey, EXIF-rotated), PNG (RGB, RGBA, palette, 16-bit grey), WebP (lossy, lossless, alpha), the
hostile files of fixtures/hostile.py, and JSON bodies around them. It runs in a child process (libFuzzer exits
the process when done), which writes its counters to a file; the report has inputs run, crashes (an exception
other than the documented refusals, with the input saved), the slowest input and peak RSS. Without atheris,
hypothesis generates inputs from the same seeds (less deep: no coverage feedback from Pillow's C decoders).
"""
from __future__ import annotations

import argparse
import base64
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATS_EVERY = 500  # inputs between counter writes from the fuzzing child
DECODE_DEADLINE_S = 5.0


def seed_corpus() -> dict[str, bytes]:
    """Valid and hostile inputs, small so that mutations stay fast."""
    import io

    import numpy as np
    from PIL import Image

    from fixtures.hostile import encode, flat_webp, photo, png_header_only, scan_bomb, strip_png

    rgb = photo(48, 32, seed=1)
    seeds = {
        "baseline.jpg": encode(rgb, "JPEG", quality=75),
        "progressive.jpg": encode(rgb, "JPEG", quality=75, progressive=True),
        "grey.jpg": encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "rgb.png": encode(rgb, "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "grey16.png": encode(Image.fromarray((np.arange(48 * 32, dtype=np.uint16) * 40).reshape(32, 48)), "PNG"),
        "lossy.webp": encode(rgb, "WEBP", quality=50),
        "lossless.webp": encode(rgb, "WEBP", lossless=True),
        "alpha.webp": encode(rgb.convert("RGBA"), "WEBP"),
        "scan_bomb.jpg": scan_bomb(80, (64, 64)),
        "strip.png": strip_png(5000),
        "header_only.png": png_header_only(30000, 30000),
        "flat.webp": flat_webp(2000),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", exif=exif.tobytes())
    seeds["rotated.jpg"] = buffer.getvalue()
    for name in ("baseline.jpg", "rgba.png", "lossy.webp"):
        text = base64.b64encode(seeds[name]).decode()
        seeds[f"{name}.json"] = json.dumps({"image": text, "timeout": 9}).encode()
        seeds[f"{name}.batch.json"] = json.dumps({"images": [text, "data:image/png;base64," + text]}).encode()
    return seeds


class Target:
    """One fuzz input -> the server's parsing and decoding, under the server's default limits. The documented
    refusals (ApiError, ImageDecodeError) are outcomes; anything else propagates as a crash."""

    def __init__(self, which: str) -> None:
        from runtime.image_decode import DecodeLimits
        from server.config import ServerConfig
        config = ServerConfig()
        self.which = which
        self.limits = DecodeLimits(config.max_pixels, config.max_aspect_ratio, config.max_jpeg_scans)
        self.runs = 0
        self.slowest_s = 0.0
        self.slowest: bytes = b""

    def __call__(self, data: bytes) -> None:
        from runtime.image_decode import ImageDecodeError
        from server.errors import ApiError
        start = time.perf_counter()
        try:
            if self.which in ("all", "payload") and data[:1] in (b"{", b"["):
                self.payload(data)
            elif self.which in ("all", "decode"):
                self.decode(data)
        except (ApiError, ImageDecodeError):
            pass
        took = time.perf_counter() - start
        self.runs += 1
        if took > self.slowest_s:
            self.slowest_s, self.slowest = took, data

    def payload(self, data: bytes) -> None:
        from server.routes import _extract_batch, _extract_single
        from runtime.image_decode import ImageDecodeError
        for extract in (lambda: [_extract_single(data, "application/json")[0]], lambda: _extract_batch(data, 256)):
            try:
                blobs = extract()
            except Exception as e:
                if type(e).__name__ != "ApiError":
                    raise
                continue
            for blob in blobs:
                if isinstance(blob, bytes):
                    try:
                        self.decode(blob)
                    except ImageDecodeError:
                        pass

    def decode(self, data: bytes) -> None:
        from runtime.image_decode import decode_probed, probe_image
        image = decode_probed(probe_image(data, self.limits), time.monotonic() + DECODE_DEADLINE_S)
        assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] * image.shape[1] <= self.limits.max_pixels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_stats(path: Path, target: Target, crash_dir: Path) -> None:
    (crash_dir / "slowest.bin").write_bytes(target.slowest)
    path.write_text(json.dumps({"runs": target.runs, "slowest_s": target.slowest_s,
                                "slowest_bytes": len(target.slowest), "peak_rss_mb": peak_rss_mb()}))


def atheris_child(args: argparse.Namespace) -> None:
    """Runs in the child: libFuzzer over the corpus directory; exits the process when done or on a crash."""
    import atheris
    import numpy  # noqa: F401 - imported first so that only the request surface gets instrumented
    import PIL.Image  # noqa: F401

    surface = ["runtime.image_decode", "server.payload", "server.routes"]
    with atheris.instrument_imports(include=surface):  # coverage feedback from our parsing and decoding code
        import server.routes  # noqa: F401 - imports the other two
    target = Target(args.target)
    stats, crash_dir = Path(args.stats), Path(args.crash_dir)

    def one_input(data: bytes) -> None:
        target(data)
        if target.runs % STATS_EVERY == 0:
            write_stats(stats, target, crash_dir)

    atheris.Setup([sys.argv[0], f"-runs={args.runs}", "-rss_limit_mb=4096", "-timeout=20", "-max_len=262144",
                   f"-artifact_prefix={crash_dir}/", f"-seed={args.seed}", "-print_final_stats=1", args.corpus],
                  one_input)
    import atexit
    atexit.register(write_stats, stats, target, crash_dir)
    atheris.Fuzz()


def run_atheris(args: argparse.Namespace, work: Path) -> dict:
    corpus = work / "corpus"
    corpus.mkdir()
    for name, data in seed_corpus().items():
        (corpus / name).write_bytes(data)
    stats, crash_dir = work / "stats.json", work / "artifacts"
    crash_dir.mkdir()
    command = [sys.executable, "-m", "bench.fuzz", "--child", "--runs", str(args.runs), "--target", args.target,
               "--seed", str(args.seed), "--stats", str(stats), "--crash-dir", str(crash_dir), "--corpus", str(corpus)]
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    took = time.monotonic() - start
    counters = json.loads(stats.read_text()) if stats.exists() else {}
    crashes = sorted(p for p in crash_dir.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    final = [line for line in done.stderr.splitlines() if line.startswith(("stat::", "#", "==")) or "Done" in line]
    return {"engine": "atheris", "exit_code": done.returncode, "seconds": round(took, 1), **counters,
            "crashes": [str(p) for p in crashes], "saved_slowest": str(crash_dir / "slowest.bin"),
            "libfuzzer_tail": final[-6:],
            "error_tail": done.stderr.splitlines()[-30:] if done.returncode != 0 else []}


def run_hypothesis(args: argparse.Namespace, work: Path) -> dict:
    from hypothesis import HealthCheck, given, settings, strategies as st

    seeds = list(seed_corpus().values())
    target = Target(args.target)
    crashes: list[str] = []

    def mutate(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
        data = bytearray(seed[:max(1, len(seed) - cut)])
        for offset, value in edits:
            data[offset % len(data)] = value
        return bytes(data)

    inputs = st.one_of(st.binary(max_size=4096),
                       st.builds(mutate, st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 1 << 20),
                                                                                    st.integers(0, 255)), max_size=8),
                                 st.integers(0, 64)))

    @settings(max_examples=args.runs, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(inputs)
    def check(data: bytes) -> None:
        try:
            target(data)
        except Exception as e:
            path = work / f"crash-{len(crashes)}"
            path.write_bytes(data)
            crashes.append(f"{path}: {e!r}")
            raise

    start = time.monotonic()
    try:
        check()
    except Exception:  # the crash is recorded above; hypothesis shrank it first
        pass
    return {"engine": "hypothesis", "seconds": round(time.monotonic() - start, 1), "runs": target.runs,
            "slowest_s": target.slowest_s, "slowest_bytes": len(target.slowest), "peak_rss_mb": peak_rss_mb(),
            "crashes": crashes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--target", choices=["all", "payload", "decode"], default="all")
    parser.add_argument("--engine", choices=["atheris", "hypothesis"],
                        help="default: atheris when installed, else hypothesis")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, help="keep the corpus, crashes and slowest input here (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--stats", "--crash-dir", "--corpus"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        atheris_child(args)
        return 0
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    report = run_atheris(args, work) if engine == "atheris" else run_hypothesis(args, work)
    report["work"] = str(work)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if report["crashes"] or report.get("exit_code", 0) not in (0,) else 0


if __name__ == "__main__":
    sys.exit(main())
