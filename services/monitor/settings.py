"""Monitor settings: `AIAAS_MONITOR_*` (then `AIAAS_*`) environment variables and flags."""

from __future__ import annotations

import dataclasses

from services.common.errors import InvalidArgument
from services.common.settings import ServerSettings


@dataclasses.dataclass(frozen=True)
class MonitorSettings(ServerSettings):
    """Metrics per model and version, SLOs, drift, alerts and automatic canary rollback."""

    port: int = 50053
    metrics_port: int = 9464
    # Where SLOs, baselines and routes live; empty keeps them in this process only.
    registry_url: str | None = "127.0.0.1:50051"
    # Redis URL (redis://host:6379/0) holding windows shared by several replicas; empty keeps them
    # in this process.
    redis_url: str | None = None

    # Width of one time bucket, in seconds: every window is a whole number of buckets.
    bucket_s: float = 1.0
    # How long buckets are kept, in seconds (the Redis TTL with redis_url); no window may be longer.
    retention_s: float = 3600.0
    # Window of a metrics query (QueryMetrics, `aiaas top`) that names none, in seconds.
    default_window_s: float = 60.0
    # How often SLOs, drift, shadow mismatches and canaries are judged, in seconds. (SLOs, baselines
    # and routes are not re-read on a timer: the monitor follows the registry's change feed.)
    evaluation_interval_s: float = 1.0

    # Window an SLO is judged over when it sets none, in seconds.
    slo_window_s: float = 60.0
    # Requests an SLO's window needs before it is judged, when the SLO sets none; below it no alert
    # fires or resolves.
    slo_min_requests: int = 20
    # Labels (Feedback) an SLO's window needs before its accuracy or error objective is judged, when
    # the SLO sets none.
    slo_min_labels: int = 100

    # Population stability index (PSI) above which an input feature counts as drifted and alerts.
    drift_threshold: float = 0.2
    # Window of live input samples compared with a version's baseline, in seconds.
    drift_window_s: float = 120.0
    # Live values a feature needs in the window before its drift is judged.
    drift_min_samples: int = 200
    # Quantile bins per feature of a baseline built from a sample or learned from requests, when the
    # request names no count (2..100).
    drift_bins: int = 10

    # Route alias analysed as the canary, while it and production_alias both have weight > 0.
    canary_alias: str = "canary"
    # Route alias the canary is compared with.
    production_alias: str = "production"
    # Canary analysis window, in seconds: the time since the canary started taking traffic, at most
    # this long.
    canary_window_s: float = 60.0
    # Requests each side (canary and production) needs before a verdict; fewer: insufficient data.
    canary_min_requests: int = 50
    # Significance level of the one-sided two-proportion z-test: the canary's error rate is worse
    # when p < canary_alpha (and canary_min_error_increase is reached).
    canary_alpha: float = 0.01
    # Least absolute rise of the canary's error rate over production's that counts as a regression
    # (0.02 = 2 points).
    canary_min_error_increase: float = 0.02
    # Latency regression: canary p99 above this multiple of production's (and canary_min_p99_increase_ms
    # above it); must be > 1.
    canary_max_p99_ratio: float = 2.0
    # Least rise of the canary's p99 over production's, in milliseconds, that counts as a regression.
    canary_min_p99_increase_ms: float = 5.0
    # Generative models: canary p99 time to first token above this multiple of production's (and
    # canary_min_ttft_increase_ms above it) is a latency regression; must be > 1.
    canary_max_ttft_p99_ratio: float = 2.0
    # Least rise of the canary's p99 time to first token over production's, in milliseconds.
    canary_min_ttft_increase_ms: float = 20.0
    # Quality regression (labels from Feedback): class labels each side needs before accuracies are
    # compared; fewer: quality is not judged (latency and errors still are).
    canary_min_labels: int = 100
    # Least drop of the canary's online accuracy under production's that counts as a regression
    # (0.05 = 5 points), when also significant at canary_alpha.
    canary_max_accuracy_drop: float = 0.05
    # False: analyse and alert, but leave the route alone.
    canary_rollback: bool = True

    # Window over which a shadow version's mismatch rate is computed, in seconds.
    shadow_window_s: float = 60.0
    # Share of shadow comparisons differing from live above which a shadow-mismatch alert fires
    # (0.05 = 5%).
    shadow_mismatch_rate: float = 0.05
    # Comparisons a shadow version needs in the window before its mismatch rate is judged.
    shadow_min_samples: int = 20

    # Model names whose request series are kept at once; a report for a new name beyond it is dropped
    # and counted (aiaas_monitor_records_refused_total). A name with no request for retention_s frees its place.
    max_models: int = 1000
    # Series (version, alias, source) kept per model name; beyond it, likewise dropped and counted.
    max_series_per_model: int = 256

    # Alerts kept in memory (fired and resolved, oldest dropped first) for ListAlerts.
    alert_history: int = 1000
    # Alerts pending per WatchAlerts subscriber; one that falls behind loses the oldest and is told
    # how many it missed.
    subscriber_queue: int = 1000

    def validate(self) -> None:
        super().validate()
        if self.bucket_s <= 0 or self.retention_s < self.bucket_s:
            raise InvalidArgument("bucket_s must be > 0 and retention_s >= bucket_s")
        for name in ("default_window_s", "slo_window_s", "drift_window_s", "canary_window_s", "shadow_window_s"):
            value = getattr(self, name)
            if value <= 0 or value > self.retention_s:
                raise InvalidArgument(f"{name} must be > 0 and <= retention_s ({self.retention_s}), got {value}")
        if self.max_models < 1 or self.max_series_per_model < 1:
            raise InvalidArgument("max_models and max_series_per_model must be >= 1")
        if self.evaluation_interval_s <= 0:
            raise InvalidArgument("evaluation_interval_s must be > 0")
        if not 0 < self.canary_alpha < 1:
            raise InvalidArgument("canary_alpha must be between 0 and 1")
        if self.canary_max_p99_ratio <= 1:
            raise InvalidArgument("canary_max_p99_ratio must be > 1")
        if self.canary_max_ttft_p99_ratio <= 1:
            raise InvalidArgument("canary_max_ttft_p99_ratio must be > 1")
        if self.slo_min_labels < 1 or self.canary_min_labels < 1:
            raise InvalidArgument("slo_min_labels and canary_min_labels must be >= 1")
        if not 0 <= self.canary_max_accuracy_drop < 1:
            raise InvalidArgument("canary_max_accuracy_drop must be within [0, 1)")
        if self.drift_threshold <= 0:
            raise InvalidArgument("drift_threshold must be > 0")
        if not 2 <= self.drift_bins <= 100:
            raise InvalidArgument("drift_bins must be 2..100")
