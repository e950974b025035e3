"""Feedback: a label (or a score) for an earlier request, joined to its kept prediction and sent to
the monitor as online quality of the version and alias that served it.

Only the key that made the request may label it, and it must still be allowed to infer on the
model. The first feedback for a request counts; a second one is refused with ALREADY_EXISTS,
so a retried call never counts twice. Class (and text) labels count as right or wrong; numeric
labels give an absolute and a squared error; a score (0..1) is averaged as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from services.common.reporting import QualitySample, TelemetryReporter
from services.gateway.entities import Caller, Role
from services.gateway.keys import authorize
from services.gateway.predictions import (
    CLASS,
    MAX_REQUEST_ID,
    MAX_ROWS,
    MAX_TEXT,
    TEXT,
    VALUE,
    Prediction,
    PredictionStore,
)

# A label is a class id (int), a number (float) or a text (str), as the request's oneof said.
Label = int | float | str

MAX_MODEL_NAME = 256
# Errors past this are counted as this (one wild label must not swamp a window's mean).
MAX_ABS_ERROR = 1e6


@dataclasses.dataclass(frozen=True, slots=True)
class FeedbackResult:
    prediction: Prediction
    class_labels: int = 0
    correct: int = 0
    value_labels: int = 0
    abs_error_sum: float = 0.0
    squared_error_sum: float = 0.0

    @property
    def mean_abs_error(self) -> float:
        return self.abs_error_sum / self.value_labels if self.value_labels else 0.0


def check_feedback(model: str, request_id: str, labels: Sequence[Label], score: float | None) -> None:
    """InvalidArgument unless the call is well formed (before anything is looked up)."""
    if not model or len(model) > MAX_MODEL_NAME:
        raise InvalidArgument(f"model must be a model name of 1..{MAX_MODEL_NAME} characters")
    if not request_id or len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id must be the `id` of an earlier ModelInfer request "
                              f"(1..{MAX_REQUEST_ID} characters)")
    if not labels and score is None:
        raise InvalidArgument("feedback needs labels (one per row of the prediction), a score, or both")
    if len(labels) > MAX_ROWS:
        raise InvalidArgument(f"at most {MAX_ROWS} labels (a prediction keeps at most {MAX_ROWS} rows), "
                              f"got {len(labels)}")
    if score is not None and not (math.isfinite(score) and 0.0 <= score <= 1.0):
        raise InvalidArgument(f"score must be between 0 and 1, got {score}")
    for i, label in enumerate(labels):
        if isinstance(label, float) and not math.isfinite(label):
            raise InvalidArgument(f"label {i} is not a finite number")
        if isinstance(label, str) and len(label) > MAX_TEXT:
            raise InvalidArgument(f"label {i} is longer than {MAX_TEXT} characters")


def join(prediction: Prediction, labels: Sequence[Label]) -> FeedbackResult:
    """Compare labels with the prediction's rows; InvalidArgument when they do not fit it."""
    if not labels:
        return FeedbackResult(prediction)
    if len(labels) != len(prediction.rows):
        raise InvalidArgument(f"the prediction has {len(prediction.rows)} row(s): send one label per row, "
                              f"got {len(labels)}")
    if prediction.kind == VALUE:
        if any(isinstance(label, str) for label in labels):
            raise InvalidArgument(f"output {prediction.output!r} predicts a number per row: send numeric labels")
        errors = [min(abs(float(p) - float(label)), MAX_ABS_ERROR) for p, label in zip(prediction.rows, labels,
                                                                                      strict=True)]
        return FeedbackResult(prediction, value_labels=len(errors), abs_error_sum=sum(errors),
                              squared_error_sum=sum(e * e for e in errors))
    wanted = {CLASS: (int, "a class per row: send class_id labels"), TEXT: (str, "a text per row: send text labels")}
    kind, what = wanted.get(prediction.kind, (int, "a class per row: send class_id labels"))
    if not all(isinstance(label, kind) for label in labels):
        raise InvalidArgument(f"output {prediction.output!r} predicts {what}")
    correct = sum(1 for p, label in zip(prediction.rows, labels, strict=True) if p == label)
    return FeedbackResult(prediction, class_labels=len(labels), correct=correct)


class FeedbackDesk:
    def __init__(self, store: PredictionStore, reporter: TelemetryReporter | None, window_s: float) -> None:
        self.store = store
        self.reporter = reporter
        self.window_s = window_s

    async def give(self, caller: Caller, model: str, request_id: str, labels: Sequence[Label],
                   score: float | None) -> FeedbackResult:
        authorize(caller, Role.INFER, model or None)
        check_feedback(model, request_id, labels, score)
        data = await self.store.get(model, request_id)
        if data is None:
            raise NotFound(
                f"no prediction of model {model!r} is kept under request id {request_id!r}: the request was "
                f"not sampled (feedback_sample_rate), carried another id, or is older than the feedback "
                f"window ({self.window_s:g}s)")
        prediction = Prediction.decode(data)
        if prediction.key_id != caller.key_id:
            raise PermissionDenied(f"request {request_id!r} of model {model!r} was made with another API key: "
                                   f"only that key may label it")
        result = join(prediction, labels)
        if not await self.store.claim(model, request_id, self.window_s):
            raise AlreadyExists(f"request {request_id!r} of model {model!r} was labeled already "
                                "(the first feedback counts)")
        if self.reporter is not None:
            self.reporter.report_quality(QualitySample(
                model=prediction.model, version=prediction.version, alias=prediction.alias,
                class_labels=result.class_labels, correct=result.correct, value_labels=result.value_labels,
                abs_error_sum=result.abs_error_sum, squared_error_sum=result.squared_error_sum, score=score))
        return result
