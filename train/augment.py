"""The NATIX StreetVision validator's challenge augmentations, with boxes carried along for detector data.

Re-implemented on PIL + numpy with an explicit Generator, following natix/utils/image_transforms.py
(streetvision-subnet 2.0.x, apply_augmentation_by_level):

  level 0  centre square crop, bilinear resize to 224x224.
  level 1  rotation by U(-20, 20) degrees about the centre (bilinear, black corners, canvas kept); a
           square crop covering U(0.2, 1.0) of the rotated image's AREA (torchvision RandomResizedCrop
           with ratio 1: ten tries, then the centred full-height square); resize to 224; horizontal flip
           p=1/2; vertical flip p=1/2.
  level 2  level 1, then each at strength 0 or 1 (p=1/2): saturation (chroma x0.4), "contrast" (the
           subnet multiplies pixel values by 0.85, i.e. it darkens), "JPEG" (the subnet's DeeperForensics
           distortion: a bilinear resample down by 2 and back up, not an encoder quality change).
  level 3  level 1, then saturation x0.4 / x0.3, contrast x0.85 / x0.725, down-up by 2 / 3, Gaussian colour
           noise (YCbCr variance 0.001 / 0.002), Gaussian blur (kernel 7 / 9, sigma k/6), each at strength
           0, 1 or 2 (p=1/3).
The result is encoded as JPEG at PIL's default quality 75, as the validator does when it builds the synapse.
Pixel values match the subnet up to rounding (it truncates floats to uint8 between steps).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 224
LEVELS = (0, 1, 2, 3)
MAX_ROTATION = 20.0
CROP_AREA = (0.2, 1.0)
CROP_TRIES = 10
JPEG_QUALITY = 75
MIN_VISIBLE = 0.4    # share of a box's transformed area that must stay in frame to keep it

SATURATION = (0.4, 0.3)       # chroma factor at strength 1, 2
CONTRAST = (0.85, 0.725)      # pixel multiplier
DOWNSCALE = (2, 3)            # resample factor
NOISE_VAR = (0.001, 0.002)    # per-channel variance in the subnet's YCbCr space
BLUR_KERNEL = (7, 9)          # sigma = kernel / 6

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class AugmentParams:
    level: int
    angle: float = 0.0
    crop: tuple[int, int, int] = (0, 0, 0)    # x, y, side in the (rotated) input
    hflip: bool = False
    vflip: bool = False
    saturation: float | None = None
    contrast: float | None = None
    downscale: int | None = None
    noise_var: float | None = None
    blur_kernel: int | None = None


@dataclass
class Augmented:
    image: np.ndarray      # (224, 224, 3) uint8, before JPEG encoding
    jpeg: bytes            # what a miner receives
    boxes: np.ndarray      # (M, 4) float32 x0, y0, x1, y1 in the 224x224 frame
    kept: np.ndarray       # (M,) int64: which input boxes these are
    params: AugmentParams


def _as_image(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a PIL image or a uint8 (H, W, 3) RGB array, got {got}")
    return Image.fromarray(image)


def _check_level(level: int) -> None:
    if level not in LEVELS:
        raise ValueError(f"augmentation level must be one of {LEVELS}, got {level!r}")


def _crop_window(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """torchvision RandomResizedCrop.get_params with ratio (1, 1): x, y, side."""
    area = w * h
    for _ in range(CROP_TRIES):
        side = int(round(math.sqrt(area * float(rng.uniform(*CROP_AREA)))))
        if 0 < side <= w and side <= h:
            y = int(rng.integers(0, h - side + 1))
            x = int(rng.integers(0, w - side + 1))
            return x, y, side
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side


def _geometry(image: Image.Image, level: int, rng: np.random.Generator, params: AugmentParams) -> Image.Image:
    w, h = image.size
    if level == 0:
        side = min(w, h)
        params.crop = (int(round((w - side) / 2)), int(round((h - side) / 2)), side)
    else:
        params.angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        image = image.rotate(params.angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
        params.crop = _crop_window(w, h, rng)
        params.hflip = bool(rng.random() < 0.5)
        params.vflip = bool(rng.random() < 0.5)
    x, y, side = params.crop
    # crop, then resize: resize(box=...) would let the filter read pixels outside the crop
    out = image.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)
    if params.hflip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if params.vflip:
        out = out.transpose(Image.FLIP_TOP_BOTTOM)
    return out


def _strength(rng: np.random.Generator, top: int) -> int:
    return int(rng.integers(0, top + 1))


def _draw_distortions(level: int, rng: np.random.Generator, params: AugmentParams) -> None:
    if level < 2:
        return
    top = 1 if level == 2 else 2
    if k := _strength(rng, top):
        params.saturation = SATURATION[k - 1]
    if k := _strength(rng, top):
        params.contrast = CONTRAST[k - 1]
    if k := _strength(rng, top):
        params.downscale = DOWNSCALE[k - 1]
    if level == 3:
        if k := _strength(rng, top):
            params.noise_var = NOISE_VAR[k - 1]
        if k := _strength(rng, top):
            params.blur_kernel = BLUR_KERNEL[k - 1]


def _resize_linear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV INTER_LINEAR semantics (half-pixel centres, edge clamp, no antialiasing), float32 in and out."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(src.astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    lo, hi, f = axis(a.shape[0], out_h)
    a = a[lo] * (1 - f)[:, None, None] + a[hi] * f[:, None, None]
    lo, hi, f = axis(a.shape[1], out_w)
    return a[:, lo] * (1 - f)[None, :, None] + a[:, hi] * f[None, :, None]


def _gaussian_blur(a: np.ndarray, kernel: int) -> np.ndarray:
    """OpenCV GaussianBlur(ksize=kernel, sigma=kernel/6) with its default reflect-101 border."""
    sigma = kernel / 6.0
    r = kernel // 2
    taps = np.exp(-((np.arange(kernel, dtype=np.float32) - r) ** 2) / (2 * sigma * sigma))
    taps /= taps.sum()
    padded = np.pad(a, ((r, r), (0, 0), (0, 0)), mode="reflect")
    a = sum(taps[i] * padded[i:i + a.shape[0]] for i in range(kernel))
    padded = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(taps[i] * padded[:, i:i + a.shape[1]] for i in range(kernel))


# The subnet adds noise to YCbCr planes rescaled by 219/255 (Y) and 224/255 (Cb, Cr); this maps such noise
# (rows Y, Cb, Cr) to RGB (columns) with OpenCV's YCrCb -> RGB coefficients.
NOISE_TO_RGB = np.diag(np.array([255 / 219, 255 / 224, 255 / 224], np.float32)) @ np.array(
    [[1.0, 1.0, 1.0], [0.0, -0.344, 1.773], [1.403, -0.714, 0.0]], np.float32)


def _ycbcr_noise(shape: tuple[int, ...], var: float, rng: np.random.Generator) -> np.ndarray:
    """RGB noise equal to the subnet's N(0, var) added to its rescaled (Y, Cb, Cr) planes."""
    n = rng.standard_normal(shape, dtype=np.float32) * np.float32(255.0 * math.sqrt(var))
    return n @ NOISE_TO_RGB


def _photometric(image: Image.Image, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """The level 2/3 distortions in the subnet's order, uint8 between steps as there."""
    if params.saturation is not None:
        s = params.saturation
        rows = [[(1 - s) * LUMA[k] + (s if k == ch else 0.0) for k in range(3)] + [0.0] for ch in range(3)]
        image = image.convert("RGB", tuple(float(v) for row in rows for v in row))
    if params.contrast is not None:
        c = params.contrast
        image = image.convert("RGB", (c, 0, 0, 0, 0, c, 0, 0, 0, 0, c, 0))
    if params.downscale is not None:
        side = SIZE // params.downscale
        small = _resize_linear(np.asarray(image, dtype=np.float32), side, side)
        # when enlarging, PIL's bilinear matches OpenCV's INTER_LINEAR to within 1 level (checked in tests)
        image = Image.fromarray(np.clip(np.round(small), 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    a = np.asarray(image)
    if params.noise_var is not None:
        noisy = a.astype(np.float32) + _ycbcr_noise(a.shape, params.noise_var, rng)
        a = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if params.blur_kernel is not None:
        a = np.clip(np.round(_gaussian_blur(a.astype(np.float32), params.blur_kernel)), 0, 255).astype(np.uint8)
    return a


def _encode(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _transform_boxes(boxes: np.ndarray, size: tuple[int, int], params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Carry boxes through rotation (enclosing box of the turned corners), crop, resize and flips."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if params.angle:
        w, h = size
        cx, cy = w / 2.0, h / 2.0
        th = math.radians(params.angle)
        c, s = math.cos(th), math.sin(th)
        xs = b[:, [0, 2, 2, 0]] - cx
        ys = b[:, [1, 1, 3, 3]] - cy
        # PIL turns the picture counter-clockwise on screen (y points down)
        rx = cx + xs * c + ys * s
        ry = cy - xs * s + ys * c
        b = np.stack([rx.min(1), ry.min(1), rx.max(1), ry.max(1)], axis=1)
    x, y, side = params.crop
    b = (b - [x, y, x, y]) * (SIZE / side)
    if params.hflip:
        b = np.stack([SIZE - b[:, 2], b[:, 1], SIZE - b[:, 0], b[:, 3]], axis=1)
    if params.vflip:
        b = np.stack([b[:, 0], SIZE - b[:, 3], b[:, 2], SIZE - b[:, 1]], axis=1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    clipped = np.clip(b, 0, SIZE)
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1) & \
           (inside >= MIN_VISIBLE * np.maximum(area, 1e-9))
    kept = np.flatnonzero(keep)
    return clipped[kept].astype(np.float32), kept


def augment_with_boxes(image: Image.Image | np.ndarray, boxes: np.ndarray, level: int,
                       rng: np.random.Generator) -> Augmented:
    """Augment like the validator at `level` and move boxes (x0, y0, x1, y1 pixels) along.

    Boxes left with less than MIN_VISIBLE of their area in frame are dropped; `kept` says which
    survived. Draws from rng exactly as augment() does, so both give the same picture."""
    _check_level(level)
    pil = _as_image(image)
    params = AugmentParams(level)
    geo = _geometry(pil, level, rng, params)
    _draw_distortions(level, rng, params)
    pixels = _photometric(geo, params, rng)
    out_boxes, kept = _transform_boxes(boxes, pil.size, params)
    return Augmented(pixels, _encode(pixels), out_boxes, kept, params)


def augment_array(image: Image.Image | np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """The augmented (224, 224, 3) uint8 pixels before JPEG encoding."""
    _check_level(level)
    params = AugmentParams(level)
    geo = _geometry(_as_image(image), level, rng, params)
    _draw_distortions(level, rng, params)
    return _photometric(geo, params, rng)


def augment(image: Image.Image | np.ndarray, level: int, rng: np.random.Generator) -> bytes:
    """The JPEG bytes a validator would send for this image at this augmentation level."""
    return _encode(augment_array(image, level, rng))
