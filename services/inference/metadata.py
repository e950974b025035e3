"""Domain -> protobuf for the descriptive RPCs: server / model metadata, ModelConfig, statistics, index."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tritonclient.grpc import model_config_pb2, service_pb2

from aiaas.tensors import TensorSpec
from services.inference.core import LoadedVersion
from services.inference.repository import IndexEntry
from services.inference.statistics import Duration, VersionStatistics

SERVER_NAME = "aiaas"
EXTENSIONS = (
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
)


def data_type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return int(model_config_pb2.DataType.Value(name))


def _batched(lv: LoadedVersion) -> bool:
    return lv.spec.serving.max_batch_size > 0


def _metadata_shape(spec: TensorSpec, batched: bool) -> list[int]:
    shape = list(spec.shape)
    if batched:
        return [-1, *shape[1:]] if shape else [-1]
    return shape


def server_metadata(version: str) -> service_pb2.ServerMetadataResponse:
    return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=EXTENSIONS)


def model_metadata(name: str, versions: Sequence[LoadedVersion], lv: LoadedVersion) -> service_pb2.ModelMetadataResponse:
    batched = _batched(lv)
    response = service_pb2.ModelMetadataResponse(
        name=name, versions=[v.version_str for v in versions], platform=lv.spec.platform)
    for spec in lv.spec.inputs:
        response.inputs.add(name=spec.name, datatype=spec.datatype, shape=_metadata_shape(spec, batched))
    for spec in lv.spec.outputs:
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=_metadata_shape(spec, batched))
    return response


def model_config(lv: LoadedVersion, priority_levels: int = 1,
                 default_priority_level: int = 1) -> model_config_pb2.ModelConfig:
    spec = lv.spec
    serving = spec.serving
    batched = serving.max_batch_size > 0
    config = model_config_pb2.ModelConfig(
        name=lv.model, platform=spec.platform, max_batch_size=max(0, serving.max_batch_size))
    config.version_policy.specific.versions.append(lv.version)
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=data_type(tensor.datatype),
                         dims=list(tensor.shape[1:] if batched else tensor.shape))
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=data_type(tensor.datatype),
                          dims=list(tensor.shape[1:] if batched else tensor.shape))
    if spec.generative:
        # Decoupled (Triton's term): one request, a response per chunk of tokens, the last one flagged.
        config.model_transaction_policy.decoupled = True
        config.max_batch_size = 0
        _instance_group(config, lv)
    elif spec.format != "triton":
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(serving.preferred_batch_sizes)
        batching.max_queue_delay_microseconds = max(0, serving.max_queue_delay_us)
        batching.default_queue_policy.max_queue_size = max(0, serving.max_queue_size)
        batching.default_queue_policy.default_timeout_microseconds = max(0, serving.default_timeout_us)
        batching.default_queue_policy.allow_timeout_override = True
        if priority_levels > 1:
            batching.priority_levels = priority_levels
            batching.default_priority_level = default_priority_level
        _instance_group(config, lv)
    return config


def _instance_group(config: model_config_pb2.ModelConfig, lv: LoadedVersion) -> None:
    serving = lv.spec.serving
    device = serving.device or "cpu"
    kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if device.startswith("cuda") \
        else model_config_pb2.ModelInstanceGroup.KIND_CPU
    group = config.instance_group.add(name=lv.model, kind=kind, count=max(1, serving.instance_count))
    if device.startswith("cuda:"):
        group.gpus.append(int(device.split(":", 1)[1] or 0))


def _duration(target: service_pb2.StatisticDuration, count: int, ns: int) -> None:
    target.count = count
    target.ns = ns


def _copy(target: service_pb2.StatisticDuration, source: Duration) -> None:
    _duration(target, source.count, source.ns)


def version_statistics(lv: LoadedVersion) -> service_pb2.ModelStatistics:
    stats: VersionStatistics = lv.stats
    entry = service_pb2.ModelStatistics(
        name=lv.model, version=lv.version_str, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count)
    infer = entry.inference_stats
    _duration(infer.success, stats.success_count, stats.success_ns)
    _duration(infer.fail, stats.fail_count, stats.fail_ns)
    _duration(infer.queue, stats.success_count, stats.queue_ns)
    _duration(infer.compute_input, stats.success_count, stats.compute_input_ns)
    _duration(infer.compute_infer, stats.success_count, stats.compute_infer_ns)
    _duration(infer.compute_output, stats.success_count, stats.compute_output_ns)
    for size in sorted(stats.batches):
        batch = stats.batches[size]
        item = entry.batch_stats.add(batch_size=size)
        _copy(item.compute_input, batch.compute_input)
        _copy(item.compute_infer, batch.compute_infer)
        _copy(item.compute_output, batch.compute_output)
    return entry


def statistics(versions: Iterable[LoadedVersion]) -> service_pb2.ModelStatisticsResponse:
    return service_pb2.ModelStatisticsResponse(model_stats=[version_statistics(lv) for lv in versions])


def repository_index(entries: Iterable[IndexEntry], ready_only: bool) -> service_pb2.RepositoryIndexResponse:
    response = service_pb2.RepositoryIndexResponse()
    for entry in entries:
        if ready_only and entry.state != "READY":
            continue
        response.models.add(name=entry.model, version=str(entry.version) if entry.version else "",
                            state=entry.state, reason=entry.reason)
    return response
