"""Pure functions between aiaas.monitor.v1 protobuf messages and the monitor's domain types."""

from __future__ import annotations

from aiaas.monitor.v1 import monitor_pb2 as pb
from services.monitor.entities import (
    SLO,
    Alert,
    AlertKind,
    AlertState,
    Baseline,
    CanaryStatus,
    CanaryVerdict,
    Distribution,
    FeatureDrift,
    FeatureHistogram,
    Generation,
    GenerationMetrics,
    InputSample,
    MetricsFilter,
    ModelLoad,
    QualitySample,
    Report,
    Request,
    SeriesMetrics,
    ShadowDiff,
)

_ALERT_KIND = {
    AlertKind.SLO_LATENCY: pb.ALERT_KIND_SLO_LATENCY,
    AlertKind.SLO_ERROR_RATE: pb.ALERT_KIND_SLO_ERROR_RATE,
    AlertKind.DRIFT: pb.ALERT_KIND_DRIFT,
    AlertKind.CANARY_ROLLBACK: pb.ALERT_KIND_CANARY_ROLLBACK,
    AlertKind.SHADOW_MISMATCH: pb.ALERT_KIND_SHADOW_MISMATCH,
    AlertKind.SLO_TTFT: pb.ALERT_KIND_SLO_TTFT,
    AlertKind.SLO_INTER_TOKEN: pb.ALERT_KIND_SLO_INTER_TOKEN,
    AlertKind.SLO_ACCURACY: pb.ALERT_KIND_SLO_ACCURACY,
    AlertKind.SLO_QUALITY_ERROR: pb.ALERT_KIND_SLO_QUALITY_ERROR,
}
# What a reporter may put in the finish-reason label; anything else counts as "other".
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "timeout", "error"})
_ALERT_STATE = {AlertState.FIRING: pb.ALERT_STATE_FIRING, AlertState.RESOLVED: pb.ALERT_STATE_RESOLVED}
_VERDICT = {
    CanaryVerdict.UNSPECIFIED: pb.CANARY_VERDICT_UNSPECIFIED,
    CanaryVerdict.INSUFFICIENT_DATA: pb.CANARY_VERDICT_INSUFFICIENT_DATA,
    CanaryVerdict.HEALTHY: pb.CANARY_VERDICT_HEALTHY,
    CanaryVerdict.ERROR_REGRESSION: pb.CANARY_VERDICT_ERROR_REGRESSION,
    CanaryVerdict.LATENCY_REGRESSION: pb.CANARY_VERDICT_LATENCY_REGRESSION,
    CanaryVerdict.QUALITY_REGRESSION: pb.CANARY_VERDICT_QUALITY_REGRESSION,
}


def report_from_proto(msg: pb.ReportRequest) -> Report:
    return Report(
        source=msg.source,
        requests=[
            Request(source=r.source, model=r.model, version=r.version, alias=r.alias, status=r.status or "OK",
                    latency_us=r.latency_us, queue_us=r.queue_us, compute_us=r.compute_us,
                    batch_size=r.batch_size, key_id=r.key_id, time_ns=r.time_ns,
                    generation=_generation(r.generation) if r.HasField("generation") else None)
            for r in msg.records
        ],
        samples=[InputSample(model=s.model, version=s.version, input=s.input, rows=s.rows, cols=s.cols,
                             values=s.values_f32, time_ns=s.time_ns) for s in msg.samples],
        shadow_diffs=[ShadowDiff(model=d.model, live_version=d.live_version, shadow_version=d.shadow_version,
                                 max_abs_diff=d.max_abs_diff, mismatched=d.mismatched, time_ns=d.time_ns)
                      for d in msg.shadow_diffs],
        loads=[ModelLoad(model=m.model, version=m.version, load_us=m.load_us, time_ns=m.time_ns) for m in msg.loads],
        dropped=msg.dropped,
        quality=[QualitySample(model=q.model, version=q.version, alias=q.alias, class_labels=q.class_labels,
                               correct=q.correct, value_labels=q.value_labels, abs_error_sum=q.abs_error_sum,
                               squared_error_sum=q.squared_error_sum,
                               score=q.score if q.HasField("score") else None, time_ns=q.time_ns)
                 for q in msg.quality],
    )


def _generation(g: pb.GenerationStats) -> Generation:
    return Generation(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens, ttft_us=g.ttft_us,
                      itl_mean_us=g.itl_mean_us, itl_max_us=g.itl_max_us, generation_us=g.generation_us,
                      preemptions=g.preemptions, kv_cache_usage=g.kv_cache_usage,
                      finish_reason=g.finish_reason if g.finish_reason in FINISH_REASONS else "other")


def filter_from_proto(msg: pb.QueryMetricsRequest) -> MetricsFilter:
    return MetricsFilter(model=msg.model, version=msg.version, alias=msg.alias, source=msg.source,
                         window_s=msg.window_seconds, merge=msg.merge)


def _distribution(d: Distribution) -> pb.LatencySummary:
    return pb.LatencySummary(p50_ms=d.p50_ms, p90_ms=d.p90_ms, p99_ms=d.p99_ms, mean_ms=d.mean_ms, max_ms=d.max_ms)


def _generation_metrics(g: GenerationMetrics) -> pb.GenerationMetrics:
    return pb.GenerationMetrics(
        count=g.count, ttft=_distribution(g.ttft), inter_token=_distribution(g.inter_token),
        prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
        output_tokens_per_second=g.output_tokens_per_s, mean_kv_cache_usage=g.mean_kv_cache_usage,
        preemptions=g.preemptions, finish_reasons=g.finish_reasons)


def series_to_proto(m: SeriesMetrics) -> pb.SeriesMetrics:
    return pb.SeriesMetrics(
        generation=_generation_metrics(m.generation) if m.generation is not None else None,
        source=m.key.source, model=m.key.model, version=m.key.version, alias=m.key.alias,
        window_seconds=m.window_s, count=m.count, rate_per_second=m.rate_per_s, errors=m.errors,
        error_rate=m.error_rate, status_counts=m.status_counts, latency=_distribution(m.latency),
        queue=_distribution(m.queue), compute=_distribution(m.compute),
        batch_sizes=[pb.BatchSizeCount(batch_size=size, count=n) for size, n in m.batch_sizes.items()],
        mean_batch_size=m.mean_batch_size, first_response_ms=m.first_response_ms, load_ms=m.load_ms,
        class_labels=m.class_labels, correct=m.correct, accuracy=m.accuracy, value_labels=m.value_labels,
        mean_abs_error=m.mean_abs_error, rmse=m.rmse, scores=m.scores, mean_score=m.mean_score,
    )


def slo_from_proto(msg: pb.SLO) -> SLO:
    return SLO(
        model=msg.model,
        p99_latency_ms=msg.p99_latency_ms if msg.HasField("p99_latency_ms") else None,
        max_error_rate=msg.max_error_rate if msg.HasField("max_error_rate") else None,
        window_s=msg.window_seconds, min_requests=msg.min_requests, source=msg.source,
        p99_ttft_ms=msg.p99_ttft_ms if msg.HasField("p99_ttft_ms") else None,
        p99_inter_token_ms=msg.p99_inter_token_ms if msg.HasField("p99_inter_token_ms") else None,
        min_accuracy=msg.min_accuracy if msg.HasField("min_accuracy") else None,
        max_mean_abs_error=msg.max_mean_abs_error if msg.HasField("max_mean_abs_error") else None,
        min_labels=msg.min_labels,
    )


def slo_to_proto(slo: SLO) -> pb.SLO:
    msg = pb.SLO(model=slo.model, window_seconds=slo.window_s, min_requests=slo.min_requests, source=slo.source,
                 min_labels=slo.min_labels, min_accuracy=slo.min_accuracy, max_mean_abs_error=slo.max_mean_abs_error)
    if slo.p99_latency_ms is not None:
        msg.p99_latency_ms = slo.p99_latency_ms
    if slo.max_error_rate is not None:
        msg.max_error_rate = slo.max_error_rate
    if slo.p99_ttft_ms is not None:
        msg.p99_ttft_ms = slo.p99_ttft_ms
    if slo.p99_inter_token_ms is not None:
        msg.p99_inter_token_ms = slo.p99_inter_token_ms
    return msg


def histogram_from_proto(msg: pb.FeatureHistogram) -> FeatureHistogram:
    return FeatureHistogram(feature=msg.feature, edges=tuple(msg.edges), fractions=tuple(msg.fractions),
                            count=msg.count)


def histogram_to_proto(h: FeatureHistogram) -> pb.FeatureHistogram:
    return pb.FeatureHistogram(feature=h.feature, edges=h.edges, fractions=h.fractions, count=h.count)


def baseline_from_proto(msg: pb.Baseline) -> Baseline:
    return Baseline(model=msg.model, version=msg.version,
                    histograms=tuple(histogram_from_proto(h) for h in msg.histograms),
                    learn_from_requests=msg.learn_from_requests, learned_rows=msg.learned_rows)


def baseline_to_proto(b: Baseline) -> pb.Baseline:
    return pb.Baseline(model=b.model, version=b.version, histograms=[histogram_to_proto(h) for h in b.histograms],
                       learn_from_requests=b.learn_from_requests, learned_rows=b.learned_rows)


def drift_to_proto(features: list[FeatureDrift], threshold: float) -> pb.GetDriftResponse:
    return pb.GetDriftResponse(
        features=[pb.FeatureDrift(feature=f.feature, psi=f.psi, samples=f.samples, drifted=f.drifted)
                  for f in features],
        threshold=threshold,
    )


def canary_to_proto(s: CanaryStatus) -> pb.CanaryStatus:
    msg = pb.CanaryStatus(model=s.model, verdict=_VERDICT[s.verdict], error_p_value=s.error_p_value,
                          p99_ratio=s.p99_ratio, ttft_p99_ratio=s.ttft_p99_ratio, rolled_back=s.rolled_back,
                          reason=s.reason, time_ns=s.time_ns, accuracy_p_value=s.accuracy_p_value)
    if s.production is not None:
        msg.production.CopyFrom(series_to_proto(s.production))
    if s.canary is not None:
        msg.canary.CopyFrom(series_to_proto(s.canary))
    return msg


def alert_to_proto(a: Alert) -> pb.Alert:
    return pb.Alert(id=a.id, kind=_ALERT_KIND[a.kind], state=_ALERT_STATE[a.state], model=a.model,
                    version=a.version, alias=a.alias, summary=a.summary, value=a.value, threshold=a.threshold,
                    time_ns=a.time_ns, details=dict(a.details))
