"""Every benchmark runs at a tiny size (so none can rot), and the FLOP formula matches torch's own count.

These check that the benchmarks run and report what they claim to, never how fast anything is."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import compile as compile_bench
from bench import auto_precision, engines, flops, int8, kernels, mfu, peak, scaling, serve_vs_miner, vision
from bench.common import preset_config
from runtime.models.classifier import load_classifier
from fixtures.checkpoints import make_dinov3, make_vit
from runtime.image_decode import decode_image


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


def printed_table(out: str, columns: list[str]) -> list[dict]:
    """The rows of the table print_table wrote with these columns, parsed back from the text (3 significant
    digits, so ratios recomputed from it hold to ~0.5% per printed number)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == columns)
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(columns):
            break
        rows.append({c: v if c in ("dtype", "preset", "server", "case", "model") else float(v) for c, v in zip(columns, cells)})
    return rows


def test_peak(tmp_path, capsys):
    out = tmp_path / "peak.json"
    rows = peak.main(["--size", "64", "--rounds", "1", "--json", str(out)])
    assert [r["dtype"] for r in rows] == ["fp32", "bf16", "fp16", "int8", "int8-fbgemm", "int8-onednn"]
    assert all(r["gflop_s"] > 0 for r in rows) and rows[0]["vs_fp32"] == 1.0
    # Each printed ratio is the printed rates' quotient: a ratio taken against the wrong row or inverted fails.
    printed = {r["dtype"]: r for r in printed_table(capsys.readouterr().out, ["dtype", "size", "gflop_s", "vs_fp32",
                                                                              "vs_bf16"])}
    assert set(printed) == {r["dtype"] for r in rows}
    for r in printed.values():
        assert r["vs_fp32"] == pytest.approx(r["gflop_s"] / printed["fp32"]["gflop_s"], rel=0.01)
        assert r["vs_bf16"] == pytest.approx(r["gflop_s"] / printed["bf16"]["gflop_s"], rel=0.01)
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "peak" and "cpu" in saved["machine"] and saved["rows"] == rows


def test_mfu(capsys):
    rows = mfu.main(["--preset", "tiny", "--batch", "2", "--rounds", "1", "--peak-size", "64"])
    assert [r["dtype"] for r in rows] == ["fp32", "bf16", "int8", "int8-fbgemm", "int8-onednn", "auto"]
    assert all(0 < r["mfu"] and r["img_s"] > 0 for r in rows)
    assert rows[1]["speedup_vs_bf16"] == 1.0 and rows[0]["speedup_vs_fp32"] == 1.0
    per_image = flops.vision_flops(preset_config("tiny")).total
    for r in rows:  # every derived column recomputed from the raw rates
        assert r["gflop_s"] == pytest.approx(per_image * r["img_s"] / 1e9, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["gflop_s"] / r["peak_gflop_s"], rel=1e-9)
    out = capsys.readouterr().out
    assert rows[-1]["chosen"] and "auto on tiny: " in out
    printed = {r["dtype"]: r for r in printed_table(out, [
        "preset", "dtype", "batch", "img_s", "gflop_s", "peak_gflop_s", "mfu", "speedup_vs_bf16", "speedup_vs_fp32"])}
    for name in ("fp32", "int8", "int8-fbgemm", "int8-onednn"):
        assert printed[name]["speedup_vs_bf16"] == pytest.approx(printed[name]["img_s"] / printed["bf16"]["img_s"],
                                                                 rel=0.01)
        assert printed[name]["speedup_vs_fp32"] == pytest.approx(printed[name]["img_s"] / printed["fp32"]["img_s"],
                                                                 rel=0.01)


def test_auto_precision(tmp_path, capsys):
    out = tmp_path / "auto.json"
    result = auto_precision.main(["--preset", "tiny-vit", "--starts", "2", "--held-out", "8", "--json", str(out)])
    starts = {r["start"]: r for r in result["starts"]}
    assert list(starts) == ["uncached 1", "uncached 2", "writes the cache", "cached"]
    assert sum(result["choices"].values()) == 2 and starts["cached"]["chosen"] == starts["writes the cache"]["chosen"]
    assert starts["cached"]["seconds"] < starts["writes the cache"]["seconds"]
    chosen = result["drifts"][0]
    assert chosen["chosen"] and chosen["candidate"] == starts["cached"]["chosen"]
    assert all(d["held_out_max_drift"] >= 0 and d["held_out_flips"] >= 0 for d in result["drifts"])
    assert "held-out images" in capsys.readouterr().out and json.loads(out.read_text())["drifts"] == result["drifts"]


def test_engines(tmp_path, capsys):
    out = tmp_path / "engines.json"
    rows = engines.main(["--preset", "tiny-vit", "--batches", "1,2", "--inputs", "4", "--rounds", "1",
                         "--json", str(out)])
    by = {r["engine"]: r for r in rows}
    assert set(by) == {e for e in engines.DEFAULT_ENGINES
                       if not e.startswith("runtime+") or engines.backend_available(e.split("+")[1])}
    assert by["runtime"]["max_dP"] == 0 and by["transformers"]["max_dP"] < 1e-5 and by["ort"]["max_dP"] < 1e-5
    for r in rows:
        assert r["b2_vs_transformers"] == pytest.approx(r["b2_img_s"] / by["transformers"]["b2_img_s"])
        assert 0 <= r["flips"] <= 4
    assert json.loads(out.read_text())["rows"] == rows and "ort+int8-static" in capsys.readouterr().out


def test_kernels(capsys):
    rows = kernels.main(["--device", "cpu", "--min-time", "0.01"])
    out = capsys.readouterr().out
    assert {r["kernel"] for r in rows} >= {"preprocess"}
    assert all(r["ref_us_per_image"] > 0 for r in rows)
    for name in ("route", "vote", "nms"):  # either measured or skipped with a note, never silently absent
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
    # The drifts recomputed here from each dtype's own engine: a row reporting another dtype's numbers (or fp32's
    # zeros) fails. Measured on these 4 images: bf16 max 0.0023, int8 max 0.0083; bounds 4x / 3x.
    with tempfile.TemporaryDirectory() as tmp:
        int8.write_case("parity-vit", Path(tmp))
        jpegs, _ = int8.eval_set(4)
        images = [decode_image(j) for j in jpegs]
        probs = {name: np.array([r.prediction for r in int8.load_engine(Path(tmp), name, 4).predict(images)])
                 for name in rows}
    for name, row in rows.items():
        drift = np.abs(probs[name] - probs["fp32"])
        assert row["max_drift"] == pytest.approx(drift.max(), abs=1e-6)
        assert row["mean_drift"] == pytest.approx(drift.mean(), abs=1e-6)
    assert 0 < rows["bf16"]["max_drift"] <= 0.01 and 0 < rows["int8"]["max_drift"] <= 0.025
    # MCC against hand-computed confusion matrices: TP 2, FP 1, FN 0, TN 1 -> 2 / sqrt(12); perfect; inverted.
    pred, truth = np.array([1, 1, 1, 0], bool), np.array([1, 1, 0, 0], bool)
    assert int8.mcc(pred, truth) == pytest.approx(2 / 12 ** 0.5, rel=1e-12)
    assert int8.mcc(truth, truth) == 1.0 and int8.mcc(~truth, truth) == -1.0


def test_compile_with_pt2e_int8(capsys):
    result = compile_bench.main(["--preset", "tiny", "--batch", "2", "--rounds", "1",
                                 "--int8", "pt2e-dynamic,pt2e-static"])
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["eager", "compiled", "pt2e-dynamic", "pt2e-static"]
    printed = {r["model"]: r for r in printed_table(capsys.readouterr().out,
                                                     ["model", "img_s", "vs_eager", "startup_s", "max_drift"])}
    for name, r in printed.items():  # each speedup is the printed rates' quotient
        assert r["vs_eager"] == pytest.approx(r["img_s"] / printed["eager"]["img_s"], rel=0.01), name
    assert all(rows[m]["startup_s"] > 0 for m in ("compiled", "pt2e-dynamic", "pt2e-static"))
    # int8 moves P, but on the tiny model by little: a broken flow (wrong outputs, the head's logit) moves it more
    assert all(0 < rows[m]["max_drift"] < 0.05 for m in ("pt2e-dynamic", "pt2e-static"))


def test_serve_vs_miner():
    summary = serve_vs_miner.main(["--preset", "tiny-vit", "--concurrency", "1,2", "--requests", "6",
                                   "--duration", "5", "--images", "4", "--max-batch", "2", "--offline-batches", "1",
                                   "--servers", "baseline,server-auto,server-onednn", "--peak-size", "64"])
    levels = summary["levels"]
    servers = ("baseline", "server-auto", "server-onednn")
    assert {(r["server"], r["concurrency"]) for r in levels} == {(s, c) for s in servers for c in (1, 2)}
    assert all(r["ok"] > 0 and r["errors"] == 0 for r in levels), levels
    assert [(r["server"], r["concurrency"]) for r in summary["ratios"]] == [(s, c) for s in servers[1:] for c in (1, 2)]
    assert all(summary["checks"][s]["first_request_ms"] > 0 for s in servers[1:])
    by = {(r["server"], r["concurrency"]): r for r in levels}
    for ratio in summary["ratios"]:  # recomputed from the levels' raw rates and latencies
        ours, base = by[(ratio["server"], ratio["concurrency"])], by[("baseline", ratio["concurrency"])]
        assert ratio["throughput_ratio"] == pytest.approx(ours["req_s"] / base["req_s"], rel=1e-12)
        assert ratio["p50_ratio"] == pytest.approx(base["p50_ms"] / ours["p50_ms"], rel=1e-12)
    for server in servers[1:]:  # capacity: the best level's answers/s, against the baseline's best
        capacity = max(r["req_s"] for r in levels if r["server"] == server)
        baseline = max(r["req_s"] for r in levels if r["server"] == "baseline")
        checks = summary["checks"][server]
        assert checks["capacity_req_s"] == capacity
        assert checks["capacity_ratio"] == pytest.approx(capacity / baseline, rel=1e-12)
        assert checks["capacity_target"] > 0


def test_vision(tmp_path, capsys):
    out = tmp_path / "vision.json"
    rows = vision.main(["--preset", "tiny", "--dtype", "fp32", "--batches", "1,2", "--min-time", "0.01",
                        "--json", str(out)])
    assert [(r["preset"], r["dtype"], r["batch"]) for r in rows] == [("tiny", "fp32", 1), ("tiny", "fp32", 2)]
    for r in rows:  # each ratio is the quotient of the rates printed beside it, ours over transformers'
        assert all(r[k] > 0 for k in ("ours_model_img_s", "hf_model_img_s", "ours_e2e_img_s", "hf_e2e_img_s"))
        assert r["model_ratio"] == pytest.approx(r["ours_model_img_s"] / r["hf_model_img_s"], rel=1e-9)
        assert r["e2e_ratio"] == pytest.approx(r["ours_e2e_img_s"] / r["hf_e2e_img_s"], rel=1e-9)
    printed = printed_table(capsys.readouterr().out, ["preset", "dtype", "batch", "ours_model_img_s", "hf_model_img_s",
                                                      "model_ratio", "ours_e2e_img_s", "hf_e2e_img_s", "e2e_ratio"])
    assert [r["batch"] for r in printed] == [1, 2]
    assert json.loads(out.read_text())["rows"] == rows


def test_score_bench(tmp_path):
    from bench import score as score_bench

    make_vit(tmp_path / "vit", seed=1)
    result = score_bench.main(["--tiny", "--model", str(tmp_path / "vit"), "--dtype", "float32", "--quantize", "none",
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


def test_detectors_bench_reports_each_family_and_the_ensemble():
    from bench import detectors

    result = detectors.main(["--size", "tiny", "--batches", "1,2", "--rounds", "1"])
    names = list(detectors.FAMILIES)
    assert [(r["family"], r["batch"]) for r in result["families"]] == [(n, b) for n in names for b in (1, 2)]
    for r in result["families"]:
        assert r["speedup"] == pytest.approx(r["transformers_ms_per_image"] / r["ours_ms_per_image"])
    for r in result["ensemble"]:
        assert r["members"] == "+".join(names) and r["sum_of_members_ms"] == pytest.approx(
            sum(r[f"{n}_ms"] for n in names))
