"""cascade.toml parsing: the documented example, every key documented, and a clear error for each mistake."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.cascade.bundle import (STAGE_KINDS, ClassifierStageSpec, DetectorSpec, DetectorStageSpec, VLMStageSpec, keys_of,
                            load_bundle, read_bundle)
from runtime.errors import ModelLoadError

DOC = Path(__file__).resolve().parents[1] / "docs" / "bundle.md"

CLASSIFIER = """
[[stage]]
kind = "classifier"
model = "cls"
exit_below = 0.2
exit_above = 0.8
"""
DETECTORS = """
[[stage]]
kind = "detectors"

[[stage.detector]]
model = "det"
roadwork_classes = ["cone", 3]
"""
ROUTING_DETECTORS = DETECTORS.replace('kind = "detectors"', 'kind = "detectors"\nexit_below = 0.3\nexit_above = 0.7')
VLM = """
[[stage]]
kind = "vlm"
model = "vlm"
"""


def bundle(tmp_path: Path, text: str, models=("cls", "det", "vlm")) -> Path:
    for name in models:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "cascade.toml").write_text(text)
    return tmp_path


def doc_example() -> str:
    return re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_documented_example_parses(tmp_path):
    b = read_bundle(bundle(tmp_path, doc_example(), ("classifier", "deimv2-s", "deimv2-m", "vlm")))
    assert b.from_toml and b.root == tmp_path
    cls, det, vlm = b.stages
    assert cls == ClassifierStageSpec("classifier", (tmp_path / "classifier").resolve(), "cuda:0", 0.15, 0.85)
    assert det == DetectorStageSpec(
        "detectors",
        (DetectorSpec("deimv2-s", (tmp_path / "deimv2-s").resolve(), ("traffic cone", "barrier", "road work sign"),
                      1.0, 0.35),
         DetectorSpec("deimv2-m", (tmp_path / "deimv2-m").resolve(), (2, 7), 2.0, 0.4)),
        "cuda:0", 0.6667, 0.5, 250.0, 3, 30.0, 0.3, 0.7)
    assert vlm == VLMStageSpec("vlm", (tmp_path / "vlm").resolve(),
                               "Is there roadwork in this image? Answer Yes or No.", "Yes", "No",
                               "Describe the roadwork you see, briefly.", 0.5, 48, "cuda:1", 1.0, 32, 2000.0, 3, 30.0)


def test_every_key_is_documented_and_every_documented_key_exists():
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOC.read_text(), re.M))
    parsed = {k for _, keys in STAGE_KINDS.values() for k in keys} | set(keys_of(DetectorSpec))
    assert documented == parsed - {"detector"}  # documented as its table header, [[stage.detector]]
    assert "| `[[stage.detector]]` |" in DOC.read_text()


def test_defaults(tmp_path):
    b = read_bundle(bundle(tmp_path, CLASSIFIER + DETECTORS))
    cls, det = b.stages
    assert cls.name == "classifier" and cls.device is None
    assert det.name == "detectors" and det.majority == 2 / 3 and det.classifier_weight == 0.0
    assert det.time_budget_ms is None and det.failure_threshold == 3 and det.cooldown_s == 30.0
    assert det.detectors == (DetectorSpec("det", (tmp_path / "det").resolve(), ("cone", 3), 1.0, 0.5),)
    assert det.exit_below is None and det.exit_above is None


def test_vlm_defaults_and_placement(tmp_path):
    b = read_bundle(bundle(tmp_path, CLASSIFIER + ROUTING_DETECTORS + VLM))
    _, det, vlm = b.stages
    assert (det.exit_below, det.exit_above) == (0.3, 0.7)
    assert vlm == VLMStageSpec("vlm", (tmp_path / "vlm").resolve())
    assert vlm.prompt == "Is there roadwork in this image? Answer Yes or No." and vlm.explain_above == 1.0
    assert (vlm.yes_token, vlm.no_token, vlm.max_explain_tokens, vlm.kv_cache_gb) == ("Yes", "No", 48, 1.0)
    assert vlm.device is None and vlm.time_budget_ms is None and vlm.failure_threshold == 3
    cls, vlm = read_bundle(bundle(tmp_path, CLASSIFIER + VLM)).stages  # right after the classifier
    assert cls.exit_below == 0.2 and vlm.name == "vlm"


def test_one_stage_bundle_and_plain_directory(tmp_path):
    b = read_bundle(bundle(tmp_path, '[[stage]]\nkind = "classifier"\nmodel = "cls"\n'))
    assert b.stages == (ClassifierStageSpec("classifier", (tmp_path / "cls").resolve()),)
    plain = load_bundle(tmp_path / "cls")
    assert not plain.from_toml and plain.stages == (ClassifierStageSpec("classifier", tmp_path / "cls"),)
    assert load_bundle(tmp_path).from_toml


def test_absolute_model_path(tmp_path):
    models = tmp_path / "elsewhere"
    models.mkdir()
    bundle(models, "")
    (tmp_path / "b").mkdir()
    b = read_bundle(bundle(tmp_path / "b", CLASSIFIER.replace('"cls"', f'"{models / "cls"}"') + DETECTORS.replace(
        '"det"', f'"{models / "det"}"'), models=()))
    assert b.stages[0].model == models / "cls" and b.stages[1].detectors[0].model == models / "det"


@pytest.mark.parametrize("text, message", [
    (CLASSIFIER + DETECTORS + "\n[extra]\nx = 1\n", r"cascade.toml: unknown key 'extra' \(known keys: stage\)"),
    (CLASSIFIER.replace("exit_above", "exit_abve") + DETECTORS, r"stage 1 \('classifier'\): unknown key 'exit_abve'"),
    (CLASSIFIER + DETECTORS.replace('kind = "detectors"', 'kind = "detectors"\nthreshold = 0.5'),
     r"stage 2 \('detectors'\): unknown key 'threshold'"),
    (CLASSIFIER + DETECTORS + "box_treshold = 0.3\n",
     r"stage 2 \('detectors'\) detector 1: unknown key 'box_treshold'"),
    ("", "missing required key 'stage'"),
    ("stage = []", r"needs at least one \[\[stage\]\] table"),
    ('[[stage]]\nmodel = "cls"\n', "stage 1: missing required key 'kind'"),
    ('[[stage]]\nkind = "llm"\n', r"kind 'llm' is not supported \(supported: classifier, detectors, vlm\)"),
    (VLM, "stage 1: kind 'vlm' here, but the first stage, and only it, must be a classifier"),
    (CLASSIFIER + VLM + ROUTING_DETECTORS,
     r"stage 2 \('vlm'\): a vlm stage must be the last stage, but stage 3 is kind 'detectors'"),
    (CLASSIFIER + VLM + VLM, r"stage 2 \('vlm'\): a vlm stage must be the last stage, but stage 3 is kind 'vlm'"),
    (CLASSIFIER + ROUTING_DETECTORS + VLM + "temperature = 0.7\n", r"stage 3 \('vlm'\): unknown key 'temperature'"),
    (CLASSIFIER + DETECTORS + VLM, r"stage 2 \('detectors'\): missing required key 'exit_below'"),
    (CLASSIFIER + ROUTING_DETECTORS, r"stage 2 \('detectors'\): exit_below/exit_above route images to a later "
                                     "stage, but this is the last stage"),
    (CLASSIFIER + ROUTING_DETECTORS.replace("0.3", "0.8") + VLM,
     r"stage 2 \('detectors'\): exit_below \(0.8\) must not exceed exit_above \(0.7\)"),
    (CLASSIFIER + VLM.replace('model = "vlm"', 'model = "nope"'),
     r"stage 2 \('vlm'\): model directory 'nope' .* does not exist"),
    (CLASSIFIER + '[[stage]]\nkind = "vlm"\n', r"stage 2 \('vlm'\): missing required key 'model'"),
    (CLASSIFIER + VLM + 'prompt = " "\n', r"stage 2 \('vlm'\): key 'prompt' must not be empty"),
    (CLASSIFIER + VLM + 'explain_prompt = ""\n', "key 'explain_prompt' must not be empty"),
    (CLASSIFIER + VLM + 'yes_token = "No"\n', "keys 'yes_token' and 'no_token' must differ, both are 'No'"),
    (CLASSIFIER + VLM + 'no_token = 0\n', "key 'no_token' must be str, got 0"),
    (CLASSIFIER + VLM + "explain_above = 1.5\n", r"key 'explain_above' must be in \[0.0, 1.0\], got 1.5"),
    (CLASSIFIER + VLM + "max_explain_tokens = 0\n", "key 'max_explain_tokens' must be >= 1, got 0"),
    (CLASSIFIER + VLM + "max_explain_tokens = 1.5\n", "key 'max_explain_tokens' must be int, got 1.5"),
    (CLASSIFIER + VLM + "kv_cache_gb = 0\n", r"key 'kv_cache_gb' must be in \(0.0, inf\), got 0.0"),
    (CLASSIFIER + VLM + "max_num_seqs = 0\n", "key 'max_num_seqs' must be >= 1, got 0"),
    (CLASSIFIER + VLM + "time_budget_ms = -5\n", r"stage 2 \('vlm'\): key 'time_budget_ms' must be in \[0.0, inf\]"),
    (CLASSIFIER + VLM + "failure_threshold = 0\n", "key 'failure_threshold' must be >= 1"),
    (CLASSIFIER + VLM + "cooldown_s = -1\n", r"key 'cooldown_s' must be in \[0.0, inf\]"),
    (CLASSIFIER + VLM + 'name = "classifier"\n', "stage names must be unique"),
    (DETECTORS, "kind 'detectors' here, but the first stage, and only it, must be a classifier"),
    (CLASSIFIER + CLASSIFIER, "stage 2: kind 'classifier' here"),
    (CLASSIFIER + DETECTORS + DETECTORS, r"stage 2 \('detectors'\): a detectors stage must be the last stage or "
                                         "followed by a vlm stage, but stage 3 is kind 'detectors'"),
    (CLASSIFIER.replace('model = "cls"', 'model = "nope"') + DETECTORS,
     r"model directory 'nope' \(.*\) does not exist"),
    (CLASSIFIER + DETECTORS.replace('model = "det"', 'model = "empty"'), "model directory 'empty' has no config.json"),
    (CLASSIFIER.replace("exit_below = 0.2\n", "") + DETECTORS, "missing required key 'exit_below'"),
    ('[[stage]]\nkind = "classifier"\nmodel = "cls"\nexit_below = 0.1\n', "but this is the last stage"),
    (CLASSIFIER.replace("0.2", "0.9") + DETECTORS, r"exit_below \(0.9\) must not exceed exit_above \(0.8\)"),
    (CLASSIFIER.replace("0.8", "1.5") + DETECTORS, r"key 'exit_above' must be in \[0.0, 1.0\], got 1.5"),
    (CLASSIFIER.replace("0.2", "true") + DETECTORS, "key 'exit_below' must be float, got True"),
    (CLASSIFIER.replace('"cls"', "3") + DETECTORS, "key 'model' must be str, got 3"),
    (CLASSIFIER + DETECTORS.replace('kind = "detectors"', 'kind = "detectors"\nmajority = 0'),
     r"key 'majority' must be in \(0.0, 1.0\]"),
    (CLASSIFIER + DETECTORS.replace('kind = "detectors"', 'kind = "detectors"\nfailure_threshold = 0'),
     "key 'failure_threshold' must be >= 1"),
    (CLASSIFIER + DETECTORS.replace('kind = "detectors"', 'kind = "detectors"\ntime_budget_ms = -1'),
     r"key 'time_budget_ms' must be in \[0.0, inf\]"),
    (CLASSIFIER + '[[stage]]\nkind = "detectors"\n', "missing required key 'detector'"),
    (CLASSIFIER + DETECTORS + "box_threshold = 1.0\n", r"key 'box_threshold' must be in \[0.0, 1.0\)"),
    (CLASSIFIER + DETECTORS + "weight = -1\n", r"key 'weight' must be in \[0.0, inf\]"),
    (CLASSIFIER + DETECTORS + 'weight = "2"\n', "key 'weight' must be float, got '2'"),
    (CLASSIFIER + DETECTORS + "weight = 0\n", "every voter has weight 0"),
    (CLASSIFIER + DETECTORS.replace('["cone", 3]', "[]"), "'roadwork_classes' must be a non-empty list"),
    (CLASSIFIER + DETECTORS.replace('["cone", 3]', "[1.5]"), "'roadwork_classes' must be a non-empty list"),
    (CLASSIFIER + DETECTORS.replace('["cone", 3]', '["cone", "cone"]'), "lists a class twice"),
    (CLASSIFIER + DETECTORS + DETECTORS.split("\n\n")[1], r"detector names must be unique, got \['det', 'det'\]"),
    (CLASSIFIER + DETECTORS.replace('kind = "detectors"', 'kind = "detectors"\nname = "classifier"'),
     "stage names must be unique"),
    ("[[stage]\n", "not valid TOML"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_errors_name_file_stage_and_key(tmp_path, text, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=message):
        read_bundle(bundle(tmp_path, text))


def test_every_spec_kind_is_its_toml_kind_and_runtime_never_asks_a_stage_its_type():
    """What differs per stage kind lives on the spec (model_dirs, quantize_modes, map_quantize) or the stage: code in
    runtime/ asks `spec.kind`, never isinstance on a stage or spec class (a new kind would miss such a branch)."""
    assert set(STAGE_KINDS) == {ClassifierStageSpec.kind, DetectorStageSpec.kind, VLMStageSpec.kind}
    runtime = Path(__file__).resolve().parents[1] / "runtime"
    asked = [f"{path.relative_to(runtime.parent)}:{n}" for path in sorted(runtime.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"isinstance\([^)]*Stage", line)]
    assert asked == []
