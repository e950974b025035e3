"""The monitor's domain types: plain dataclasses, no protobuf, no grpc."""

from __future__ import annotations

import dataclasses
import enum

# A generative request's tokens and timings, as reported (monitor.proto GenerationStats): the reporters' type.
from services.common.reporting import GenerationStats as Generation

# Status names that mean the server failed (OpenTelemetry's rule, as in the interceptor);
# the caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, quota...) are not the model's errors.
SERVER_FAULT_STATUSES = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"}
)


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class SeriesKey:
    """One time series of request figures: who reported it, for which model, version and alias."""

    model: str
    version: int
    alias: str
    source: str

    def encode(self) -> str:
        return f"{self.source}|{self.model}|{self.version}|{self.alias}"

    @staticmethod
    def decode(text: str) -> SeriesKey:
        source, model, version, alias = text.split("|", 3)
        return SeriesKey(model=model, version=int(version), alias=alias, source=source)


@dataclasses.dataclass(slots=True)
class Request:
    """One served request, as reported."""

    source: str
    model: str
    version: int
    alias: str
    status: str
    latency_us: int
    queue_us: int = 0
    compute_us: int = 0
    batch_size: int = 0
    key_id: str = ""
    time_ns: int = 0
    generation: Generation | None = None


@dataclasses.dataclass(slots=True)
class InputSample:
    """Rows of one input tensor (float32, row-major), for drift."""

    model: str
    version: int
    input: str
    rows: int
    cols: int
    values: bytes
    time_ns: int = 0


@dataclasses.dataclass(slots=True)
class ShadowDiff:
    model: str
    live_version: int
    shadow_version: int
    max_abs_diff: float
    mismatched: bool
    time_ns: int = 0


@dataclasses.dataclass(slots=True)
class ModelLoad:
    model: str
    version: int
    load_us: int
    time_ns: int = 0


@dataclasses.dataclass(slots=True)
class QualitySample:
    """Labels from one Feedback call joined to the prediction they label."""

    model: str
    version: int
    alias: str
    class_labels: int = 0
    correct: int = 0
    value_labels: int = 0
    abs_error_sum: float = 0.0
    squared_error_sum: float = 0.0
    score: float | None = None
    time_ns: int = 0


@dataclasses.dataclass(slots=True)
class Report:
    source: str
    requests: list[Request]
    samples: list[InputSample] = dataclasses.field(default_factory=list)
    shadow_diffs: list[ShadowDiff] = dataclasses.field(default_factory=list)
    loads: list[ModelLoad] = dataclasses.field(default_factory=list)
    dropped: int = 0
    quality: list[QualitySample] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsFilter:
    model: str = ""
    version: int = 0
    alias: str = ""
    source: str = ""
    window_s: float = 0.0
    merge: bool = False

    def matches(self, key: SeriesKey) -> bool:
        return ((not self.model or key.model == self.model) and (not self.version or key.version == self.version)
                and (not self.alias or key.alias == self.alias) and (not self.source or key.source == self.source))


@dataclasses.dataclass(slots=True)
class Distribution:
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0


@dataclasses.dataclass(slots=True)
class GenerationMetrics:
    """A window's generative requests: token counts and rates, TTFT and inter-token latency."""

    count: int = 0
    ttft: Distribution = dataclasses.field(default_factory=Distribution)
    inter_token: Distribution = dataclasses.field(default_factory=Distribution)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_tokens_per_s: float = 0.0
    mean_kv_cache_usage: float = 0.0
    preemptions: int = 0
    finish_reasons: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class SeriesMetrics:
    key: SeriesKey
    window_s: float
    count: int = 0
    rate_per_s: float = 0.0
    errors: int = 0
    error_rate: float = 0.0
    status_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    latency: Distribution = dataclasses.field(default_factory=Distribution)
    queue: Distribution = dataclasses.field(default_factory=Distribution)
    compute: Distribution = dataclasses.field(default_factory=Distribution)
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    mean_batch_size: float = 0.0
    first_response_ms: float = 0.0
    load_ms: float = 0.0
    generation: GenerationMetrics | None = None
    # Online quality, from labels sent back (Feedback) within the window.
    class_labels: int = 0
    correct: int = 0
    accuracy: float = 0.0
    value_labels: int = 0
    mean_abs_error: float = 0.0
    rmse: float = 0.0
    scores: int = 0
    mean_score: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class SLO:
    model: str
    p99_latency_ms: float | None = None
    max_error_rate: float | None = None
    window_s: float = 0.0
    min_requests: int = 0
    source: str = ""
    p99_ttft_ms: float | None = None
    p99_inter_token_ms: float | None = None
    min_accuracy: float | None = None
    max_mean_abs_error: float | None = None
    min_labels: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureHistogram:
    feature: str
    edges: tuple[float, ...]
    fractions: tuple[float, ...]
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class Baseline:
    model: str
    version: int
    histograms: tuple[FeatureHistogram, ...] = ()
    learn_from_requests: int = 0
    learned_rows: int = 0

    @property
    def learning(self) -> bool:
        return not self.histograms and self.learn_from_requests > 0


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureDrift:
    feature: str
    psi: float
    samples: int
    drifted: bool


class AlertKind(enum.Enum):
    SLO_LATENCY = "slo_latency"
    SLO_ERROR_RATE = "slo_error_rate"
    DRIFT = "drift"
    CANARY_ROLLBACK = "canary_rollback"
    SHADOW_MISMATCH = "shadow_mismatch"
    SLO_TTFT = "slo_ttft"
    SLO_INTER_TOKEN = "slo_inter_token"
    SLO_ACCURACY = "slo_accuracy"
    SLO_QUALITY_ERROR = "slo_quality_error"


class AlertState(enum.Enum):
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    id: str
    kind: AlertKind
    state: AlertState
    model: str
    version: int = 0
    alias: str = ""
    summary: str = ""
    value: float = 0.0
    threshold: float = 0.0
    time_ns: int = 0
    details: tuple[tuple[str, str], ...] = ()


class CanaryVerdict(enum.Enum):
    UNSPECIFIED = "unspecified"
    INSUFFICIENT_DATA = "insufficient_data"
    HEALTHY = "healthy"
    ERROR_REGRESSION = "error_regression"
    LATENCY_REGRESSION = "latency_regression"
    QUALITY_REGRESSION = "quality_regression"


@dataclasses.dataclass(slots=True)
class CanaryStatus:
    model: str
    verdict: CanaryVerdict = CanaryVerdict.UNSPECIFIED
    production: SeriesMetrics | None = None
    canary: SeriesMetrics | None = None
    error_p_value: float = 1.0
    p99_ratio: float = 0.0
    ttft_p99_ratio: float = 0.0
    rolled_back: bool = False
    reason: str = ""
    time_ns: int = 0
    accuracy_p_value: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class RouteSplit:
    alias: str
    version: int
    weight: int


@dataclasses.dataclass(frozen=True, slots=True)
class RouteView:
    """What the monitor needs of a gateway route: its splits and the record's revision."""

    model: str
    splits: tuple[RouteSplit, ...]
    revision: int
