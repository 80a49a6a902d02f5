"""Every benchmark runs at a tiny size (so none can rot), and the FLOP formula matches torch's own count.

These check that the benchmarks run and report what they claim to, never how fast anything is."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import flops, int8, kernels, mfu, peak, scaling, serve_vs_miner
from bench.common import preset_config
from runtime.models.classifier import load_classifier
from fixtures.checkpoints import make_dinov3, make_vit


def counted_flops(model: torch.nn.Module, size: int) -> int:
    # The math attention backend runs as matmuls the counter sees (it has no formula for CPU flash attention).
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


@pytest.mark.parametrize("kind, overrides", [
    ("dinov3", {}),
    ("dinov3", {"use_gated_mlp": True, "num_register_tokens": 0}),
    ("vit", {}),
])
def test_flop_formula_matches_flop_counter(tmp_path, kind, overrides):
    (make_dinov3 if kind == "dinov3" else make_vit)(tmp_path, **overrides)
    cfg = json.loads((tmp_path / "config.json").read_text())
    model = load_classifier(tmp_path, torch.float32)
    assert flops.vision_flops(cfg).total == counted_flops(model, 32)
    if kind == "dinov3":  # RoPE takes other resolutions; the formula follows the token count
        assert flops.vision_flops(cfg, 64).total == counted_flops(model, 64)


def test_flop_formula_real_sizes():
    assert flops.vision_flops(preset_config("dinov3-vits16")).total == pytest.approx(9.40e9, rel=0.005)
    assert flops.vision_flops(preset_config("vit-b16")).total == pytest.approx(35.1e9, rel=0.005)
    with pytest.raises(ValueError, match="multiple of the patch"):
        flops.vision_flops(preset_config("dinov3-vits16"), 230)
    with pytest.raises(ValueError, match="model_type"):
        flops.vision_flops({"model_type": "resnet"})


def test_flops_cli(capsys):
    rows = flops.main(["--preset", "vit-b16"])
    assert rows[0]["total_gflop"] == pytest.approx(35.1, rel=0.005)
    assert "GFLOP per image" in capsys.readouterr().out


def test_peak(tmp_path):
    out = tmp_path / "peak.json"
    rows = peak.main(["--size", "64", "--rounds", "1", "--json", str(out)])
    assert [r["dtype"] for r in rows] == ["fp32", "bf16", "fp16", "int8", "int8-fbgemm", "int8-onednn"]
    assert all(r["gflop_s"] > 0 for r in rows) and rows[0]["vs_fp32"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "peak" and "cpu" in saved["machine"]


def test_mfu(capsys):
    rows = mfu.main(["--preset", "tiny", "--batch", "2", "--rounds", "1", "--peak-size", "64"])
    assert [r["dtype"] for r in rows] == ["fp32", "bf16", "int8", "int8-fbgemm", "int8-onednn", "auto"]
    assert all(0 < r["mfu"] and r["img_s"] > 0 for r in rows)
    assert rows[1]["speedup_vs_bf16"] == 1.0 and rows[0]["speedup_vs_fp32"] == 1.0
    assert rows[-1]["chosen"] and "auto on tiny: " in capsys.readouterr().out


def test_kernels(capsys):
    rows = kernels.main(["--device", "cpu", "--min-time", "0.01"])
    out = capsys.readouterr().out
    assert {r["kernel"] for r in rows} >= {"preprocess"}
    assert all(r["ref_us_per_image"] > 0 for r in rows)
    for name in ("route", "vote"):  # either measured or skipped with a note, never silently absent
        assert any(r["kernel"] == name for r in rows) or f"kernels/{name}.py: skipped" in out


def test_scaling():
    report = scaling.main(["--preset", "tiny", "--batches", "2", "--sides", "32,48", "--resolutions", "32,64",
                           "--cache-entries", "200", "--min-time", "0.01"])
    assert [r["batch"] for r in report["batch"]] == [2]
    assert [r["side"] for r in report["side"]] == [32, 48]
    assert [r["tokens"] for r in report["resolution"]] == [9, 21]
    [memory] = report["memory_batch"]
    assert memory["peak_reset"] and memory["peak_rss_mb"] >= 0.95 * memory["rss_after_load_mb"] > 0
    [cache] = report["memory_cache"]
    assert cache["entries"] == 200 and cache["estimated_bytes_per_entry"] > 0


def test_int8_accuracy():
    result = int8.main(["--case", "parity-vit", "--images", "4", "--batch", "4", "--no-speed"])
    rows = {r["dtype"]: r for r in result["accuracy"]}
    assert set(rows) == {"fp32", "bf16", "int8"}
    assert rows["fp32"]["max_drift"] == 0 and rows["int8"]["max_drift"] < 0.1
    assert int8.mcc(torch.tensor([1, 0, 1]).bool().numpy(), torch.tensor([1, 0, 1]).bool().numpy()) == 1.0


def test_serve_vs_miner():
    summary = serve_vs_miner.main(["--preset", "tiny-vit", "--concurrency", "1,2", "--requests", "6",
                                   "--duration", "5", "--images", "4", "--max-batch", "2", "--offline-batches", "1"])
    levels = summary["levels"]
    servers = ("baseline", "server", "server-int8")
    assert {(r["server"], r["concurrency"]) for r in levels} == {(s, c) for s in servers for c in (1, 2)}
    assert all(r["ok"] > 0 and r["errors"] == 0 for r in levels), levels
    assert [(r["server"], r["concurrency"]) for r in summary["ratios"]] == [(s, c) for s in servers[1:] for c in (1, 2)]
    assert all(summary["checks"][s]["first_request_ms"] > 0 for s in servers[1:])


def test_score_bench(tmp_path):
    from bench import score as score_bench

    make_vit(tmp_path / "vit", seed=1)
    result = score_bench.main(["--tiny", "--model", str(tmp_path / "vit"), "--dtype", "float32",
                               "--json", str(tmp_path / "r.json")])
    assert result["images"] == 16 and result["offline_images_per_s"] > 0 and result["score_images_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["machine"]["cpu"]


def test_vlm_memory_table():
    from bench.vlm_memory import QWEN3_VL, memory_rows, model_config, weight_bytes
    rows = {(r["model"], r["weights"], r["kv"]): r for r in memory_rows()}
    assert len(rows) == 3 * 3 * 2
    for name in QWEN3_VL:
        b = weight_bytes(model_config(name))
        assert b["int4"] < b["fp8"] < b["bf16"]
        assert rows[name, "bf16", "int8"]["concurrent_224px_requests"] > 1.9 * rows[name, "bf16", "bf16"][
            "concurrent_224px_requests"]
    # Qwen3-VL-8B is about 8.8 B parameters: ~16 GiB in bf16
    assert 15 < rows["8B", "bf16", "bf16"]["weights_GiB"] < 17.5
