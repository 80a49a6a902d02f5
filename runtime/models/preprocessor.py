"""A Hugging Face preprocessor_config.json as the kernels' specs: PreprocessSpec (ViT, DINOv3, RT-DETR and RF-DETR
image processors, kernels/preprocess.py) and VisionPreprocessSpec (Qwen2-VL image processor, kernels/vlm_preprocess.py).

Every key is either reproduced, known not to touch the pixels, or refused with an error naming the file and key."""
from __future__ import annotations

from pathlib import Path

from kernels.preprocess import BICUBIC, BILINEAR, PreprocessSpec
from kernels.vlm_preprocess import VisionPreprocessSpec
from runtime.config import ConfigReader, read_json

FILE = "preprocessor_config.json"
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
SUPPORTED_RESAMPLE = (BILINEAR, BICUBIC)

# transformers' class defaults, used when a config omits the key.
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # ViTImageProcessor
IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv3ViTImageProcessor
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # Qwen2VLImageProcessor
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
QWEN_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")

# Keys that describe input handling or the output container, never the pixels we produce.
INERT_KEYS = frozenset({
    "processor_class", "do_convert_rgb", "data_format", "input_data_format", "device", "return_tensors",
    "disable_grouping", "_valid_processor_keys",
})
IMAGE_KEYS = frozenset({
    "image_processor_type", "feature_extractor_type", "do_resize", "size", "default_to_square", "resample",
    "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_pad", "pad_size",
    "format", "do_convert_annotations",  # detection processors: how training annotations are read
}) | INERT_KEYS
VISION_KEYS = frozenset({
    "image_processor_type", "do_resize", "size", "min_pixels", "max_pixels", "resample", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size",
    "default_to_square",
}) | INERT_KEYS


def read_preprocess(model_dir: Path) -> PreprocessSpec:
    """The classifier/detector input spec of a model directory."""
    path = Path(model_dir) / FILE
    return preprocess_spec(read_json(path), str(path))


def read_vision_preprocess(model_dir: Path) -> VisionPreprocessSpec:
    """The Qwen3-VL vision input spec of a model directory."""
    path = Path(model_dir) / FILE
    return vision_preprocess_spec(read_json(path), str(path))


def positive_int(r: ConfigReader, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        r.fail(f"{key}={value!r} must be a positive integer")
    return value


def three_floats(r: ConfigReader, key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    """A number or 3 numbers (RGB) as 3 floats."""
    value = r.data.get(key, default)
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        r.fail(f"{key}={value!r} must be a number or a list of 3 numbers (RGB)")
    return (float(values[0]), float(values[1]), float(values[2]))


def height_width(r: ConfigReader, key: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return positive_int(r, key, value), value
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return positive_int(r, f"{key}.height", value["height"]), positive_int(r, f"{key}.width", value["width"])
    r.fail(f"{key}={value!r} must be an integer or {{'height': H, 'width': W}}")


def unknown_keys(r: ConfigReader, known: frozenset[str]) -> None:
    r.check(not r.unknown(known), f"key(s) {r.unknown(known)} are not supported")


def resample(r: ConfigReader, default: int) -> int:
    value = r.data.get("resample", default)
    if value not in SUPPORTED_RESAMPLE or isinstance(value, bool):
        name = RESAMPLE_NAMES.get(value, "unknown") if isinstance(value, int) else "unknown"
        r.fail(f"resample={value!r} ({name}) is not supported; use 2 (bilinear) or 3 (bicubic)")
    return value


def rescale_factor(r: ConfigReader) -> float:
    value = r.data.get("rescale_factor", 1 / 255)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        r.fail(f"rescale_factor={value!r} must be a positive number")
    return float(value)


def mean_std(r: ConfigReader, defaults: tuple[tuple[float, ...], tuple[float, ...]]
             ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    mean, std = three_floats(r, "image_mean", defaults[0]), three_floats(r, "image_std", defaults[1])
    r.check(min(std) > 0, f"image_std={r.data.get('image_std')!r} must be positive")
    return mean, std


def preprocess_spec(cfg: dict, source: str = FILE) -> PreprocessSpec:
    """A ViT*, DINOv3*, RTDetr*, RfDetr* or Sam3* image processor's config as the spec of one fixed-size model input."""
    r = ConfigReader(cfg, source)
    unknown_keys(r, IMAGE_KEYS)
    kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    r.check(isinstance(kind, str), "has no 'image_processor_type'")
    normalize_default, antialias = True, True
    if kind.startswith("DINOv3"):
        resize_in_float, defaults = True, IMAGENET_DEFAULT
    elif kind.startswith(("ViT", "Sam3")):  # Sam3: torchvision's uint8 antialiased resize, which is Pillow's
        resize_in_float, defaults = False, IMAGENET_STANDARD
    elif kind.startswith("RTDetr"):  # RT-DETR, D-FINE, DEIMv2: uint8 resize, then rescale; no normalization
        resize_in_float, defaults, normalize_default = False, IMAGENET_DEFAULT, False
    elif kind.startswith("RfDetr"):  # torchvision's order: rescale, plain bilinear float resize, normalize
        resize_in_float, defaults, antialias = True, IMAGENET_DEFAULT, False
        r.check(cfg.get("resample", BILINEAR) == BILINEAR, f"resample={cfg.get('resample')!r}: RfDetr* processors "
                                                            "are supported with bilinear (2) only")
    else:
        r.fail(f"image_processor_type={kind!r} is not supported (ViT*, DINOv3*, RTDetr*, RfDetr* and Sam3* "
               "image processors are)")

    r.check(cfg.get("do_resize", True), "do_resize=false is not supported: the static batch buffer needs one "
                                        "input size, so every image is resized")
    # Padding to the batch's largest image is a no-op at one fixed size (a size without a crop or a shortest edge).
    fixed_size = isinstance(cfg.get("size"), dict) and set(cfg["size"]) == {"height", "width"}
    r.check(not cfg.get("do_pad") or (fixed_size and not cfg.get("do_center_crop")),
            "do_pad=true is supported only with a fixed size {'height': H, 'width': W}")
    resample_code = resample(r, BILINEAR)

    r.check(cfg.get("size") is not None, "has no 'size'")
    size = cfg["size"]
    resize_to, shortest_edge = None, None
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        shortest_edge = positive_int(r, "size.shortest_edge", size["shortest_edge"])
    elif isinstance(size, int) and not isinstance(size, bool) and cfg.get("default_to_square") is False:
        shortest_edge = positive_int(r, "size", size)
    else:
        resize_to = height_width(r, "size", size)

    center_crop = bool(cfg.get("do_center_crop"))
    if center_crop:
        r.check(cfg.get("crop_size") is not None, "do_center_crop=true needs 'crop_size'")
        height, width = height_width(r, "crop_size", cfg["crop_size"])
        # A crop larger than the resized image would need padding; shortest_edge bounds the resized size.
        limit = (shortest_edge, shortest_edge) if resize_to is None else resize_to
        r.check(height <= limit[0] and width <= limit[1], f"crop_size={cfg['crop_size']!r} is larger than the "
                                                           f"resized image (size={size!r}); padding is not supported")
    elif resize_to is None:
        r.fail(f"size={size!r} without do_center_crop gives every image its own output size; the static batch "
               "buffer needs a fixed one")
    else:
        height, width = resize_to

    factor = rescale_factor(r)
    image_mean, image_std = mean_std(r, defaults)
    return PreprocessSpec(height=height, width=width, resize_to=resize_to, shortest_edge=shortest_edge,
                          center_crop=center_crop, resample=resample_code, resize_in_float=resize_in_float,
                          do_rescale=bool(cfg.get("do_rescale", True)), rescale_factor=factor,
                          do_normalize=bool(cfg.get("do_normalize", normalize_default)), image_mean=image_mean,
                          image_std=image_std, antialias=antialias)


def vision_preprocess_spec(cfg: dict, source: str = FILE) -> VisionPreprocessSpec:
    """A Qwen2-VL image processor's config as the spec of the vision tower's input rows."""
    r = ConfigReader(cfg, source)
    unknown_keys(r, VISION_KEYS)
    kind = cfg.get("image_processor_type")
    r.check(kind in QWEN_TYPES, f"image_processor_type={kind!r} is not supported (supported: {', '.join(QWEN_TYPES)})")
    size = cfg.get("size") or {}
    r.check(isinstance(size, dict), f"size={size!r} must be {{'shortest_edge': min_pixels, 'longest_edge': "
                                    f"max_pixels}}")
    # Legacy top-level min_pixels/max_pixels override size, as transformers does.
    min_pixels = positive_int(r, "min_pixels", cfg.get("min_pixels", size.get("shortest_edge", QWEN_MIN_PIXELS)))
    max_pixels = positive_int(r, "max_pixels", cfg.get("max_pixels", size.get("longest_edge", QWEN_MAX_PIXELS)))
    r.check(min_pixels <= max_pixels, f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    resample_code = resample(r, BICUBIC)
    factor = rescale_factor(r)
    image_mean, image_std = mean_std(r, OPENAI_CLIP)
    return VisionPreprocessSpec(min_pixels=min_pixels, max_pixels=max_pixels,
                                patch_size=positive_int(r, "patch_size", cfg.get("patch_size", 14)),
                                temporal_patch_size=positive_int(r, "temporal_patch_size",
                                                                 cfg.get("temporal_patch_size", 2)),
                                merge_size=positive_int(r, "merge_size", cfg.get("merge_size", 2)),
                                resample=resample_code, do_resize=bool(cfg.get("do_resize", True)),
                                do_rescale=bool(cfg.get("do_rescale", True)), rescale_factor=factor,
                                do_normalize=bool(cfg.get("do_normalize", True)), image_mean=image_mean,
                                image_std=image_std)
