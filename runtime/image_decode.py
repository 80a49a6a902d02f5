"""Image bytes -> (H, W, 3) uint8 RGB array.

Only JPEG, PNG and WebP are accepted: each is opened with its own Pillow plugin class after a signature check,
so no other (rarely exercised, historically CVE-prone) Pillow decoder ever sees request bytes. The pixel limit
is checked against the header size before any pixel data is decoded, which makes decompression bombs cheap to
reject; opening the plugin classes directly also keeps Pillow's own bomb warning/error out of the picture.
"""

from __future__ import annotations

import io
import logging
import struct

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


class ImageDecodeError(ValueError):
    """A request image that cannot be used; `code` is "undecodable_image" or "image_too_large"."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ("undecodable_image", "image_too_large"), code
        super().__init__(message)
        self.code = code


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


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes into a C-contiguous (H, W, 3) uint8 RGB array, EXIF orientation applied.

    The array is read-only (a zero-extra-copy view of Pillow's output); copy it before writing into it.
    Raises ImageDecodeError with code "image_too_large" when width*height > max_pixels (checked from the
    header, before decoding), and "undecodable_image" for everything else.
    """
    with nvtx_range("decode"):
        return _decode_image(data, max_pixels)


def _decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    assert max_pixels > 0, max_pixels
    if len(data) == 0:
        raise ImageDecodeError("undecodable_image", "empty image data (0 bytes)")
    data = bytes(data)
    fmt = _sniff_format(data)
    try:
        im = _OPENERS[fmt](io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - header parsers raise SyntaxError/OSError/struct.error/...
        raise _undecodable(fmt, exc) from exc

    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("undecodable_image", f"{fmt} header gives an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image_too_large",
            f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}",
        )

    try:
        im.load()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError/SyntaxError/EOFError/zlib.error/...
        raise _undecodable(fmt, exc) from exc

    transpose = _ORIENTATION_TRANSPOSE.get(_orientation(im))
    if transpose is not None:
        im = im.transpose(transpose)
    rgb = np.asarray(_to_rgb(im))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous, rgb.shape
    return rgb
