"""Per-version counters, kept the way Triton's ModelStatistics reports them.

Per request: success / fail (count and end-to-end ns), queue, compute input / infer / output
(each request in a batch is charged its batch's durations). Per execution: execution_count and
one entry per executed batch size. `inference_count` counts batch rows, not requests.
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class Duration:
    count: int = 0
    ns: int = 0


@dataclasses.dataclass
class BatchSizeStatistics:
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)


class VersionStatistics:
    """Cumulative since load. Mutated only from the event loop, so no locking."""

    __slots__ = (
        "batches",
        "compute_infer_ns",
        "compute_input_ns",
        "compute_output_ns",
        "execution_count",
        "fail_count",
        "fail_ns",
        "inference_count",
        "last_inference_ms",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.compute_input_ns = 0
        self.compute_infer_ns = 0
        self.compute_output_ns = 0
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchSizeStatistics] = {}

    def record_success(self, rows: int, total_ns: int, queue_ns: int, compute_input_ns: int,
                       compute_infer_ns: int, compute_output_ns: int) -> None:
        self.success_count += 1
        self.success_ns += total_ns
        self.queue_ns += queue_ns
        self.compute_input_ns += compute_input_ns
        self.compute_infer_ns += compute_infer_ns
        self.compute_output_ns += compute_output_ns
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, total_ns: int) -> None:
        self.fail_count += 1
        self.fail_ns += total_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_execution(self, batch_size: int, compute_input_ns: int, compute_infer_ns: int,
                         compute_output_ns: int) -> None:
        self.execution_count += 1
        entry = self.batches.get(batch_size)
        if entry is None:
            entry = self.batches[batch_size] = BatchSizeStatistics()
        for duration, ns in ((entry.compute_input, compute_input_ns), (entry.compute_infer, compute_infer_ns),
                             (entry.compute_output, compute_output_ns)):
            duration.count += 1
            duration.ns += ns

    def mean_batch_size(self) -> float:
        executions = sum(b.compute_infer.count for b in self.batches.values())
        rows = sum(size * b.compute_infer.count for size, b in self.batches.items())
        return rows / executions if executions else 0.0
