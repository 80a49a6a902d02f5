"""The server's hard-case capture (--hardcases DIR): imagesets/hardcase_capture.py wired to this app's metrics."""
from __future__ import annotations

import functools
from typing import Any

from imagesets.hardcase_capture import CaptureConfig, HardCaseCapture, engine_digest, vlm_stage_name
from server.config import ServerConfig
from server.metrics import ServerMetrics


def hard_case_capture(engine: Any, config: ServerConfig, metrics: ServerMetrics) -> HardCaseCapture | None:
    """None unless config.hardcases names a directory. Started and closed by the Service."""
    if config.hardcases is None:
        return None
    rules = CaptureConfig() if config.hardcases_rules is None else CaptureConfig.from_toml(config.hardcases_rules)
    return HardCaseCapture(config.hardcases, rules, functools.partial(engine_digest, engine), vlm_stage_name(engine),
                           on_matched=lambda rule: metrics.hardcases_matched.labels(rule).inc(),
                           on_captured=lambda rule: metrics.hardcases_captured.labels(rule).inc(),
                           on_dropped=lambda reason: metrics.hardcases_dropped.labels(reason).inc())
