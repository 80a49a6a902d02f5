"""One set of engine flags for every front end (runtime/cascade/settings.py), and the flag-level messages around them:
errors name flags, tools.tune says when it wrote nothing, tools.hardcases list says when nothing matched, unknown
ROADWORK_* variables get a warning, the parquet hint names the extra as README.md does."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.images import jpeg
from runtime.cascade.settings import DEFAULT_MODEL_DIR, EngineSettings
from server.config import ServerConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
EXPLICIT = ["--device", "cpu", "--dtype", "bfloat16", "--quantize", "int8-onednn", "--max-batch", "3",
            "--precision-cache", "off", "--backend", "onnxruntime"]


class Captured(Exception):
    """Raised where a front end would load its Engine, carrying the settings it passed."""


@pytest.fixture
def captured(monkeypatch):
    """EngineSettings.load and tools.tune's observe stop the front end there, with the settings they were given."""
    import tools.tune

    def stop(settings: EngineSettings, *_args, **_kwargs):
        raise Captured(settings)

    monkeypatch.setattr(EngineSettings, "load", stop)
    monkeypatch.setattr(tools.tune, "observe", lambda bundle, data, settings, progress=True: stop(settings))


@pytest.fixture
def labeled(tmp_path) -> Path:
    for i, label in enumerate(("none", "roadwork")):
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / "0.jpg").write_bytes(jpeg(i))
    return tmp_path / "data"


def settings_of(run) -> EngineSettings:
    with pytest.raises(Captured) as caught:
        run()
    return caught.value.args[0]


def front_ends(labeled: Path, tmp_path: Path) -> dict:
    """name -> run(engine flags): each front end that loads an Engine, up to where it loads it; and the model each
    one is pointed at."""
    from bench import load as bench_load, score as bench_score
    from tools import eval as tools_eval, score as tools_score, tune as tools_tune

    model = str(DEFAULT_MODEL_DIR)

    def miner(flags):
        main = pytest.importorskip("miner.__main__", reason="the miner needs bittensor")
        raise Captured(main.parse(["--model", model, "--no-serve", *flags]).engine)

    def bench_load_run(flags):
        raise Captured(bench_load.parse_args(["--model", model, *flags]).engine)

    def server(flags):
        config = parse_config(["--model", model, *flags], environ={})
        raise Captured(EngineSettings(config.model, config.device, config.dtype, config.quantize, config.max_batch,
                                      config.precision_cache, config.backend))

    return {
        "server": server,
        "tools.eval": lambda flags: tools_eval.main([model, str(labeled), *flags]),
        "tools.score": lambda flags: tools_score.main([str(labeled), "--out", str(tmp_path / "o.jsonl"),
                                                       "--model", model, *flags]),
        "tools.tune": lambda flags: tools_tune.main([model, str(labeled), *flags]),
        "miner": miner,
        "bench.load": bench_load_run,
        "bench.score": lambda flags: bench_score.main(["--model", model, *flags]),
    }


NAMES = ("server", "tools.eval", "tools.score", "tools.tune", "miner", "bench.load", "bench.score")


@pytest.mark.parametrize("name", NAMES)
def test_every_front_end_takes_the_engine_flags_and_passes_them_on(name, captured, labeled, tmp_path):
    """The same flags, choices and defaults reach Engine.load as one EngineSettings (tools.eval had no --quantize,
    tools.score only int8/none, the miner no auto, tune/eval/bench.load a fixed 32 batch)."""
    run = front_ends(labeled, tmp_path)[name]
    assert settings_of(lambda: run(EXPLICIT)) == EngineSettings(DEFAULT_MODEL_DIR, "cpu", "bfloat16", "int8-onednn",
                                                                3, "off", "onnxruntime")
    assert settings_of(lambda: run([])) == EngineSettings(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("name", NAMES)
def test_every_front_end_names_the_flag_in_its_errors(name, captured, labeled, tmp_path, capsys):
    run = front_ends(labeled, tmp_path)[name]
    with pytest.raises(SystemExit) as caught:
        run(["--max-batch", "0"])
    assert caught.value.code == 2 and "--max-batch must be > 0, got 0" in capsys.readouterr().err


def test_tools_eval_takes_no_progress(captured, labeled):
    from tools import eval as tools_eval

    assert settings_of(lambda: tools_eval.main([str(DEFAULT_MODEL_DIR), str(labeled), "--no-progress"])).model == \
        DEFAULT_MODEL_DIR


@pytest.mark.parametrize("argv, message", [
    (["--queue-size", "0"], "--queue-size must be > 0, got 0"),
    (["--cache-entries", "-1"], "--cache-entries must be >= 0, got -1"),
    (["--max-body-mb", "64", "--body-memory-mb", "32"], "--body-memory-mb (32.0) must be >= --max-body-mb (64.0)"),
    (["--hardcases-rules", "rules.toml"], "--hardcases-rules needs --hardcases"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
])
def test_server_errors_name_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv, environ={})
    assert message in capsys.readouterr().err
    assert isinstance(ServerConfig(), EngineSettings)


def test_tune_says_that_nothing_was_written_without_write(labeled, monkeypatch, caplog, capsys):
    import tools.tune

    _, detectors, _ = tools.tune.stage_specs(tools.tune.read_bundle(DEFAULT_MODEL_DIR))
    obs = tools.tune.Observed(labels=np.array([0, 1]), p=np.array([0.2, 0.8]),
                              c=np.full((2, len(detectors.detectors)), 0.5), stage1_ms=1.0, stage2_ms=2.0)
    monkeypatch.setattr(tools.tune, "observe", lambda *args, **kwargs: obs)
    toml = (DEFAULT_MODEL_DIR / "cascade.toml").read_text()
    with caplog.at_level(logging.WARNING, logger="tools.tune"):
        tools.tune.main([str(DEFAULT_MODEL_DIR), str(labeled)])
    assert "nothing written" in caplog.text and "--write" in caplog.text
    assert (DEFAULT_MODEL_DIR / "cascade.toml").read_text() == toml


def test_hardcases_list_says_when_nothing_matches(tmp_path, capsys):
    from tools.hardcases import main

    assert main(["list", str(tmp_path), "--rule", "vlm"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no hard case" in err and str(tmp_path) in err


def test_unknown_roadwork_variables_warn_once_naming_the_closest(caplog):
    environ = {"ROADWORK_DEVCE": "cuda", "ROADWORK_PORT": "9000", "ROADWORK_NVTX": "1", "ROADWORK_REPLICAS": "2",
               "ROADWORK_ZZZ": "1", "OTHER_DEVCE": "x"}
    with caplog.at_level(logging.WARNING, logger="server.config"):
        config = parse_config([], environ=environ)
    assert config.port == 9000 and config.device == "cpu"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "ROADWORK_DEVCE" in warnings[0] and "did you mean ROADWORK_DEVICE?" in warnings[0]
    assert "ROADWORK_ZZZ" in warnings[1] and "did you mean" not in warnings[1]


def test_parquet_hint_names_the_extra_as_the_readme_does(tmp_path, monkeypatch):
    import tools.score

    readme = re.findall(r"pip install[^`]*\[parquet\][^`]*", (REPO / "README.md").read_text())
    assert readme, "README.md names no parquet extra"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails: the extra is not installed
    with pytest.raises(ValueError) as caught:
        tools.score.open_writer(tmp_path / "out.parquet", detail=False)
    assert all(hint in str(caught.value) and hint in tools.score.__doc__ for hint in readme)
