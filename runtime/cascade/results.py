"""What the cascade hands back: per-stage answers, per-image results, boxes and VLM token counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypedDict


class TokenCounts(TypedDict):
    """VLM tokens one image cost: prompt tokens (cached ones included), those served from the prefix cache, and
    generated tokens. A dict, so it serializes as one and compares with plain dicts."""
    prompt: int
    cached: int
    generated: int


def add_tokens(a: TokenCounts | None, b: TokenCounts) -> TokenCounts:
    """Token counts of two VLM requests about one image (its score and its explanation)."""
    if a is None:
        return TokenCounts(prompt=b["prompt"], cached=b["cached"], generated=b["generated"])
    return TokenCounts(prompt=a["prompt"] + b["prompt"], cached=a["cached"] + b["cached"],
                       generated=a["generated"] + b["generated"])


@dataclass
class Box:
    detector: str
    label: str  # the roadwork class
    score: float
    xyxy: tuple[float, float, float, float]  # pixels of the original image


@dataclass
class StageAnswer:
    """One stage's answer for one image; `goes_on` is the stage's own routing decision."""
    prediction: float
    goes_on: bool = False
    detector_scores: dict[str, float] = field(default_factory=dict)
    boxes: list[Box] | None = None
    tokens: TokenCounts | None = None
    detector_ms: dict[str, float] = field(default_factory=dict)  # each member's time on the batch, in ms


@dataclass
class ImageResult:
    prediction: float  # P(roadwork) in [0, 1]
    label: str  # "roadwork" if prediction > 0.5 else "none"
    stage: str  # the stage that decided
    scores: dict[str, float] = field(default_factory=dict)  # each stage's P(roadwork)
    degraded: bool = False  # a later stage failed and an earlier stage's answer stands
    detector_scores: dict[str, float] = field(default_factory=dict)  # each answering detector's confidence
    detector_ms: dict[str, float] = field(default_factory=dict)  # each answering detector's time on the batch
    boxes: list[Box] | None = None  # roadwork boxes above threshold, when asked for and the detectors ran
    tokens: TokenCounts | None = None  # VLM tokens; None if the VLM did not see the image
    explanation: str | None = None  # the VLM's explanation, when asked for or above the stage's explain_above


def fold_answers(answers: list[tuple[str, StageAnswer]], degraded: bool) -> ImageResult:
    """One image's result from the answers of the stages it reached, in order: the last one decided."""
    (first_name, first), *later = answers
    result = ImageResult(first.prediction, "", first_name, {first_name: first.prediction}, degraded)
    for name, answer in later:
        result.scores[name] = answer.prediction
        result.stage, result.prediction = name, answer.prediction
        result.detector_scores.update(answer.detector_scores)
        result.detector_ms.update(answer.detector_ms)
        result.boxes = answer.boxes if answer.boxes is not None else result.boxes
        result.tokens = answer.tokens if answer.tokens is not None else result.tokens
    result.label = "roadwork" if result.prediction > 0.5 else "none"
    return result


@dataclass
class StageTiming:
    """Cumulative wall time of one stage's calls on the inference worker (the first stage's includes
    preprocessing), the calls, and the images they carried."""
    seconds: float = 0.0
    calls: int = 0
    images: int = 0


OnStage = Callable[[int, str, float, bool], None]  # (image index, stage name, p, decided here)
