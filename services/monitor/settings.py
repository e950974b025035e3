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
    # Shared windows for several replicas; empty keeps them in this process.
    redis_url: str | None = None

    bucket_s: float = 1.0
    retention_s: float = 3600.0
    default_window_s: float = 60.0
    evaluation_interval_s: float = 1.0
    # How often SLOs, baselines and routes are re-read from the registry.
    control_refresh_s: float = 2.0

    slo_window_s: float = 60.0
    slo_min_requests: int = 20

    drift_threshold: float = 0.2
    drift_window_s: float = 120.0
    drift_min_samples: int = 200
    drift_bins: int = 10

    canary_alias: str = "canary"
    production_alias: str = "production"
    canary_window_s: float = 60.0
    canary_min_requests: int = 50
    canary_alpha: float = 0.01
    canary_min_error_increase: float = 0.02
    canary_max_p99_ratio: float = 2.0
    canary_min_p99_increase_ms: float = 5.0
    # False: analyse and alert, but leave the route alone.
    canary_rollback: bool = True

    shadow_window_s: float = 60.0
    shadow_mismatch_rate: float = 0.05
    shadow_min_samples: int = 20

    alert_history: int = 1000
    subscriber_queue: int = 1000

    def validate(self) -> None:
        super().validate()
        if self.bucket_s <= 0 or self.retention_s < self.bucket_s:
            raise InvalidArgument("bucket_s must be > 0 and retention_s >= bucket_s")
        for name in ("default_window_s", "slo_window_s", "drift_window_s", "canary_window_s", "shadow_window_s"):
            value = getattr(self, name)
            if value <= 0 or value > self.retention_s:
                raise InvalidArgument(f"{name} must be > 0 and <= retention_s ({self.retention_s}), got {value}")
        if self.evaluation_interval_s <= 0:
            raise InvalidArgument("evaluation_interval_s must be > 0")
        if not 0 < self.canary_alpha < 1:
            raise InvalidArgument("canary_alpha must be between 0 and 1")
        if self.canary_max_p99_ratio <= 1:
            raise InvalidArgument("canary_max_p99_ratio must be > 1")
        if self.drift_threshold <= 0:
            raise InvalidArgument("drift_threshold must be > 0")
        if not 2 <= self.drift_bins <= 100:
            raise InvalidArgument("drift_bins must be 2..100")
