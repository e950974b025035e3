"""Drift sampling at the gateway: a share of successful ModelInfer requests' inputs go to the monitor.

The decision is one `random()` per request; the decoding happens on a later loop turn, after the
answer has been handed to gRPC, and at most `max_pending` samples wait at once (beyond that they
are dropped and counted), so sampling never delays or disturbs serving.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from services.common.datatypes import raw_to_array
from services.common.reporting import TelemetryReporter

log = logging.getLogger("aiaas.gateway.drift")

# Datatypes decoded for drift samples (numbers with a numpy dtype; BYTES, BOOL and BF16 are left out).
DRIFT_DATATYPES = frozenset(("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
                             "UINT8", "UINT16", "UINT32", "UINT64"))
# Drift samples scheduled but not yet taken; beyond this, samples are dropped (bounded work).
MAX_PENDING = 8


class DriftSampler:
    def __init__(self, reporter: TelemetryReporter | None, rate: float, *, max_pending: int = MAX_PENDING) -> None:
        self.reporter = reporter
        # Share of requests sampled (the reporter caps it further, per model per second); 0: off.
        self.rate = rate
        self.max_pending = max_pending
        self.pending = 0
        self.dropped = 0

    def maybe_sample(self, request: Any, model: str, version: int) -> None:
        if not self.rate or random.random() >= self.rate:
            return
        if self.pending >= self.max_pending:
            self.dropped += 1
            return
        self.pending += 1
        asyncio.get_running_loop().call_soon(self._sample, request, model, version)

    def _sample(self, request: Any, model: str, version: int) -> None:
        self.pending -= 1
        reporter = self.reporter
        if reporter is None:
            return
        try:
            inputs = {}
            raw_contents = request.raw_input_contents
            if len(raw_contents) != len(request.inputs):
                return  # typed `contents` (not raw bytes): not sampled
            for spec, raw in zip(request.inputs, raw_contents, strict=True):
                if spec.datatype in DRIFT_DATATYPES:
                    inputs[spec.name] = raw_to_array(raw, spec.datatype, spec.shape)
            if inputs:
                reporter.sample_inputs(model, version, inputs)
        except Exception:
            log.debug("drift sample skipped", exc_info=True)
