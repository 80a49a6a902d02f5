"""What the client gets for one image: the answer's JSON, and the API error a failed decode or work item maps to."""
from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from runtime.errors import InputError
from runtime.image_decode import ImageDecodeError
from server.batcher import Computed, DeadlineExceeded, InferenceFailed, WorkItem
from server.errors import ApiError
from server.logs import REQUEST_ID

log = logging.getLogger(__name__)

DECODE_ERROR_STATUS = {"undecodable_image": 422, "image_too_large": 422, "image_refused": 422,
                       "decode_timeout": 504}


def computed_or_error(item: WorkItem) -> Computed | ApiError:
    """A finished work item's result, or the API error its failure maps to."""
    error = item.future.exception()
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(error))
    if isinstance(error, InputError):
        return ApiError(422, "unprocessable_image", f"the model cannot take this image: {error}")
    if isinstance(error, InferenceFailed):
        log.error("request %s: inference failed on one image: %r", REQUEST_ID.get(), error.error)
        return ApiError(500, "inference_failed", f"the model failed on this image; request id {REQUEST_ID.get()}")
    if error is not None:
        raise error
    return item.future.result()


def decode_error(e: ImageDecodeError) -> ApiError:
    return ApiError(DECODE_ERROR_STATUS[e.code], e.code, str(e))


def answer_json(result: Any, cached: bool, detail: bool, explain: bool, total_s: float, decode_s: float = 0.0,
            queue_s: float = 0.0, compute_s: float = 0.0, scale: int = 1) -> dict:
    """`scale`: the JPEG reduction the image was decoded at; boxes are given in the original image's pixels."""
    answer = {
        "prediction": result.prediction,
        "label": result.label,
        "stage": result.stage,
        "cached": cached,
        "degraded": result.degraded,
        "timings_ms": {"decode": round(decode_s * 1e3, 3), "queue": round(queue_s * 1e3, 3),
                       "compute": round(compute_s * 1e3, 3), "total": round(total_s * 1e3, 3)},
    }
    if explain or result.explanation is not None:  # the bundle's explain_above rule explains unasked
        answer["explanation"] = result.explanation
    if detail:
        answer["tokens"] = result.tokens
        answer["scores"] = dict(result.scores)
        if result.detector_scores:
            answer["detector_scores"] = dict(result.detector_scores)
            answer["detector_ms"] = dict(result.detector_ms)
        if result.boxes is not None:
            answer["boxes"] = [{"detector": b.detector, "label": b.label, "score": b.score,
                                "xyxy": [v * scale for v in b.xyxy]} for b in result.boxes]
    return answer


def warmup_jpeg() -> bytes:
    """224x224, JPEG quality 75: what the subnet's validators send."""
    gradient = np.linspace(0, 255, 224, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:, None], gradient[::-1, None]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()
