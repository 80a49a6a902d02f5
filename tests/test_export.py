"""python -m tools.export (issue 27 item 1): every vision stage of a bundle to ONNX with a dynamic batch, each file
passing onnx.checker and answering as the runtime on ONNX Runtime."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fixtures import onnx_models
from fixtures.checkpoints import make_vit
from fixtures.rfdetr_checkpoints import make_rfdetr
from fixtures.rtdetr_checkpoints import make_rtdetr
from tools import export as export_tool

DEFAULT = Path(__file__).resolve().parents[1] / "bundles" / "default"


def check_file(out: Path, entry: dict) -> onnx.ModelProto:
    path = out / entry["file"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (pixel_values,) = model.graph.input
    assert pixel_values.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert {c["batch"] for c in entry["checks"]} == {1, 3}
    assert all(c["max_abs_error"] <= 1e-4 * c["scale"] for c in entry["checks"])
    return model


def test_the_default_bundle_with_its_shared_backbone(tmp_path):
    manifest = export_tool.export(DEFAULT, tmp_path)
    files = {f["file"]: f for f in manifest["exported"]}
    assert set(files) == {"classifier.onnx", "deimv2.onnx", "dfine.onnx", "classifier+shared.onnx"}
    assert json.loads((tmp_path / "export.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["not_exported"] == []
    for entry in files.values():
        check_file(tmp_path, entry)
    shared = files["classifier+shared.onnx"]
    assert list(shared["outputs"]) == ["p_roadwork", "logits", "deimv2.logits", "deimv2.pred_boxes"]
    # The shared graph runs the backbone once and answers as the separate graphs do on the same pixels (DEIMv2
    # shares the classifier's backbone bytes, so the two routes agree).
    spec = shared["preprocess"]
    x = export_tool.pixels(export_tool.PreprocessSpec(**{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in spec.items()}), 2, seed=5).numpy()
    run = {name: ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
           for name in ("classifier.onnx", "deimv2.onnx", "classifier+shared.onnx")}
    together = run["classifier+shared.onnx"].run(None, {"pixel_values": x})
    alone = run["classifier.onnx"].run(None, {"pixel_values": x}) + run["deimv2.onnx"].run(None, {"pixel_values": x})
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_other_families_and_members_that_are_not_exported(tmp_path):
    root = tmp_path / "bundle"
    make_vit(root / "classifier", seed=1)
    make_rtdetr(root / "rtdetr2", seed=3, v2=True)
    make_rfdetr(root / "rfdetr", seed=4)  # its position embeddings are resized (bicubic, antialiased) at load
    yolo = onnx_models.raw_head(root / "yolo.onnx")
    text = '[[stage]]\nkind = "classifier"\nmodel = "classifier"\nexit_below = 0.0\nexit_above = 1.0\n\n' \
           '[[stage]]\nkind = "detectors"\n'
    for name, extra in (("rtdetr2", ""), ("rfdetr", ""), ("yolo", 'format = "onnx"\n')):
        model = "yolo.onnx" if name == "yolo" else name
        text += f'\n[[stage.detector]]\nname = "{name}"\n{extra}model = "{model}"\nroadwork_classes = [1]\n'
    (root / "cascade.toml").write_text(text)
    assert export_tool.main([str(root), "--onnx", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert [f["file"] for f in manifest["exported"]] == ["classifier.onnx", "rtdetr2.onnx", "rfdetr.onnx"]
    assert manifest["not_exported"] == ["yolo: format 'onnx' (already ONNX)"]
    for entry in manifest["exported"]:
        check_file(tmp_path / "out", entry)
    assert yolo.exists()


def test_a_graph_off_the_runtime_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_tool, "TOLERANCE", -1.0)  # nothing can pass
    assert export_tool.main([str(DEFAULT), "--onnx", str(tmp_path)]) == 1
    assert not (tmp_path / "export.json").exists()


def test_usage_errors(tmp_path, monkeypatch, caplog):
    with pytest.raises(SystemExit):
        export_tool.main([str(DEFAULT), "--onnx", str(tmp_path), "--opset", "16"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert export_tool.main([str(DEFAULT), "--onnx", str(tmp_path)]) == 1
    assert "pip install 'roadwork-cascade[onnx]'" in caplog.text

