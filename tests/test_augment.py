"""The subnet's challenge augmentations: output format, level semantics, box consistency, pixel maths."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from train.augment import (BLUR_KERNEL, CONTRAST, DOWNSCALE, LEVELS, NOISE_VAR, SATURATION, SIZE, AugmentParams,
                           _encode, _gaussian_blur, _resize_linear, _transform_boxes, _ycbcr_noise, augment,
                           augment_array, augment_with_boxes)

RED = (255, 0, 0)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _with_red_box(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), (40, 40, 40))
    ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=RED)
    return img


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(224, 224), (448, 448), (320, 200), (150, 260)])
def test_every_level_gives_a_224_jpeg(level, shape):
    data = augment(_picture(*shape), level, _rng(level))
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (SIZE, SIZE) and img.mode == "RGB"
    img.load()


def test_inputs_pil_any_mode_and_arrays_agree():
    pic = _picture(300, 240)
    assert augment(pic, 1, _rng(3)) == augment(np.asarray(pic), 1, _rng(3))
    gray = pic.convert("L")
    assert Image.open(io.BytesIO(augment(gray, 2, _rng(1)))).size == (SIZE, SIZE)


def test_same_generator_state_same_bytes_and_all_variants_agree():
    pic = _picture(256, 256)
    for level in LEVELS:
        jpeg = augment(pic, level, _rng(9))
        assert jpeg == augment(pic, level, _rng(9))
        assert _encode(augment_array(pic, level, _rng(9))) == jpeg
        with_boxes = augment_with_boxes(pic, np.zeros((0, 4)), level, _rng(9))
        assert with_boxes.jpeg == jpeg and with_boxes.image.shape == (SIZE, SIZE, 3)
    assert augment(pic, 3, _rng(1)) != augment(pic, 3, _rng(2))


def test_level0_on_a_224_square_is_the_identity_and_default_quality():
    pic = _picture(224, 224)
    np.testing.assert_array_equal(augment_array(pic, 0, _rng(0)), np.asarray(pic))
    buf = io.BytesIO()
    pic.save(buf, format="JPEG")       # PIL's default quality, as the validator encodes
    assert augment(pic, 0, _rng(0)) == buf.getvalue()


def test_level0_crops_the_centre_square():
    img = Image.new("RGB", (300, 200), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((50, 0, 249, 199), fill=RED)    # exactly the centre 200x200
    a = augment_array(img, 0, _rng(0)).astype(int)
    assert (a[..., 0] > 250).all() and (a[..., 2] < 5).all()


def test_levels_draw_the_subnet_parameters():
    seen = {level: [] for level in LEVELS}
    pic = _picture(64, 48)
    for seed in range(150):
        for level in LEVELS:
            seen[level].append(augment_with_boxes(pic, np.zeros((0, 4)), level, _rng(seed)).params)
    photometric = ("saturation", "contrast", "downscale", "noise_var", "blur_kernel")
    for p in seen[0]:
        assert p.angle == 0 and p.crop == (8, 0, 48) and not p.hflip and not p.vflip
        assert all(getattr(p, f) is None for f in photometric)
    for level in (1, 2, 3):
        ps = seen[level]
        assert all(abs(p.angle) <= 20 for p in ps) and max(abs(p.angle) for p in ps) > 17
        areas = [p.crop[2] ** 2 / (64 * 48) for p in ps]
        assert min(areas) >= 0.19 and max(areas) <= 1.0
        assert 0.3 < np.mean([p.hflip for p in ps]) < 0.7 and 0.3 < np.mean([p.vflip for p in ps]) < 0.7
        for p in ps:
            x, y, side = p.crop
            assert 0 <= x and x + side <= 64 and 0 <= y and y + side <= 48
    assert all(all(getattr(p, f) is None for f in photometric) for p in seen[1])
    for p in seen[2]:
        assert p.saturation in (None, SATURATION[0]) and p.contrast in (None, CONTRAST[0])
        assert p.downscale in (None, DOWNSCALE[0]) and p.noise_var is None and p.blur_kernel is None
    assert {p.saturation for p in seen[3]} == {None, *SATURATION}
    assert {p.contrast for p in seen[3]} == {None, *CONTRAST}
    assert {p.downscale for p in seen[3]} == {None, *DOWNSCALE}
    assert {p.noise_var for p in seen[3]} == {None, *NOISE_VAR}
    assert {p.blur_kernel for p in seen[3]} == {None, *BLUR_KERNEL}
    # each strength about equally likely, like random.randint(0, top)
    assert 0.35 < np.mean([p.saturation is None for p in seen[2]]) < 0.65
    assert 0.2 < np.mean([p.blur_kernel is None for p in seen[3]]) < 0.47


@pytest.mark.parametrize("level", [0, 1])
def test_boxes_follow_a_solid_rectangle(level):
    box = (200, 40, 260, 120)
    img = _with_red_box(320, 200, box)
    checked = 0
    for seed in range(40):
        out = augment_with_boxes(img, np.array([box], np.float32), level, _rng(seed))
        a = out.image.astype(int)
        red = (a[..., 0] > 150) & (a[..., 1] < 90) & (a[..., 2] < 90)
        if len(out.kept) == 0:
            assert red.sum() < 0.4 * (out.image.shape[0] * out.image.shape[1]), "dropped a box that is in view"
            continue
        x0, y0, x1, y1 = out.boxes[0]
        ys, xs = np.nonzero(red)
        centres_x, centres_y = xs + 0.5, ys + 0.5
        inside = (centres_x > x0 - 1) & (centres_x < x1 + 1) & (centres_y > y0 - 1) & (centres_y < y1 + 1)
        assert inside.mean() > 0.99, f"seed {seed}: red pixels outside the transformed box"
        tight = (centres_x.min(), centres_y.min(), centres_x.max(), centres_y.max())
        if level == 0:
            np.testing.assert_allclose(out.boxes[0], [tight[0] - 0.5, tight[1] - 0.5, tight[2] + 0.5, tight[3] + 0.5],
                                       atol=1.5)
        else:
            # rotating corners only ever loosens the box; by at most the ±20° bound
            red_area = (tight[2] - tight[0] + 1) * (tight[3] - tight[1] + 1)
            assert (x1 - x0) * (y1 - y0) < 2.2 * red_area + 40
        checked += 1
    assert checked >= 20


def test_boxes_cropped_away_are_dropped_and_partial_ones_clipped():
    params = AugmentParams(level=1, crop=(100, 100, 100))     # keep x, y in [100, 200), scale 2.24
    boxes = np.array([[0, 0, 50, 50],        # outside: dropped
                      [120, 120, 160, 160],  # inside
                      [80, 120, 120, 160],   # half in: kept, clipped
                      [85, 120, 105, 160]],  # a quarter in: dropped
                     np.float32)
    out, kept = _transform_boxes(boxes, (300, 300), params)
    assert kept.tolist() == [1, 2]
    np.testing.assert_allclose(out[0], np.array([20, 20, 60, 60]) * 2.24, rtol=1e-5)
    np.testing.assert_allclose(out[1], np.array([0, 20 * 2.24, 20 * 2.24, 60 * 2.24]), rtol=1e-5)
    flipped, _ = _transform_boxes(boxes[1:2], (300, 300), AugmentParams(1, crop=(100, 100, 100), hflip=True, vflip=True))
    np.testing.assert_allclose(flipped[0], [SIZE - 60 * 2.24, SIZE - 60 * 2.24, SIZE - 20 * 2.24, SIZE - 20 * 2.24],
                               rtol=1e-5)


def test_rotation_turns_boxes_counter_clockwise():
    params = AugmentParams(level=1, angle=90.0, crop=(0, 0, 224))
    out, kept = _transform_boxes(np.array([[162, 107, 172, 117]], np.float32), (224, 224), params)
    # a box right of centre ends up above it
    np.testing.assert_allclose(out[0], [107, 52, 117, 62], atol=1e-4)


def test_saturation_keeps_greys_and_scales_chroma():
    from train.augment import _photometric
    grey = Image.new("RGB", (SIZE, SIZE), (120, 120, 120))
    assert (_photometric(grey, AugmentParams(2, saturation=0.4), _rng(0)) == 120).all()
    col = Image.new("RGB", (SIZE, SIZE), (200, 100, 50))
    out = _photometric(col, AugmentParams(2, saturation=0.4), _rng(0))[0, 0].astype(float)
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    np.testing.assert_allclose(out, luma + 0.4 * (np.array([200, 100, 50]) - luma), atol=1.0)
    dark = _photometric(col, AugmentParams(2, contrast=0.85), _rng(0))[0, 0]
    np.testing.assert_allclose(dark, np.array([200, 100, 50]) * 0.85, atol=1.0)


def test_resize_linear_matches_opencv_half_pixel_rule():
    a = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    down = _resize_linear(a, 2, 2)[..., 0]
    np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]])    # 2x2 block means
    up = _resize_linear(np.array([[[0.0], [4.0]]], np.float32), 1, 4)[0, :, 0]
    np.testing.assert_allclose(up, [0.0, 1.0, 3.0, 4.0])              # edge clamp, then linear


def test_pil_upsampling_matches_opencv_linear():
    """_photometric enlarges with PIL; OpenCV's INTER_LINEAR (emulated by _resize_linear) is the reference."""
    for side in (SIZE // 2, SIZE // 3):
        a = _rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
        ref = _resize_linear(a.astype(np.float32), SIZE, SIZE)
        pil = np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR)).astype(np.float32)
        assert np.abs(np.round(ref) - pil).max() <= 1.0


def test_gaussian_blur_kernel_and_border():
    for k in BLUR_KERNEL:
        impulse = np.zeros((31, 31, 1), np.float32)
        impulse[15, 15] = 1.0
        out = _gaussian_blur(impulse, k)[..., 0]
        sigma, r = k / 6.0, k // 2
        taps = np.exp(-((np.arange(k) - r) ** 2) / (2 * sigma * sigma))
        taps /= taps.sum()
        np.testing.assert_allclose(out[15 - r:16 + r, 15 - r:16 + r], np.outer(taps, taps), atol=1e-6)
        assert abs(out.sum() - 1) < 1e-5
        flat = np.full((20, 20, 3), 77.0, np.float32)
        np.testing.assert_allclose(_gaussian_blur(flat, k), flat, atol=1e-4)
        edge = np.zeros((1, 12, 1), np.float32)
        edge[0, 0] = 1.0                       # reflect-101 mirrors about the edge pixel: no energy gained
        assert abs(_gaussian_blur(np.repeat(edge, 12, 0), k)[6, 0, 0] - taps[r]) < 1e-6


def test_ycbcr_noise_has_the_subnets_strength():
    for var in NOISE_VAR:
        n = _ycbcr_noise((200, 200, 3), var, _rng(0))
        sy, sc = 255 * 255 / 219 * math.sqrt(var), 255 * 255 / 224 * math.sqrt(var)
        expected = [math.hypot(sy, 1.403 * sc), math.sqrt(sy ** 2 + (0.714 * sc) ** 2 + (0.344 * sc) ** 2),
                    math.hypot(sy, 1.773 * sc)]
        np.testing.assert_allclose(n.reshape(-1, 3).std(0), expected, rtol=0.03)
        assert abs(n.mean()) < 0.3


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="level"):
        augment(_picture(64, 64), 4, _rng(0))
    with pytest.raises(ValueError, match="float32 array of shape"):
        augment(np.zeros((64, 64, 3), np.float32), 0, _rng(0))
    with pytest.raises(ValueError, match=r"shape \(64, 64\)"):
        augment(np.zeros((64, 64), np.uint8), 0, _rng(0))
