import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb

from runtime.image_decode import ImageDecodeError, decode_image


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth_rgb(h: int, w: int) -> Image.Image:
    # Compresses like a photo, so a JPEG of it has real scan data after the header.
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims width x height but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (h, w, 3) and arr.flags.c_contiguous


def test_rgb_png_is_exact():
    im = random_rgb(17, 31)
    out = decode_image(encode(im, "PNG"))
    check_rgb(out, 17, 31)
    np.testing.assert_array_equal(out, np.asarray(im))


def test_rgb_jpeg_matches_pillow_decode():
    data = encode(smooth_rgb(64, 48), "JPEG", quality=75)
    out = decode_image(data)
    check_rgb(out, 64, 48)
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_accepts_bytearray_and_memoryview():
    data = encode(random_rgb(5, 6), "PNG")
    np.testing.assert_array_equal(decode_image(bytearray(data)), decode_image(memoryview(data)))


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "RGBA"])
def test_png_modes_match_transformers_convert_to_rgb(mode):
    rgb = random_rgb(12, 9, seed=1)
    im = rgb.convert(mode)
    if mode in ("LA", "RGBA"):
        alpha = np.random.default_rng(2).integers(0, 256, (12, 9), dtype=np.uint8)
        im.putalpha(Image.fromarray(alpha))
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    out = decode_image(data)
    check_rgb(out, 12, 9)
    np.testing.assert_array_equal(out, convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))


def test_palette_transparency_composites_on_white():
    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    pal.putdata([0, 1] * 6)
    data = encode(pal, "PNG", transparency=0)
    out = decode_image(data)
    check_rgb(out, 3, 4)
    flat = out.reshape(-1, 3)
    np.testing.assert_array_equal(flat[0::2], 255)  # transparent index -> white, not the stored black
    np.testing.assert_array_equal(flat[1::2], [[200, 10, 20]] * 6)


def test_sixteen_bit_grey_png_scales_to_eight_bit():
    values = np.array([[0, 1, 128, 129, 257, 32767], [32768, 65278, 65279, 65534, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    check_rgb(out, 2, 6)
    expected = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_cmyk_jpeg():
    data = encode(smooth_rgb(20, 24).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    check_rgb(out, 20, 24)
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_grey_jpeg():
    data = encode(smooth_rgb(8, 10).convert("L"), "JPEG")
    out = decode_image(data)
    check_rgb(out, 8, 10)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(smooth_rgb(20, 40), "JPEG", exif=exif.tobytes())
    out = decode_image(data)
    transposed = orientation >= 5
    check_rgb(out, 40 if transposed else 20, 20 if transposed else 40)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(out, expected)


def test_webp_lossless_and_alpha():
    im = random_rgb(9, 13, seed=3)
    out = decode_image(encode(im, "WEBP", lossless=True))
    check_rgb(out, 9, 13)
    np.testing.assert_array_equal(out, np.asarray(im))

    rgba = im.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((9, 13), 0, np.uint8)))
    out = decode_image(encode(rgba, "WEBP", lossless=True, exact=True))
    np.testing.assert_array_equal(out, 255)  # fully transparent -> white


def test_lossy_webp():
    data = encode(smooth_rgb(30, 20), "WEBP", quality=80)
    out = decode_image(data)
    check_rgb(out, 30, 20)
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def expect_error(data: bytes, code: str, message: str, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.code == code
    assert message in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_empty_bytes():
    expect_error(b"", "undecodable_image", "empty image data (0 bytes)")


def test_random_bytes():
    junk = b"\x13\x37" + np.random.default_rng(4).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    expect_error(junk, "undecodable_image", "not an image (no known format signature)")
    expect_error(b"hello", "undecodable_image", "not an image (no known format signature)")


def test_unsupported_formats_are_named():
    expect_error(encode(random_rgb(4, 4), "GIF"), "undecodable_image", "GIF images are not supported")
    expect_error(encode(random_rgb(4, 4), "BMP"), "undecodable_image", "BMP images are not supported")


def test_truncated_jpeg():
    data = encode(smooth_rgb(256, 256), "JPEG", quality=90)
    for cut in (len(data) // 2, 40):
        expect_error(data[:cut], "undecodable_image", "truncated JPEG data")


def test_truncated_png_and_webp():
    png = encode(random_rgb(64, 64), "PNG")
    expect_error(png[: len(png) // 2], "undecodable_image", "truncated PNG data")
    webp = encode(random_rgb(64, 64), "WEBP")
    expect_error(webp[: len(webp) // 2], "undecodable_image", "WEBP data")


def test_corrupt_png_data():
    png = bytearray(encode(smooth_rgb(32, 32), "PNG"))
    idat = png.index(b"IDAT")
    png[idat + 8 : idat + 20] = b"\xff" * 12  # garbage inside the zlib stream
    expect_error(bytes(png), "undecodable_image", "PNG data")


def test_too_large_from_header_without_decoding():
    start = time.perf_counter()
    err = expect_error(png_header_only(9000, 9000), "image_too_large",
                       "image is 9000x9000 = 81000000 pixels, limit is 40000000")
    assert time.perf_counter() - start < 1.0, "the pixel limit must be checked before decoding"
    assert err.code == "image_too_large"


def test_pixel_limit_boundary():
    data = encode(random_rgb(10, 10), "PNG")
    check_rgb(decode_image(data, max_pixels=100), 10, 10)
    expect_error(data, "image_too_large", "image is 10x10 = 100 pixels, limit is 99", max_pixels=99)


def test_jpeg_with_huge_sof_dimensions():
    data = bytearray(encode(smooth_rgb(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)  # height, width in the SOF0 segment
    expect_error(bytes(data), "image_too_large", "image is 60000x60000 = 3600000000 pixels")


def test_pillow_bomb_checks_never_leak():
    # 100M pixels trips Pillow's DecompressionBombWarning, 225M its DecompressionBombError; neither may escape.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expect_error(png_header_only(10000, 10000), "image_too_large", "limit is 50000000", max_pixels=50_000_000)
        expect_error(png_header_only(15000, 15000), "image_too_large", "= 225000000 pixels")


# --- bounds on what one image may cost (issue 13) -------------------------------------------------------------

def test_extreme_aspect_ratio_is_refused_from_the_header():
    from fixtures.hostile import strip_png
    expect_error(strip_png(400_000), "image_refused", "aspect ratio of 4e+05:1; the limit is 20:1")
    check_rgb(decode_image(encode(random_rgb(2, 40), "PNG")), 2, 40)  # 20:1 is allowed


def test_jpeg_with_too_many_scans_is_refused_before_decoding():
    from fixtures.hostile import scan_bomb
    from runtime.image_decode import DecodeLimits
    bomb = scan_bomb(200, (256, 256))
    start = time.perf_counter()
    expect_error(bomb, "image_refused", "scans; the limit is 64")
    assert time.perf_counter() - start < 0.5
    check_rgb(decode_image(bomb, limits=DecodeLimits(max_jpeg_scans=1000)), 256, 256)


def test_decode_stops_at_its_deadline():
    from runtime.image_decode import DecodeTimeout
    data = encode(smooth_rgb(1536, 2048), "JPEG", quality=95)
    with pytest.raises(DecodeTimeout):
        decode_image(data, deadline=time.monotonic() - 1)
    check_rgb(decode_image(data, deadline=time.monotonic() + 60), 1536, 2048)


def test_oversized_baseline_jpeg_decodes_reduced_and_close_to_a_resize():
    """Draft mode: the IDCT scales by 1/2; the result is within JPEG noise of decoding fully and box-reducing."""
    from runtime.image_decode import DecodeLimits, probe_image
    data = encode(smooth_rgb(512, 768), "JPEG", quality=90)
    info = probe_image(data, DecodeLimits(max_pixels=512 * 768 // 4))
    assert (info.scale, info.decoded_pixels) == (2, 256 * 384)
    reduced = decode_image(data, max_pixels=512 * 768 // 4)
    check_rgb(reduced, 256, 384)
    full = Image.open(io.BytesIO(data)).convert("RGB").reduce(2)
    assert np.abs(reduced.astype(int) - np.asarray(full).astype(int)).mean() < 3.0
    progressive = encode(smooth_rgb(512, 768), "JPEG", quality=90, progressive=True)
    expect_error(progressive, "image_too_large", "limit is 98304", max_pixels=512 * 768 // 4)


def test_cost_estimate_covers_the_decoded_array():
    from runtime.image_decode import probe_image
    for im, fmt in ((random_rgb(40, 30), "PNG"), (random_rgb(40, 30).convert("RGBA"), "PNG"),
                    (smooth_rgb(40, 30), "JPEG"), (random_rgb(40, 30), "WEBP")):
        data = encode(im, fmt)
        assert probe_image(data).cost_bytes >= decode_image(data).nbytes * 2, fmt
