from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CanaryVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANARY_VERDICT_UNSPECIFIED: _ClassVar[CanaryVerdict]
    CANARY_VERDICT_INSUFFICIENT_DATA: _ClassVar[CanaryVerdict]
    CANARY_VERDICT_HEALTHY: _ClassVar[CanaryVerdict]
    CANARY_VERDICT_ERROR_REGRESSION: _ClassVar[CanaryVerdict]
    CANARY_VERDICT_LATENCY_REGRESSION: _ClassVar[CanaryVerdict]
    CANARY_VERDICT_QUALITY_REGRESSION: _ClassVar[CanaryVerdict]

class AlertKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_KIND_UNSPECIFIED: _ClassVar[AlertKind]
    ALERT_KIND_SLO_LATENCY: _ClassVar[AlertKind]
    ALERT_KIND_SLO_ERROR_RATE: _ClassVar[AlertKind]
    ALERT_KIND_DRIFT: _ClassVar[AlertKind]
    ALERT_KIND_CANARY_ROLLBACK: _ClassVar[AlertKind]
    ALERT_KIND_SHADOW_MISMATCH: _ClassVar[AlertKind]
    ALERT_KIND_SLO_TTFT: _ClassVar[AlertKind]
    ALERT_KIND_SLO_INTER_TOKEN: _ClassVar[AlertKind]
    ALERT_KIND_SLO_ACCURACY: _ClassVar[AlertKind]
    ALERT_KIND_SLO_QUALITY_ERROR: _ClassVar[AlertKind]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_STATE_FIRING: _ClassVar[AlertState]
    ALERT_STATE_RESOLVED: _ClassVar[AlertState]
CANARY_VERDICT_UNSPECIFIED: CanaryVerdict
CANARY_VERDICT_INSUFFICIENT_DATA: CanaryVerdict
CANARY_VERDICT_HEALTHY: CanaryVerdict
CANARY_VERDICT_ERROR_REGRESSION: CanaryVerdict
CANARY_VERDICT_LATENCY_REGRESSION: CanaryVerdict
CANARY_VERDICT_QUALITY_REGRESSION: CanaryVerdict
ALERT_KIND_UNSPECIFIED: AlertKind
ALERT_KIND_SLO_LATENCY: AlertKind
ALERT_KIND_SLO_ERROR_RATE: AlertKind
ALERT_KIND_DRIFT: AlertKind
ALERT_KIND_CANARY_ROLLBACK: AlertKind
ALERT_KIND_SHADOW_MISMATCH: AlertKind
ALERT_KIND_SLO_TTFT: AlertKind
ALERT_KIND_SLO_INTER_TOKEN: AlertKind
ALERT_KIND_SLO_ACCURACY: AlertKind
ALERT_KIND_SLO_QUALITY_ERROR: AlertKind
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_STATE_FIRING: AlertState
ALERT_STATE_RESOLVED: AlertState

class RequestRecord(_message.Message):
    __slots__ = ("source", "model", "version", "alias", "status", "latency_us", "queue_us", "compute_us", "batch_size", "key_id", "time_ns", "generation")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    source: str
    model: str
    version: int
    alias: str
    status: str
    latency_us: int
    queue_us: int
    compute_us: int
    batch_size: int
    key_id: str
    time_ns: int
    generation: GenerationStats
    def __init__(self, source: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., status: _Optional[str] = ..., latency_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., batch_size: _Optional[int] = ..., key_id: _Optional[str] = ..., time_ns: _Optional[int] = ..., generation: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "ttft_us", "itl_mean_us", "itl_max_us", "generation_us", "preemptions", "kv_cache_usage", "finish_reason")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_US_FIELD_NUMBER: _ClassVar[int]
    ITL_MEAN_US_FIELD_NUMBER: _ClassVar[int]
    ITL_MAX_US_FIELD_NUMBER: _ClassVar[int]
    GENERATION_US_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    ttft_us: int
    itl_mean_us: int
    itl_max_us: int
    generation_us: int
    preemptions: int
    kv_cache_usage: float
    finish_reason: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_us: _Optional[int] = ..., itl_mean_us: _Optional[int] = ..., itl_max_us: _Optional[int] = ..., generation_us: _Optional[int] = ..., preemptions: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class InputSample(_message.Message):
    __slots__ = ("model", "version", "input", "rows", "cols", "values_f32", "time_ns")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_F32_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    input: str
    rows: int
    cols: int
    values_f32: bytes
    time_ns: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., values_f32: _Optional[bytes] = ..., time_ns: _Optional[int] = ...) -> None: ...

class ShadowDiff(_message.Message):
    __slots__ = ("model", "live_version", "shadow_version", "max_abs_diff", "mismatched", "time_ns")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    model: str
    live_version: int
    shadow_version: int
    max_abs_diff: float
    mismatched: bool
    time_ns: int
    def __init__(self, model: _Optional[str] = ..., live_version: _Optional[int] = ..., shadow_version: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., mismatched: _Optional[bool] = ..., time_ns: _Optional[int] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("model", "version", "load_us", "time_ns")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_US_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    load_us: int
    time_ns: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., load_us: _Optional[int] = ..., time_ns: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("source", "records", "samples", "shadow_diffs", "loads", "dropped", "quality")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DIFFS_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    source: str
    records: _containers.RepeatedCompositeFieldContainer[RequestRecord]
    samples: _containers.RepeatedCompositeFieldContainer[InputSample]
    shadow_diffs: _containers.RepeatedCompositeFieldContainer[ShadowDiff]
    loads: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    dropped: int
    quality: _containers.RepeatedCompositeFieldContainer[QualitySample]
    def __init__(self, source: _Optional[str] = ..., records: _Optional[_Iterable[_Union[RequestRecord, _Mapping]]] = ..., samples: _Optional[_Iterable[_Union[InputSample, _Mapping]]] = ..., shadow_diffs: _Optional[_Iterable[_Union[ShadowDiff, _Mapping]]] = ..., loads: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ..., dropped: _Optional[int] = ..., quality: _Optional[_Iterable[_Union[QualitySample, _Mapping]]] = ...) -> None: ...

class QualitySample(_message.Message):
    __slots__ = ("model", "version", "alias", "class_labels", "correct", "value_labels", "abs_error_sum", "squared_error_sum", "score", "time_ns")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    VALUE_LABELS_FIELD_NUMBER: _ClassVar[int]
    ABS_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    SQUARED_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    alias: str
    class_labels: int
    correct: int
    value_labels: int
    abs_error_sum: float
    squared_error_sum: float
    score: float
    time_ns: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., class_labels: _Optional[int] = ..., correct: _Optional[int] = ..., value_labels: _Optional[int] = ..., abs_error_sum: _Optional[float] = ..., squared_error_sum: _Optional[float] = ..., score: _Optional[float] = ..., time_ns: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class QueryMetricsRequest(_message.Message):
    __slots__ = ("model", "version", "alias", "source", "window_seconds", "merge")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    alias: str
    source: str
    window_seconds: float
    merge: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., source: _Optional[str] = ..., window_seconds: _Optional[float] = ..., merge: _Optional[bool] = ...) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    def __init__(self, p50_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., mean_ms: _Optional[float] = ..., max_ms: _Optional[float] = ...) -> None: ...

class BatchSizeCount(_message.Message):
    __slots__ = ("batch_size", "count")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    count: int
    def __init__(self, batch_size: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class SeriesMetrics(_message.Message):
    __slots__ = ("source", "model", "version", "alias", "window_seconds", "count", "rate_per_second", "errors", "error_rate", "status_counts", "latency", "queue", "compute", "batch_sizes", "mean_batch_size", "first_response_ms", "load_ms", "class_labels", "correct", "accuracy", "value_labels", "mean_abs_error", "rmse", "scores", "mean_score", "generation")
    class StatusCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIRST_RESPONSE_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALUE_LABELS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    RMSE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    source: str
    model: str
    version: int
    alias: str
    window_seconds: float
    count: int
    rate_per_second: float
    errors: int
    error_rate: float
    status_counts: _containers.ScalarMap[str, int]
    latency: LatencySummary
    queue: LatencySummary
    compute: LatencySummary
    batch_sizes: _containers.RepeatedCompositeFieldContainer[BatchSizeCount]
    mean_batch_size: float
    first_response_ms: float
    load_ms: float
    class_labels: int
    correct: int
    accuracy: float
    value_labels: int
    mean_abs_error: float
    rmse: float
    scores: int
    mean_score: float
    generation: GenerationMetrics
    def __init__(self, source: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., window_seconds: _Optional[float] = ..., count: _Optional[int] = ..., rate_per_second: _Optional[float] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., status_counts: _Optional[_Mapping[str, int]] = ..., latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., queue: _Optional[_Union[LatencySummary, _Mapping]] = ..., compute: _Optional[_Union[LatencySummary, _Mapping]] = ..., batch_sizes: _Optional[_Iterable[_Union[BatchSizeCount, _Mapping]]] = ..., mean_batch_size: _Optional[float] = ..., first_response_ms: _Optional[float] = ..., load_ms: _Optional[float] = ..., class_labels: _Optional[int] = ..., correct: _Optional[int] = ..., accuracy: _Optional[float] = ..., value_labels: _Optional[int] = ..., mean_abs_error: _Optional[float] = ..., rmse: _Optional[float] = ..., scores: _Optional[int] = ..., mean_score: _Optional[float] = ..., generation: _Optional[_Union[GenerationMetrics, _Mapping]] = ...) -> None: ...

class GenerationMetrics(_message.Message):
    __slots__ = ("count", "ttft", "inter_token", "prompt_tokens", "completion_tokens", "output_tokens_per_second", "mean_kv_cache_usage", "preemptions", "finish_reasons")
    class FinishReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TTFT_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEAN_KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASONS_FIELD_NUMBER: _ClassVar[int]
    count: int
    ttft: LatencySummary
    inter_token: LatencySummary
    prompt_tokens: int
    completion_tokens: int
    output_tokens_per_second: float
    mean_kv_cache_usage: float
    preemptions: int
    finish_reasons: _containers.ScalarMap[str, int]
    def __init__(self, count: _Optional[int] = ..., ttft: _Optional[_Union[LatencySummary, _Mapping]] = ..., inter_token: _Optional[_Union[LatencySummary, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., output_tokens_per_second: _Optional[float] = ..., mean_kv_cache_usage: _Optional[float] = ..., preemptions: _Optional[int] = ..., finish_reasons: _Optional[_Mapping[str, int]] = ...) -> None: ...

class QueryMetricsResponse(_message.Message):
    __slots__ = ("series", "time_ns")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[SeriesMetrics]
    time_ns: int
    def __init__(self, series: _Optional[_Iterable[_Union[SeriesMetrics, _Mapping]]] = ..., time_ns: _Optional[int] = ...) -> None: ...

class SLO(_message.Message):
    __slots__ = ("model", "p99_latency_ms", "max_error_rate", "window_seconds", "min_requests", "source", "p99_ttft_ms", "p99_inter_token_ms", "min_accuracy", "max_mean_abs_error", "min_labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    P99_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    P99_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    P99_INTER_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAX_MEAN_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    p99_latency_ms: float
    max_error_rate: float
    window_seconds: float
    min_requests: int
    source: str
    p99_ttft_ms: float
    p99_inter_token_ms: float
    min_accuracy: float
    max_mean_abs_error: float
    min_labels: int
    def __init__(self, model: _Optional[str] = ..., p99_latency_ms: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., window_seconds: _Optional[float] = ..., min_requests: _Optional[int] = ..., source: _Optional[str] = ..., p99_ttft_ms: _Optional[float] = ..., p99_inter_token_ms: _Optional[float] = ..., min_accuracy: _Optional[float] = ..., max_mean_abs_error: _Optional[float] = ..., min_labels: _Optional[int] = ...) -> None: ...

class SetSLORequest(_message.Message):
    __slots__ = ("slo", "actor")
    SLO_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    slo: SLO
    actor: str
    def __init__(self, slo: _Optional[_Union[SLO, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class SetSLOResponse(_message.Message):
    __slots__ = ("slo",)
    SLO_FIELD_NUMBER: _ClassVar[int]
    slo: SLO
    def __init__(self, slo: _Optional[_Union[SLO, _Mapping]] = ...) -> None: ...

class ListSLOsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListSLOsResponse(_message.Message):
    __slots__ = ("slos",)
    SLOS_FIELD_NUMBER: _ClassVar[int]
    slos: _containers.RepeatedCompositeFieldContainer[SLO]
    def __init__(self, slos: _Optional[_Iterable[_Union[SLO, _Mapping]]] = ...) -> None: ...

class DeleteSLORequest(_message.Message):
    __slots__ = ("model", "actor")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    actor: str
    def __init__(self, model: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class DeleteSLOResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeatureHistogram(_message.Message):
    __slots__ = ("feature", "edges", "fractions", "count")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    feature: str
    edges: _containers.RepeatedScalarFieldContainer[float]
    fractions: _containers.RepeatedScalarFieldContainer[float]
    count: int
    def __init__(self, feature: _Optional[str] = ..., edges: _Optional[_Iterable[float]] = ..., fractions: _Optional[_Iterable[float]] = ..., count: _Optional[int] = ...) -> None: ...

class FeatureValues(_message.Message):
    __slots__ = ("feature", "values")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    feature: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, feature: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("model", "version", "histograms", "learn_from_requests", "learned_rows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    LEARN_FROM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LEARNED_ROWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    histograms: _containers.RepeatedCompositeFieldContainer[FeatureHistogram]
    learn_from_requests: int
    learned_rows: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., histograms: _Optional[_Iterable[_Union[FeatureHistogram, _Mapping]]] = ..., learn_from_requests: _Optional[int] = ..., learned_rows: _Optional[int] = ...) -> None: ...

class SetBaselineRequest(_message.Message):
    __slots__ = ("model", "version", "histograms", "sample", "learn_from_requests", "bins", "actor")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    LEARN_FROM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    histograms: FeatureHistograms
    sample: FeatureSample
    learn_from_requests: int
    bins: int
    actor: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., histograms: _Optional[_Union[FeatureHistograms, _Mapping]] = ..., sample: _Optional[_Union[FeatureSample, _Mapping]] = ..., learn_from_requests: _Optional[int] = ..., bins: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...

class FeatureHistograms(_message.Message):
    __slots__ = ("histograms",)
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    histograms: _containers.RepeatedCompositeFieldContainer[FeatureHistogram]
    def __init__(self, histograms: _Optional[_Iterable[_Union[FeatureHistogram, _Mapping]]] = ...) -> None: ...

class FeatureSample(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureValues]
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureValues, _Mapping]]] = ...) -> None: ...

class SetBaselineResponse(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: Baseline
    def __init__(self, baseline: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class GetBaselineRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetBaselineResponse(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: Baseline
    def __init__(self, baseline: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class GetDriftRequest(_message.Message):
    __slots__ = ("model", "version", "window_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    window_seconds: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("feature", "psi", "samples", "drifted")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    feature: str
    psi: float
    samples: int
    drifted: bool
    def __init__(self, feature: _Optional[str] = ..., psi: _Optional[float] = ..., samples: _Optional[int] = ..., drifted: _Optional[bool] = ...) -> None: ...

class GetDriftResponse(_message.Message):
    __slots__ = ("features", "threshold")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    threshold: float
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., threshold: _Optional[float] = ...) -> None: ...

class GetCanaryStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class CanaryStatus(_message.Message):
    __slots__ = ("model", "verdict", "production", "canary", "error_p_value", "p99_ratio", "rolled_back", "reason", "time_ns", "ttft_p99_ratio", "accuracy_p_value")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    ERROR_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    model: str
    verdict: CanaryVerdict
    production: SeriesMetrics
    canary: SeriesMetrics
    error_p_value: float
    p99_ratio: float
    rolled_back: bool
    reason: str
    time_ns: int
    ttft_p99_ratio: float
    accuracy_p_value: float
    def __init__(self, model: _Optional[str] = ..., verdict: _Optional[_Union[CanaryVerdict, str]] = ..., production: _Optional[_Union[SeriesMetrics, _Mapping]] = ..., canary: _Optional[_Union[SeriesMetrics, _Mapping]] = ..., error_p_value: _Optional[float] = ..., p99_ratio: _Optional[float] = ..., rolled_back: _Optional[bool] = ..., reason: _Optional[str] = ..., time_ns: _Optional[int] = ..., ttft_p99_ratio: _Optional[float] = ..., accuracy_p_value: _Optional[float] = ...) -> None: ...

class GetCanaryStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: CanaryStatus
    def __init__(self, status: _Optional[_Union[CanaryStatus, _Mapping]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "kind", "state", "model", "version", "alias", "summary", "value", "threshold", "time_ns", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: AlertKind
    state: AlertState
    model: str
    version: int
    alias: str
    summary: str
    value: float
    threshold: float
    time_ns: int
    details: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[AlertKind, str]] = ..., state: _Optional[_Union[AlertState, str]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., summary: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., time_ns: _Optional[int] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("model", "active_only", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    active_only: bool
    limit: int
    def __init__(self, model: _Optional[str] = ..., active_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class WatchAlertsRequest(_message.Message):
    __slots__ = ("model", "include_active")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    include_active: bool
    def __init__(self, model: _Optional[str] = ..., include_active: _Optional[bool] = ...) -> None: ...

class WatchAlertsResponse(_message.Message):
    __slots__ = ("alert", "missed")
    ALERT_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    alert: Alert
    missed: int
    def __init__(self, alert: _Optional[_Union[Alert, _Mapping]] = ..., missed: _Optional[int] = ...) -> None: ...
