"""The runtime object a server calls: decoded images in, P(roadwork) per image out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.preprocess import preprocess_reference
from runtime.models.classifier import load_classifier
import runtime.cascade.precision as precision_module
from runtime.cascade.engine import Engine
from runtime.cascade.precision import cpu_has_bf16, resolve_dtype
from runtime.errors import ModelLoadError
from runtime.models.preprocessor import read_preprocess
from fixtures.checkpoints import make_dinov3, make_vit


def random_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(224, 224), (37, 91), (300, 180), (1, 1), (64, 64)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def expected(model_dir, images) -> list[float]:
    """Step by step: reference preprocessing of each image alone, then the classifier on it alone."""
    model = load_classifier(model_dir, torch.float32)
    spec = read_preprocess(model_dir)
    out = []
    for image in images:
        x = torch.empty(1, 3, spec.height, spec.width)
        preprocess_reference(torch.from_numpy(image), spec, x[0])
        with torch.no_grad():
            out.append(model(x)[0].item())
    return out


@pytest.mark.parametrize("make", [make_dinov3, make_vit], ids=["dinov3", "vit"])
def test_predict_matches_step_by_step(tmp_path, make):
    make(tmp_path)
    engine = Engine.load(tmp_path, "cpu", "float32", max_batch=4)
    engine.warmup()
    images = random_images(11)  # three chunks: 4 + 4 + 3 (bucket 4)
    results = engine.predict(images)
    assert [r.stage for r in results] == ["classifier"] * 11
    np.testing.assert_allclose([r.prediction for r in results], expected(tmp_path, images), atol=1e-5)
    for r in results:
        assert 0.0 <= r.prediction <= 1.0
        assert r.label == ("roadwork" if r.prediction > 0.5 else "none")
        assert r.scores == {"classifier": r.prediction} and not r.degraded
    assert engine.predict([]) == []


def test_bf16_engine_close_to_fp32(tmp_path):
    make_dinov3(tmp_path)
    images = random_images(5)
    fp32 = [r.prediction for r in Engine.load(tmp_path, "cpu", "float32").predict(images)]
    bf16 = [r.prediction for r in Engine.load(tmp_path, "cpu", "bfloat16").predict(images)]
    # Measured max |bf16 - fp32| on these images: 0.0055 (AVX-512 BF16 CPU); 0.015 leaves ~3x for other CPUs' bf16
    # kernels (AVX2 rounds each product's inputs the same way but blocks the sums differently).
    np.testing.assert_allclose(bf16, fp32, atol=0.015)


def test_describe(tmp_path):
    make_vit(tmp_path)
    info = Engine.load(tmp_path, "cpu", "float32", max_batch=8).describe()
    assert info["stages"][0]["model_type"] == "vit"
    assert info["stages"][0]["roadwork_label"] == "Roadwork"
    assert info["dtype"] == "float32" and info["batch_buckets"] == [1, 2, 4, 8]
    assert info["input_size"] == [32, 32]


# /proc/cpuinfo excerpts (one processor block each; flags lines shortened to what matters plus neighbours).
ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm \
pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy \
bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero \
xsaveerptr rdpru wbnoinvd arat npt nrip_save umip pku ospke vaes vpclmulqdq rdpid fsrm
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass srso
"""
ZEN4_CPUINFO = ZEN3_CPUINFO.replace("EPYC 7763 64-Core", "EPYC 9654 96-Core").replace(
    "sha_ni", "avx512f avx512dq avx512ifma avx512cd sha_ni avx512bw avx512vl").replace(
    "xsaves clzero", "xsaves avx512_bf16 clzero").replace("vaes", "avx512vbmi avx512_vbmi2 gfni vaes")
SAPPHIRE_RAPIDS_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm pni pclmulqdq ssse3 fma cx16 \
sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx \
smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni \
avx512_bf16 avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg \
tme avx512_vpopcntdq rdpid movdiri movdir64b serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 arch_lbr
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb tsc_offset vtpr mtf ept_mode_based_exec
"""
# Ice Lake: AVX-512 without BF16, so bf16 is emulated: fp32. A BF16 name outside the flags line is not a flag.
ICE_LAKE_CPUINFO = SAPPHIRE_RAPIDS_CPUINFO.replace("avx512_bf16 ", "").replace(
    " amx_bf16 avx512_fp16 amx_tile amx_int8", "").replace("8480+", "8380 amx_bf16")


@pytest.mark.parametrize("cpuinfo, has_bf16", [
    (ZEN3_CPUINFO, False), (ZEN4_CPUINFO, True), (SAPPHIRE_RAPIDS_CPUINFO, True), (ICE_LAKE_CPUINFO, False),
    (ZEN4_CPUINFO.replace("avx512_bf16", "AVX512_BF16"), False), ("", False),
], ids=["zen3-avx2", "zen4-avx512-bf16", "sapphire-rapids-amx", "ice-lake-avx512-no-bf16", "case-matters", "empty"])
def test_cpu_kind_picks_the_automatic_dtype(tmp_path, monkeypatch, cpuinfo, has_bf16):
    """The automatic CPU dtype is bf16 only where bf16 matmuls are native (and faster than fp32): never an emulated,
    slower-than-fp32 path on Zen 3 or Ice Lake."""
    (tmp_path / "cpuinfo").write_text(cpuinfo * 2)  # two processor blocks, as on a real machine
    monkeypatch.setattr(precision_module, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_has_bf16() is has_bf16
    assert resolve_dtype(None, torch.device("cpu")) == (torch.bfloat16 if has_bf16 else torch.float32)
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # an explicit choice wins
    make_vit(tmp_path / "model")
    assert Engine.load(tmp_path / "model", max_batch=1).dtype == (torch.bfloat16 if has_bf16 else torch.float32)


def test_unreadable_cpuinfo_means_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "CPUINFO", tmp_path / "missing")
    assert cpu_has_bf16() is False and resolve_dtype(None, torch.device("cpu")) == torch.float32


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine.load(tmp_path / "missing")
    make_vit(tmp_path)
    with pytest.raises(ModelLoadError, match="dtype 'int3'"):
        Engine.load(tmp_path, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            Engine.load(tmp_path, device="cuda")
    with pytest.raises(ModelLoadError, match="not a valid torch device"):
        Engine.load(tmp_path, device="gpu7")
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="preprocessor_config.json: file not found"):
        Engine.load(tmp_path)


def test_single_classifier_dir_is_a_one_stage_cascade(tmp_path):
    make_vit(tmp_path)
    engine = Engine.load(tmp_path, "cpu", "float32", max_batch=2)
    assert engine.stage_states() == {} and engine.describe()["bundle"] is False
    results = engine.predict(random_images(3), boxes=True)
    assert [r.boxes for r in results] == [None] * 3 and all(r.detector_scores == {} for r in results)
