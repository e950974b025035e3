import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_FORMAT_UNSPECIFIED: _ClassVar[DatasetFormat]
    DATASET_FORMAT_PARQUET: _ClassVar[DatasetFormat]
    DATASET_FORMAT_CSV: _ClassVar[DatasetFormat]
    DATASET_FORMAT_NPZ: _ClassVar[DatasetFormat]

class ColumnRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLUMN_ROLE_UNSPECIFIED: _ClassVar[ColumnRole]
    COLUMN_ROLE_INPUT: _ClassVar[ColumnRole]
    COLUMN_ROLE_LABEL: _ClassVar[ColumnRole]
    COLUMN_ROLE_FEATURE: _ClassVar[ColumnRole]

class ThresholdOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THRESHOLD_OUTCOME_UNSPECIFIED: _ClassVar[ThresholdOutcome]
    THRESHOLD_OUTCOME_PASSED: _ClassVar[ThresholdOutcome]
    THRESHOLD_OUTCOME_FAILED: _ClassVar[ThresholdOutcome]
    THRESHOLD_OUTCOME_SKIPPED: _ClassVar[ThresholdOutcome]
DATASET_FORMAT_UNSPECIFIED: DatasetFormat
DATASET_FORMAT_PARQUET: DatasetFormat
DATASET_FORMAT_CSV: DatasetFormat
DATASET_FORMAT_NPZ: DatasetFormat
COLUMN_ROLE_UNSPECIFIED: ColumnRole
COLUMN_ROLE_INPUT: ColumnRole
COLUMN_ROLE_LABEL: ColumnRole
COLUMN_ROLE_FEATURE: ColumnRole
THRESHOLD_OUTCOME_UNSPECIFIED: ThresholdOutcome
THRESHOLD_OUTCOME_PASSED: ThresholdOutcome
THRESHOLD_OUTCOME_FAILED: ThresholdOutcome
THRESHOLD_OUTCOME_SKIPPED: ThresholdOutcome

class DatasetColumn(_message.Message):
    __slots__ = ("name", "datatype", "shape", "role", "split")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    role: ColumnRole
    split: bool
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., role: _Optional[_Union[ColumnRole, str]] = ..., split: _Optional[bool] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "format", "sha256", "size", "num_rows", "columns", "model", "model_version", "description", "created_by", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: DatasetFormat
    sha256: str
    size: int
    num_rows: int
    columns: _containers.RepeatedCompositeFieldContainer[DatasetColumn]
    model: str
    model_version: int
    description: str
    created_by: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., num_rows: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[DatasetColumn, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., description: _Optional[str] = ..., created_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UploadDatasetHeader(_message.Message):
    __slots__ = ("name", "format", "sha256", "size", "label_columns", "model", "model_version", "model_alias", "description", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ALIAS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: DatasetFormat
    sha256: str
    size: int
    label_columns: _containers.RepeatedScalarFieldContainer[str]
    model: str
    model_version: int
    model_alias: str
    description: str
    actor: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., label_columns: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., model_alias: _Optional[str] = ..., description: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadDatasetHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadDatasetHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadDatasetResponse(_message.Message):
    __slots__ = ("dataset", "deduplicated")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    deduplicated: bool
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetDatasetResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DownloadDatasetRequest(_message.Message):
    __slots__ = ("name", "chunk_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    chunk_size: int
    def __init__(self, name: _Optional[str] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class DownloadDatasetResponse(_message.Message):
    __slots__ = ("dataset", "chunk")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    chunk: bytes
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    def __init__(self, name: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfusionMatrix(_message.Message):
    __slots__ = ("labels", "counts")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class SliceResult(_message.Message):
    __slots__ = ("slice", "slicing", "example_count", "metrics", "baseline_metrics", "confusion_matrix")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class BaselineMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SLICE_FIELD_NUMBER: _ClassVar[int]
    SLICING_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_METRICS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    slice: str
    slicing: str
    example_count: int
    metrics: _containers.ScalarMap[str, float]
    baseline_metrics: _containers.ScalarMap[str, float]
    confusion_matrix: ConfusionMatrix
    def __init__(self, slice: _Optional[str] = ..., slicing: _Optional[str] = ..., example_count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., baseline_metrics: _Optional[_Mapping[str, float]] = ..., confusion_matrix: _Optional[_Union[ConfusionMatrix, _Mapping]] = ...) -> None: ...

class ThresholdResult(_message.Message):
    __slots__ = ("threshold", "metric", "slice", "value", "baseline_value", "bound", "outcome", "message")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    threshold: str
    metric: str
    slice: str
    value: float
    baseline_value: float
    bound: float
    outcome: ThresholdOutcome
    message: str
    def __init__(self, threshold: _Optional[str] = ..., metric: _Optional[str] = ..., slice: _Optional[str] = ..., value: _Optional[float] = ..., baseline_value: _Optional[float] = ..., bound: _Optional[float] = ..., outcome: _Optional[_Union[ThresholdOutcome, str]] = ..., message: _Optional[str] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("model", "version", "name", "artifact_sha256", "dataset", "dataset_sha256", "spec_yaml", "spec_sha256", "task", "slices", "baseline", "baseline_version", "thresholds", "passed", "path", "duration_s", "rows_per_s", "actor", "time", "notes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHA256_FIELD_NUMBER: _ClassVar[int]
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    SPEC_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    name: str
    artifact_sha256: str
    dataset: str
    dataset_sha256: str
    spec_yaml: str
    spec_sha256: str
    task: str
    slices: _containers.RepeatedCompositeFieldContainer[SliceResult]
    baseline: str
    baseline_version: int
    thresholds: _containers.RepeatedCompositeFieldContainer[ThresholdResult]
    passed: bool
    path: str
    duration_s: float
    rows_per_s: float
    actor: str
    time: _timestamp_pb2.Timestamp
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., name: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., dataset: _Optional[str] = ..., dataset_sha256: _Optional[str] = ..., spec_yaml: _Optional[str] = ..., spec_sha256: _Optional[str] = ..., task: _Optional[str] = ..., slices: _Optional[_Iterable[_Union[SliceResult, _Mapping]]] = ..., baseline: _Optional[str] = ..., baseline_version: _Optional[int] = ..., thresholds: _Optional[_Iterable[_Union[ThresholdResult, _Mapping]]] = ..., passed: _Optional[bool] = ..., path: _Optional[str] = ..., duration_s: _Optional[float] = ..., rows_per_s: _Optional[float] = ..., actor: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class RequiredEvaluation(_message.Message):
    __slots__ = ("name", "dataset", "spec_yaml", "spec_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    SPEC_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset: str
    spec_yaml: str
    spec_sha256: str
    def __init__(self, name: _Optional[str] = ..., dataset: _Optional[str] = ..., spec_yaml: _Optional[str] = ..., spec_sha256: _Optional[str] = ...) -> None: ...

class EvaluationGate(_message.Message):
    __slots__ = ("required",)
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    required: _containers.RepeatedCompositeFieldContainer[RequiredEvaluation]
    def __init__(self, required: _Optional[_Iterable[_Union[RequiredEvaluation, _Mapping]]] = ...) -> None: ...

class PutEvaluationRequest(_message.Message):
    __slots__ = ("result", "actor")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    result: EvaluationResult
    actor: str
    def __init__(self, result: _Optional[_Union[EvaluationResult, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class PutEvaluationResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: EvaluationResult
    def __init__(self, result: _Optional[_Union[EvaluationResult, _Mapping]] = ...) -> None: ...

class GetEvaluationRequest(_message.Message):
    __slots__ = ("model", "version", "name")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    name: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class GetEvaluationResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: EvaluationResult
    def __init__(self, result: _Optional[_Union[EvaluationResult, _Mapping]] = ...) -> None: ...

class ListEvaluationsRequest(_message.Message):
    __slots__ = ("model", "version", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEvaluationsResponse(_message.Message):
    __slots__ = ("results", "next_page_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EvaluationResult]
    next_page_token: str
    def __init__(self, results: _Optional[_Iterable[_Union[EvaluationResult, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
