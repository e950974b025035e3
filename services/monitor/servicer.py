"""aiaas.monitor.v1.Monitor over gRPC: convert, call one core method, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from aiaas.monitor.v1 import monitor_pb2 as pb
from aiaas.monitor.v1 import monitor_pb2_grpc
from services.common.authz import audit_actor
from services.common.errors import InvalidArgument
from services.monitor import convert
from services.monitor.core import MonitorCore

_MAX_BINS = 100


class MonitorServicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, core: MonitorCore) -> None:
        self.core = core

    async def Report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext) -> pb.ReportResponse:
        accepted = await self.core.ingest(convert.report_from_proto(request))
        return pb.ReportResponse(accepted=accepted)

    async def QueryMetrics(self, request: pb.QueryMetricsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.QueryMetricsResponse:
        series = await self.core.query(convert.filter_from_proto(request))
        return pb.QueryMetricsResponse(series=[convert.series_to_proto(m) for m in series],
                                       time_ns=self.core.clock())

    async def SetSLO(self, request: pb.SetSLORequest, context: grpc.aio.ServicerContext) -> pb.SetSLOResponse:
        slo = await self.core.set_slo(convert.slo_from_proto(request.slo), audit_actor(request.actor))
        return pb.SetSLOResponse(slo=convert.slo_to_proto(slo))

    async def ListSLOs(self, request: pb.ListSLOsRequest, context: grpc.aio.ServicerContext
                       ) -> pb.ListSLOsResponse:
        return pb.ListSLOsResponse(slos=[convert.slo_to_proto(s) for s in await self.core.list_slos(request.model)])

    async def DeleteSLO(self, request: pb.DeleteSLORequest, context: grpc.aio.ServicerContext
                        ) -> pb.DeleteSLOResponse:
        await self.core.delete_slo(request.model, audit_actor(request.actor))
        return pb.DeleteSLOResponse()

    async def SetBaseline(self, request: pb.SetBaselineRequest, context: grpc.aio.ServicerContext
                          ) -> pb.SetBaselineResponse:
        if not 0 <= request.bins <= _MAX_BINS:
            raise InvalidArgument(f"bins must be 0..{_MAX_BINS}")
        which = request.WhichOneof("source")
        histograms = sample = None
        if which == "histograms":
            histograms = [convert.histogram_from_proto(h) for h in request.histograms.histograms]
        elif which == "sample":
            sample = {f.feature: list(f.values) for f in request.sample.features}
            if any(not f for f in sample):
                raise InvalidArgument("every sampled feature needs a name")
        baseline = await self.core.set_baseline(
            request.model, request.version, histograms=histograms, sample=sample,
            learn_from_requests=request.learn_from_requests if which == "learn_from_requests" else 0,
            bins=request.bins, actor=audit_actor(request.actor),
        )
        return pb.SetBaselineResponse(baseline=convert.baseline_to_proto(baseline))

    async def GetBaseline(self, request: pb.GetBaselineRequest, context: grpc.aio.ServicerContext
                          ) -> pb.GetBaselineResponse:
        baseline = await self.core.get_baseline(request.model, request.version)
        return pb.GetBaselineResponse(baseline=convert.baseline_to_proto(baseline))

    async def GetDrift(self, request: pb.GetDriftRequest, context: grpc.aio.ServicerContext) -> pb.GetDriftResponse:
        features = await self.core.drift(request.model, request.version, request.window_seconds)
        return convert.drift_to_proto(features, self.core.settings.drift_threshold)

    async def GetCanaryStatus(self, request: pb.GetCanaryStatusRequest, context: grpc.aio.ServicerContext
                              ) -> pb.GetCanaryStatusResponse:
        return pb.GetCanaryStatusResponse(status=convert.canary_to_proto(self.core.canary_status(request.model)))

    async def ListAlerts(self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListAlertsResponse:
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        alerts = self.core.alerts.list(request.model, request.active_only, request.limit or 100)
        return pb.ListAlertsResponse(alerts=[convert.alert_to_proto(a) for a in alerts])

    async def WatchAlerts(self, request: pb.WatchAlertsRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.WatchAlertsResponse]:
        subscription = self.core.alerts.subscribe(request.model, request.include_active)
        try:
            async for alert, missed in subscription:
                yield pb.WatchAlertsResponse(alert=convert.alert_to_proto(alert), missed=missed)
        finally:
            subscription.close()
