"""Merging what several inference replicas report (statistics, repository index) into one answer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tritonclient.grpc import service_pb2 as pb

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
              "cache_miss")
_BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")
_RESPONSE_DURATIONS = ("compute_infer", "compute_output", "success", "fail", "empty_response", "cancel")


def _add(into: pb.StatisticDuration, other: pb.StatisticDuration) -> None:
    into.count += other.count
    into.ns += other.ns


def merge_statistics(answers: Iterable[pb.ModelStatisticsResponse],
                     visible: Callable[[str], bool]) -> pb.ModelStatisticsResponse:
    """Sum every replica's counters per (model, version), keeping only models the caller may see."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for answer in answers:
        for stats in answer.model_stats:
            if not visible(stats.name):
                continue
            key = (stats.name, stats.version)
            into = merged.get(key)
            if into is None:
                into = merged[key] = pb.ModelStatistics(name=stats.name, version=stats.version)
            into.last_inference = max(into.last_inference, stats.last_inference)
            into.inference_count += stats.inference_count
            into.execution_count += stats.execution_count
            for field in _DURATIONS:
                _add(getattr(into.inference_stats, field), getattr(stats.inference_stats, field))
            batches = {b.batch_size: b for b in into.batch_stats}
            for batch in stats.batch_stats:
                target = batches.get(batch.batch_size)
                if target is None:
                    target = into.batch_stats.add(batch_size=batch.batch_size)
                    batches[batch.batch_size] = target
                for field in _BATCH_DURATIONS:
                    _add(getattr(target, field), getattr(batch, field))
            for index, response in stats.response_stats.items():
                target_response = into.response_stats[index]
                for field in _RESPONSE_DURATIONS:
                    _add(getattr(target_response, field), getattr(response, field))
            into.memory_usage.extend(stats.memory_usage)
    return pb.ModelStatisticsResponse(model_stats=[merged[k] for k in sorted(merged)])


def merge_index(answers: Iterable[pb.RepositoryIndexResponse], visible: Callable[[str], bool],
                ready_only: bool) -> pb.RepositoryIndexResponse:
    """Union of the replicas' indexes; a version READY anywhere is READY."""
    merged: dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex] = {}
    for answer in answers:
        for entry in answer.models:
            if not visible(entry.name) or (ready_only and entry.state != "READY"):
                continue
            key = (entry.name, entry.version)
            if key not in merged or entry.state == "READY":
                merged[key] = entry
    return pb.RepositoryIndexResponse(models=[merged[k] for k in sorted(merged)])
