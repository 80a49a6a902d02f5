import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import RTDetrImageProcessorPil, ViTImageProcessorPil

from fixtures.triton_mode import KERNEL_DEVICE
from kernels.preprocess import PreprocessSpec, preprocess_into, preprocess_reference
from kernels.preprocess_triton import preprocess_triton
from runtime.errors import ModelLoadError
from runtime.models.preprocessor import preprocess_spec

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def vit_config(**overrides) -> dict:
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2,
            "size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **overrides}


def dinov3_config(**overrides) -> dict:
    # As saved by transformers for facebook/dinov3-* checkpoints, including keys that do not affect pixels.
    return {"crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
            "disable_grouping": None, "do_center_crop": None, "do_convert_rgb": None, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN,
            "image_processor_type": "DINOv3ViTImageProcessorFast", "image_std": IMAGENET_STD,
            "input_data_format": None, "resample": 2, "rescale_factor": 1 / 255, "return_tensors": None,
            "size": {"height": 32, "width": 32}, **overrides}


def rfdetr_config(**overrides) -> dict:
    # RfDetrImageProcessor as saved for a fixed-size model (its constructor is DetrImageProcessor's).
    return {"image_processor_type": "RfDetrImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_pad": True, "do_convert_annotations": True,
            "format": "coco_detection", **overrides}


def run_reference(image: torch.Tensor, spec: PreprocessSpec, dtype=torch.float32) -> torch.Tensor:
    out = torch.empty(3, spec.height, spec.width, dtype=dtype)
    preprocess_reference(image, spec, out)
    return out


def run_triton(image: torch.Tensor, spec: PreprocessSpec, dtype=torch.float32) -> torch.Tensor:
    """The kernel compiled on CUDA when there is a GPU, else under the interpreter; the result on the CPU."""
    out = torch.empty(3, spec.height, spec.width, dtype=dtype, device=KERNEL_DEVICE)
    preprocess_triton(image.to(KERNEL_DEVICE), spec, out)
    return out.cpu()


# --- reference vs transformers ----------------------------------------------------------------------------------

VIT_CASES = [  # (input h, w, processor kwargs)
    (224, 224, {}),  # the validators' images: no resize at all
    (300, 400, {}),
    (97, 61, {"size": {"height": 48, "width": 40}}),
    (13, 250, {"size": {"height": 32, "width": 64}, "resample": 3}),
    (5, 7, {"size": {"height": 30, "width": 20}}),  # upscale
    (80, 50, {"size": {"height": 20, "width": 40}}),  # height shrinks, width grows: Pillow >= 13 goes vertical first
    (120, 90, {"size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": {"height": 32, "width": 36}}),
    (60, 100, {"size": {"height": 48, "width": 48}, "do_center_crop": True, "crop_size": 40, "resample": 3}),
]


@pytest.mark.parametrize("h,w,kwargs", VIT_CASES)
def test_vit_reference_matches_transformers_pil_processor(h, w, kwargs):
    processor = ViTImageProcessorPil(**kwargs)
    spec = preprocess_spec(json.loads(processor.to_json_string()))
    image = random_image(h, w, seed=h * w)
    expected = processor(images=Image.fromarray(image.numpy()), return_tensors="np")["pixel_values"][0]
    got = run_reference(image, spec)
    assert got.shape == expected.shape
    # Pillow's resampler is called directly and rescale/normalize run the same float ops: no tolerance needed,
    # not even the usual +-1 uint8 level of a float re-implementation of Pillow's fixed point.
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("h,w,kwargs", [(224, 224, {"size": {"height": 640, "width": 640}}),
                                         (97, 130, {"size": {"height": 64, "width": 96}}),
                                         (300, 200, {"size": {"height": 128, "width": 128}, "do_normalize": True})])
def test_rtdetr_reference_matches_transformers_pil_processor(h, w, kwargs):
    """RT-DETR, D-FINE and DEIMv2 checkpoints' processor: a uint8 resize, rescale, normalization off by default."""
    processor = RTDetrImageProcessorPil(**kwargs)
    spec = preprocess_spec(json.loads(processor.to_json_string()))
    assert spec.do_normalize == kwargs.get("do_normalize", False) and not spec.resize_in_float
    image = random_image(h, w, seed=h + w)
    expected = processor(images=Image.fromarray(image.numpy()), return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(run_reference(image, spec).numpy(), expected)


def antialias_taps(in_size: int, out_size: int, mode: str) -> torch.Tensor:
    """(out_size, in_size) float64 weights of the antialiased resize, from its definition (what torch's
    antialias=True and Pillow compute; written here independently of both): output pixel i is centred at input
    coordinate c = (i + 0.5) * in/out; the filter (triangle for bilinear, Keys cubic with a = -0.5 for bicubic)
    is stretched by the downscale factor (never shrunk when upscaling); the taps are the input pixels whose
    centres lie within the stretched support, clipped at the image edges, and their weights are renormalized to
    sum to 1 (so clipped edge windows still average)."""
    a = -0.5

    def kernel(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        if mode == "bilinear":
            return np.clip(1 - x, 0, None)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = {"bilinear": 1.0, "bicubic": 2.0}[mode] * stretch
    taps = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = kernel((j + 0.5 - centre) / stretch)
        taps[i, lo:hi] = w / w.sum()
    return torch.from_numpy(taps)


def antialias_resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Separable float64 resize of (..., H, W) with the taps above."""
    rows, cols = antialias_taps(x.shape[-2], size[0], mode), antialias_taps(x.shape[-1], size[1], mode)
    return rows @ x.double() @ cols.T


def dinov3_pipeline(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """DINOv3ViTImageProcessor's order, in float64: rescale -> antialiased resize -> normalize."""
    x = antialias_resize(image.permute(2, 0, 1).double() * (1 / 255), size, mode)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    return (x - mean) / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


def test_antialias_taps_reproduce_known_weights():
    # Halving with bilinear: a 4-tap triangle [1, 3, 3, 1] / 8, clipped and renormalized at the edges.
    torch.testing.assert_close(antialias_taps(4, 2, "bilinear"), torch.tensor(
        [[3 / 7, 3 / 7, 1 / 7, 0], [0, 1 / 7, 3 / 7, 3 / 7]], dtype=torch.float64), atol=1e-15, rtol=0)
    # Same size: the identity for both filters. One output pixel of 4: the triangle stretched 4x, [5, 7, 7, 5] / 24.
    for mode in ("bilinear", "bicubic"):
        assert torch.equal(antialias_taps(5, 5, mode), torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(antialias_taps(4, 1, "bilinear"),
                               torch.tensor([[5, 7, 7, 5]], dtype=torch.float64) / 24, atol=1e-15, rtol=0)


# Output sides >= 2: torch's CPU antialias kernel (and so torchvision and transformers) gives every row the first
# row's value when the output width is 1 and the height is not (torch 2.13); no model input is 1 pixel wide.
DINOV3_RESIZE_CASES = [(224, 224, 224, 224), (300, 400, 224, 224), (17, 9, 32, 24), (100, 33, 32, 32), (1, 1, 8, 8),
                       (1000, 700, 32, 32), (3, 900, 24, 40), (45, 61, 45, 30), (640, 480, 640, 640)]
DINOV3_RESIZE_CASES += [tuple(int(v) for v in np.random.default_rng(i).integers((1, 1, 2, 2), (400, 400, 260, 260)))
                        for i in range(24)]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_dinov3_reference_matches_float64_antialias_filter(mode):
    # Measured worst |reference - float64 filter| over 200 random (input, output) sizes: 1.2e-4 (torch's float32
    # tap weights on wide downscales, on values of magnitude <= 2.7). A wrong support, centre or edge window is off by
    # > 1e-2 on these random images.
    for h, w, out_h, out_w in DINOV3_RESIZE_CASES:
        resample = {"bilinear": 2, "bicubic": 3}[mode]
        spec = preprocess_spec(dinov3_config(size={"height": out_h, "width": out_w}, resample=resample))
        image = random_image(h, w, seed=h + w)
        expected = dinov3_pipeline(image, (out_h, out_w), mode)
        torch.testing.assert_close(run_reference(image, spec).double(), expected, atol=2e-4, rtol=0,
                                   msg=lambda m: f"{(h, w, out_h, out_w)}: {m}")


def test_reference_writes_low_precision_outputs_as_cast_fp32():
    for cfg in (vit_config(), dinov3_config()):
        spec = preprocess_spec(cfg)
        for shape in ((32, 32), (70, 45)):
            image = random_image(*shape, seed=5)
            full = run_reference(image, spec)
            for dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(run_reference(image, spec, dtype), full.to(dtype))


# --- Triton kernel (compiled on CUDA, else the interpreter) vs reference -------------------------------------------------------------------


def float64_oracle(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """The DINOv3 pipeline in float64 (the independent filter above; without antialias, torch's own plain
    bilinear resize in float64): what the float32 kernel and reference both approximate."""
    resized = spec.resized_size(*image.shape[:2])
    top, left = spec.crop_offsets(*resized)
    x = image.permute(2, 0, 1).double() * spec.rescale_factor
    if spec.antialias:
        x = antialias_resize(x, resized, {2: "bilinear", 3: "bicubic"}[spec.resample])
    else:
        x = torch.nn.functional.interpolate(x[None], size=resized, mode="bilinear", align_corners=False)[0]
    x = x[:, top:top + spec.height, left:left + spec.width]
    mean = torch.tensor(spec.image_mean, dtype=torch.float64).view(3, 1, 1)
    return (x - mean) / torch.tensor(spec.image_std, dtype=torch.float64).view(3, 1, 1)


def check_kernel(image: torch.Tensor, spec: PreprocessSpec) -> None:
    got, expected = run_triton(image, spec), run_reference(image, spec)
    if spec.resize_in_float:
        # torch's CPU antialias computes tap centres and weights in float32 (up to ~1e-5 off after normalizing);
        # the kernel's host taps are float64, so it is held to the float64 pipeline much more tightly.
        torch.testing.assert_close(got, expected, atol=3e-5, rtol=0)
        torch.testing.assert_close(got.double(), float64_oracle(image, spec), atol=2e-6, rtol=0)
    else:
        # Identical uint8 levels (Pillow's fixed point reproduced); only the fused rescale*normalize differs (~1 ulp).
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


KERNEL_SHAPES = [  # (input h, w, output h, w)
    (7, 5, 32, 32),  # upscale
    (1000, 700, 32, 32),  # strong downscale: wide filter windows
    (33, 17, 20, 40),  # odd sizes; height shrinks while width grows (vertical-first in Pillow >= 13)
    (17, 33, 40, 20),
    (1, 1, 16, 16),
    (3, 900, 24, 40),  # very wide, non-square output
    (32, 32, 32, 32),  # identity
    (45, 61, 45, 30),  # one axis unchanged
]


@pytest.mark.parametrize("h,w,out_h,out_w", KERNEL_SHAPES)
@pytest.mark.parametrize("family", ["vit", "dinov3", "rfdetr"])
def test_kernel_matches_reference(h, w, out_h, out_w, family):
    make = {"vit": vit_config, "dinov3": dinov3_config, "rfdetr": rfdetr_config}[family]
    spec = preprocess_spec(make(size={"height": out_h, "width": out_w}))
    check_kernel(random_image(h, w, seed=h * 7 + w), spec)


@pytest.mark.parametrize("family", ["vit", "dinov3"])
def test_kernel_bicubic_and_center_crop(family):
    make = vit_config if family == "vit" else dinov3_config
    cfgs = [make(resample=3, size={"height": 24, "width": 40}),
            make(size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 24}),
            make(size={"shortest_edge": 40}, do_center_crop=True, crop_size=32, resample=3)]
    for cfg in cfgs:
        spec = preprocess_spec(cfg)
        for h, w in ((90, 130), (131, 57), (9, 6)):
            check_kernel(random_image(h, w, seed=h + 3 * w), spec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["vit", "dinov3"])
def test_kernel_low_precision_output(dtype, family):
    make = vit_config if family == "vit" else dinov3_config
    spec = preprocess_spec(make(size={"height": 24, "width": 40}))
    image = random_image(50, 37, seed=11)
    got = run_triton(image, spec, dtype)
    assert got.dtype == dtype
    # Both sides cast fp32 results that agree to ~1e-6, so they may differ by at most one rounding step.
    one_step = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got.float(), run_reference(image, spec, dtype).float(), atol=1e-5, rtol=one_step)


def test_kernel_writes_only_its_slot():
    spec = preprocess_spec(vit_config(size={"height": 20, "width": 28}))
    batch = torch.full((3, 3, 20, 28), 7.0, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    image = random_image(41, 23, seed=2)
    preprocess_triton(image.to(KERNEL_DEVICE), spec, batch[1])
    batch = batch.cpu()
    assert (batch[0] == 7.0).all() and (batch[2] == 7.0).all()
    torch.testing.assert_close(batch[1].float(), run_reference(image, spec, torch.bfloat16).float(),
                               atol=1e-5, rtol=2**-7)


def test_preprocess_into_cpu_uses_reference_and_only_its_slot():
    spec = preprocess_spec(dinov3_config(size={"height": 16, "width": 16}))
    batch = torch.full((4, 3, 16, 16), -3.0)
    image = random_image(30, 20, seed=4)
    preprocess_into(batch, 2, image, spec)
    assert torch.equal(batch[2], run_reference(image, spec))
    assert (batch[[0, 1, 3]] == -3.0).all()


def test_shape_errors_name_the_tensor():
    spec = preprocess_spec(vit_config())
    with pytest.raises(ValueError, match=r"image must be a \(H, W, 3\) uint8 tensor"):
        preprocess_reference(torch.zeros(8, 8, 4, dtype=torch.uint8), spec, torch.empty(3, 32, 32))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 32, 32\)"):
        preprocess_reference(random_image(8, 8), spec, torch.empty(3, 16, 32))


# --- spec parsing -----------------------------------------------------------------------------------------------


def test_spec_from_vit_configs():
    spec = preprocess_spec(json.loads(ViTImageProcessorPil().to_json_string()))
    assert (spec.height, spec.width, spec.resample, spec.resize_in_float) == (224, 224, 2, False)
    assert spec.image_mean == (0.5, 0.5, 0.5) and spec.rescale_factor == pytest.approx(1 / 255)
    # google/vit-base-patch16-224 style: legacy feature extractor, integer size, class defaults for the rest.
    legacy = preprocess_spec({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224})
    assert (legacy.height, legacy.width, legacy.do_rescale, legacy.resize_in_float) == (224, 224, True, False)


def test_spec_from_dinov3_config():
    spec = preprocess_spec(dinov3_config(size={"height": 224, "width": 224}))
    assert spec.resize_in_float and (spec.height, spec.width) == (224, 224)
    assert spec.image_mean == tuple(IMAGENET_MEAN) and spec.image_std == tuple(IMAGENET_STD)
    assert not spec.center_crop and spec.resize_to == (224, 224)


def test_spec_from_rfdetr_config():
    """RF-DETR's processor: rescale, plain (not antialiased) bilinear float resize, ImageNet normalization; its
    do_pad is a no-op at one fixed size, and refused with any other size rule."""
    spec = preprocess_spec(rfdetr_config(size={"height": 560, "width": 560}))
    assert spec.resize_in_float and not spec.antialias and spec.do_normalize and (spec.height, spec.width) == (560, 560)
    with pytest.raises(ModelLoadError, match="do_pad=true is supported only with a fixed size"):
        preprocess_spec(rfdetr_config(size={"shortest_edge": 40}, do_center_crop=True, crop_size=32))
    with pytest.raises(ModelLoadError, match="bilinear"):
        preprocess_spec(rfdetr_config(resample=3))


def test_rfdetr_reference_is_torchvision_order():
    """transformers' RfDetrImageProcessor (torchvision backend; it cannot import here) as torch ops: rescale to
    float, resize with antialias=False, normalize."""
    for h, w in ((224, 224), (1080, 1920), (50, 30)):
        image = random_image(h, w, seed=h + w)
        spec = preprocess_spec(rfdetr_config(size={"height": 112, "width": 112}))
        x = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None].float() / 255, size=(112, 112),
                                            mode="bilinear", align_corners=False, antialias=False)[0]
        want = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        torch.testing.assert_close(run_reference(image, spec), want, atol=1e-5, rtol=0)


def test_spec_shortest_edge_geometry():
    spec = preprocess_spec(vit_config(size={"shortest_edge": 256}, do_center_crop=True,
                                                              crop_size={"height": 224, "width": 224}))
    assert (spec.height, spec.width) == (224, 224)
    assert spec.resized_size(480, 640) == (256, 341) and spec.crop_offsets(256, 341) == (16, 58)
    assert spec.resized_size(640, 480) == (341, 256)


@pytest.mark.parametrize("change,message", [
    ({"resample": 1}, r"resample=1 \(lanczos\) is not supported"),
    ({"resample": 0}, r"resample=0 \(nearest\) is not supported"),
    ({"size": None}, "has no 'size'"),
    ({"size": {"longest_edge": 224}}, "size="),
    ({"size": {"height": 0, "width": 224}}, r"size.height=0 must be a positive integer"),
    ({"size": {"shortest_edge": 224}}, "without do_center_crop"),
    ({"do_center_crop": True}, "needs 'crop_size'"),
    ({"do_center_crop": True, "crop_size": 64}, "larger than the resized image"),
    ({"do_resize": False}, "do_resize=false is not supported"),
    ({"do_pad": True, "size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": 32},
     "do_pad=true is supported only with a fixed size"),
    ({"image_mean": [0.5, 0.5]}, "image_mean="),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std="),
    ({"rescale_factor": 0}, "rescale_factor=0"),
    ({"crop_pct": 0.875}, r"\['crop_pct'\] are not supported"),
    ({"image_processor_type": "ConvNextImageProcessor"}, "image_processor_type='ConvNextImageProcessor'"),
])
def test_spec_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        preprocess_spec(vit_config(**change))


def test_spec_missing_size_key():
    cfg = vit_config()
    del cfg["size"]
    with pytest.raises(ValueError, match="has no 'size'"):
        preprocess_spec(cfg)
