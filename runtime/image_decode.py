"""Image bytes -> (H, W, 3) uint8 RGB array.

Only JPEG, PNG and WebP are accepted: each is opened with its own Pillow plugin class after a signature check,
so no other (rarely exercised, historically CVE-prone) Pillow decoder ever sees request bytes. Opening the plugin
classes directly also keeps Pillow's own bomb warning/error out of the picture.

What one image may cost is bounded before any pixel is decoded (probe_image reads the header only):
  * pixels: width*height of the decoded image <= max_pixels. A baseline JPEG above it is decoded at 1/2, 1/4 or 1/8
    scale in the IDCT (Pillow's draft mode), so it costs the reduced size; PNG and WebP cannot shrink while decoding
    and are refused. Images within the limit decode exactly as before: only oversized JPEGs see the DCT-domain
    reduction, which differs from a full decode + resize by the rounding of an 8x8 block average (boxes are scaled
    back to the original pixels by the server);
  * aspect ratio: max(w, h) / min(w, h) <= max_aspect_ratio, so resizing to the model's input stays bounded by
    its output size (a 1x400000 strip would need an H x 224 float intermediate);
  * JPEG scans: every scan of a progressive or multi-scan JPEG is a pass over the whole coefficient buffer, so a
    file repeating one cheap scan a thousand times costs a thousand passes; more than max_jpeg_scans is refused;
  * time: the decoder reads its input through a reader that raises once the caller's deadline passes, so a
    decode stops within one read block of it (DecodeTimeout) instead of running on after its request is gone;
  * memory: ImageInfo.cost_bytes estimates the decode's peak from the header, for admission by bytes.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from graphs.nvtx import nvtx_range

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (same table as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Formats we recognise only to say precisely why they are refused.
_UNSUPPORTED_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
)


DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_ASPECT_RATIO = 20.0   # panoramas are ~6:1; the VLM refuses above 200:1
DEFAULT_MAX_JPEG_SCANS = 64       # encoders write <= ~20 (progressive: ~10)
# Decoder input per read: the granularity of the deadline check. A scan bomb packs ~100 full-image scans into 4 KB
# (~1 s at 4096x4096 on an AVX2 EPYC), so a decode ends at most that long after its deadline.
READ_BLOCK = 4096
_JPEG_SCALES = (1, 2, 4, 8)       # what libjpeg's IDCT can reduce by


class ImageDecodeError(ValueError):
    """A request image that cannot be used; `code` says why (CODES)."""

    CODES = ("undecodable_image", "image_too_large", "image_refused", "decode_timeout")

    def __init__(self, code: str, message: str) -> None:
        assert code in self.CODES, code
        super().__init__(message)
        self.code = code


class DecodeTimeout(ImageDecodeError):
    def __init__(self, message: str) -> None:
        super().__init__("decode_timeout", message)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS

    def __post_init__(self) -> None:
        assert self.max_pixels > 0 and self.max_aspect_ratio >= 1 and self.max_jpeg_scans > 0, self


class _DeadlineReader(io.BytesIO):
    """The decoder's input: read() raises DecodeTimeout once `deadline` (time.monotonic()) has passed."""

    deadline: float | None = None

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DecodeTimeout("decoding this image did not finish before the request's deadline")
        return super().read(size)


@dataclass
class ImageInfo:
    """A header read by probe_image: what decoding will produce and cost. Decode it with decode_probed."""
    format: str
    width: int            # as stored in the header
    height: int
    scale: int            # the JPEG IDCT reduction (1: full size); decoded size is ceil(size / scale)
    cost_bytes: int       # estimated peak memory of the decode (pixels in the decoder's mode + the RGB output)
    image: Image.Image | None  # opened, not loaded; None once decoded

    @property
    def decoded_pixels(self) -> int:
        return -(-self.width // self.scale) * -(-self.height // self.scale)


def _sniff_format(data: bytes) -> str:
    """Name of the container format from its magic bytes; raises for anything but JPEG/PNG/WebP."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        raise ImageDecodeError("undecodable_image", f"ISO-BMFF images ({brand!r}: HEIC/AVIF) are not supported; "
                               "send JPEG, PNG or WebP")
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if data.startswith(signature):
            raise ImageDecodeError("undecodable_image", f"{name} images are not supported; send JPEG, PNG or WebP")
    raise ImageDecodeError("undecodable_image", "not an image (no known format signature)")


_OPENERS = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


def _orientation(im: Image.Image) -> int:
    # A malformed EXIF block must not cost us an otherwise good image: treat it as "no rotation".
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad EXIF
        logger.debug("ignoring unreadable EXIF block: %s", exc)
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB.

    Transparency is composited onto white, exactly as transformers' convert_to_rgb does, so the model sees the
    same pixels as behind its Hugging Face processor; dropping alpha instead would expose whatever colour sits
    under transparent pixels (often black).
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG): Pillow's convert() clips at 255; scale 0..65535 -> 0..255 with rounding instead.
        wide = np.asarray(im).astype(np.uint32)
        grey = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _undecodable(fmt: str, exc: Exception) -> ImageDecodeError:
    # Pillow reports short input as EOFError, struct.error or an OSError/SyntaxError mentioning truncation.
    if isinstance(exc, (EOFError, struct.error)) or "truncat" in str(exc).lower():
        return ImageDecodeError("undecodable_image", f"truncated {fmt} data")
    return ImageDecodeError("undecodable_image", f"corrupt {fmt} data: {exc}")


_BYTES_PER_BAND = {"I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}


def _jpeg_scans(data: bytes) -> int:
    """SOS markers in the file. Entropy-coded data never holds 0xFF followed by 0xDA (an 0xFF there is stuffed
    with 0x00 or starts an RST marker), so every occurrence is a scan header."""
    return data.count(b"\xff\xda")


def probe_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ImageInfo:
    """Read the header of JPEG/PNG/WebP bytes and check every limit; nothing is decoded yet. Raises
    ImageDecodeError: "image_too_large" above the pixel limit, "image_refused" for an extreme aspect ratio or too
    many JPEG scans, "undecodable_image" for everything else."""
    if len(data) == 0:
        raise ImageDecodeError("undecodable_image", "empty image data (0 bytes)")
    data = bytes(data)
    fmt = _sniff_format(data)
    reader = _DeadlineReader(data)
    try:
        im = _OPENERS[fmt](reader)
    except Exception as exc:  # noqa: BLE001 - header parsers raise SyntaxError/OSError/struct.error/...
        raise _undecodable(fmt, exc) from exc
    im.decodermaxblock = READ_BLOCK

    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("undecodable_image", f"{fmt} header gives an empty image ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageDecodeError("image_refused", f"image is {width}x{height}, an aspect ratio of {ratio:.4g}:1; the "
                                                f"limit is {limits.max_aspect_ratio:g}:1")
    scans = _jpeg_scans(data) if fmt == "JPEG" else 1
    if scans > limits.max_jpeg_scans:
        raise ImageDecodeError("image_refused", f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans}")
    multi_scan = scans > 1
    scale = 1
    if width * height > limits.max_pixels and fmt == "JPEG" and not multi_scan:
        # Progressive/multi-scan JPEGs buffer every coefficient at full size, so only single-scan ones reduce.
        scale = next((s for s in _JPEG_SCALES if -(-width // s) * -(-height // s) <= limits.max_pixels), 1)
    pixels = -(-width // scale) * -(-height // scale)
    if pixels > limits.max_pixels:
        reducible = " even at 1/8 scale" if fmt == "JPEG" and not multi_scan else ""
        raise ImageDecodeError("image_too_large", f"image is {width}x{height} = {width * height} pixels, limit is "
                                                  f"{limits.max_pixels}{reducible}")
    if scale > 1:
        im.draft(None, (width // scale, height // scale))
        assert im.size == (-(-width // scale), -(-height // scale)), (im.size, width, height, scale)
    bands = len(im.getbands()) * _BYTES_PER_BAND.get(im.mode, 1)
    cost = pixels * (bands + 3)  # the decoder's image + the RGB array handed on
    if "A" in im.getbands() or "transparency" in im.info:
        cost += pixels * 8  # RGBA conversion and the white backdrop of the alpha composite
    if multi_scan:
        cost += width * height * 2 * len(im.getbands())  # libjpeg's full-size coefficient buffer (2 bytes each)
    return ImageInfo(fmt, width, height, scale, cost, im)


def decode_probed(info: ImageInfo, deadline: float | None = None) -> np.ndarray:
    """Decode a probed image into a C-contiguous (H, W, 3) uint8 RGB array, EXIF orientation applied. Raises
    DecodeTimeout once time.monotonic() passes `deadline`, ImageDecodeError("undecodable_image") for bad data.

    The array is read-only (a zero-extra-copy view of Pillow's output); copy it before writing into it."""
    im, fmt = info.image, info.format
    im.fp.deadline = deadline
    try:
        with nvtx_range("decode"):
            im.load()
    except (MemoryError, ImageDecodeError):
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError/SyntaxError/EOFError/zlib.error/...
        raise _undecodable(fmt, exc) from exc
    finally:
        info.image = None  # one decode per probe; the file and decoder state go with it

    transpose = _ORIENTATION_TRANSPOSE.get(_orientation(im))
    if transpose is not None:
        im = im.transpose(transpose)
    rgb = np.asarray(_to_rgb(im))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous, rgb.shape
    return rgb


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
                 deadline: float | None = None) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes into a C-contiguous (H, W, 3) uint8 RGB array, EXIF orientation applied: probe_image
    then decode_probed. `limits` (default: DecodeLimits with `max_pixels`) bound what one image may cost."""
    assert max_pixels > 0, max_pixels
    return decode_probed(probe_image(data, limits or DecodeLimits(max_pixels=max_pixels)), deadline)
