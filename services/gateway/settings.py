"""Gateway settings: `AIAAS_GATEWAY_*` (then `AIAAS_*`) environment variables and flags."""

from __future__ import annotations

import dataclasses

from aiaas.api_keys import parse_token
from services.common.cpus import MAX_PROCESSES, auto_process_count
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.settings import ServerSettings
from services.gateway.try_timeout import TryTimeouts

REDIS_FAILURE_MODES = ("local", "open", "closed")


@dataclasses.dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    """The public door: auth, quotas, alias routing, canary, shadow traffic, retries."""

    port: int = 8001
    # The OpenAI-compatible HTTP door (/v1/models, /v1/completions, /v1/chat/completions) on this
    # port, same host; 0 picks a free one. --no-openai-enabled serves gRPC only.
    openai_port: int = 8000
    openai_enabled: bool = True
    # Largest request body the OpenAI door reads, in bytes (and no more than max_request_bytes);
    # larger ones get 413.
    openai_max_body_bytes: int = 4 * 1024 * 1024
    # Connections and requests the OpenAI door holds at once; beyond it, new ones get 503.
    openai_max_connections: int = 1024
    # How long the OpenAI door keeps an idle keep-alive connection, in seconds.
    openai_keep_alive_s: float = 5.0
    # Deadline in seconds of a generation (a request to a decoupled model) whose caller sets none.
    generation_timeout_s: float = 600.0
    # Processes serving the gRPC and OpenAI ports (SO_REUSEPORT: the kernel spreads connections over
    # them), each a whole gateway with its own registry feed and upstream channels; they share quotas
    # and kept predictions through Redis, so more than 1 needs redis_url. 0: one per available core
    # from 4 cores up when redis_url is set, else 1 (docs/gateway.md, "Processes").
    processes: int = 0
    # The public door: one client connection gets at most this many open calls.
    max_concurrent_streams: int = 256
    # Registry address (host:port): the model snapshot and change feed (aliases, routes, keys), and
    # where admin writes records and audit entries.
    registry_url: str = "127.0.0.1:50051"
    # Inference replicas: "host:port" entries, or one "dns:///name:port" resolved to every address.
    inference_targets: tuple[str, ...] = ("127.0.0.1:50052",)
    # How often a "dns:///" target is resolved again, in seconds; a failed lookup keeps the current pool.
    dns_refresh_s: float = 5.0
    # Monitor address (host:port) that gets request telemetry, shadow diffs and drift samples;
    # unset sends nothing.
    monitor_url: str | None = None
    # Redis URL (redis://host:6379/0) holding the quota buckets shared by every replica;
    # unset keeps them in this process, one set per replica.
    redis_url: str | None = None

    # Check the API key of every call. Off (--no-auth-enabled), every caller may infer, read and
    # administer: loopback use only.
    auth_enabled: bool = True
    # Server-side secret mixed into every key hash; the same on every replica and the CLI.
    key_pepper: str = ""
    # A full token (`aiaas_<id>_<secret>`) for the first admin key: stored (hashed) in the registry at
    # start when its key id has no record yet; once revoked it stays off (see docs/gateway.md).
    bootstrap_admin_key: str | None = None

    # Requests per second a key without its own quota may send; 0 means unlimited.
    default_key_rps: float = 0.0
    # Burst (token bucket size, in requests) of that default key quota; 0 means max(1, default_key_rps).
    default_key_burst: int = 0
    # Requests per second, across all keys and replicas, for a model whose route sets no quota;
    # 0 means unlimited.
    default_model_rps: float = 0.0
    # Burst (token bucket size, in requests) of that default model quota; 0 means max(1, default_model_rps).
    default_model_burst: int = 0
    # Prompt + completion tokens per minute of generative requests for a key without its own token
    # quota; 0 means unlimited.
    default_key_tokens_per_minute: float = 0.0
    # Tokens per minute, across all keys and replicas, for a generative model whose route sets none;
    # 0 means unlimited.
    default_model_tokens_per_minute: float = 0.0
    # While Redis is slow or down (a timeout or error, then the retry-after window): "local" decides
    # in this process with token buckets at 1/gateway_replicas of each limit; "open" admits requests
    # without a check; "closed" refuses them with UNAVAILABLE and a retry-after hint.
    redis_failure_mode: str = "local"
    # Gateway replicas sharing the quotas in Redis; while Redis is away each one enforces
    # rate / gateway_replicas (burst likewise, at least 1) locally.
    gateway_replicas: int = 1
    # Bound on one Redis call (connect or command), in milliseconds; past it the call counts as failed.
    redis_timeout_ms: float = 50.0
    # After Redis fails, skip it for this long instead of paying its timeout on every request.
    redis_retry_after_s: float = 1.0

    # Alias served when a model has no route (then its latest version).
    default_alias: str = "production"
    # Deadline in seconds of a call whose caller sets none; also of each stream request and shadow copy.
    default_timeout_s: float = 30.0
    # Replicas tried for one request: one that answers UNAVAILABLE (or has not loaded the target yet)
    # hands the request to another, within the caller's deadline. 1 means no retry.
    max_attempts: int = 3
    # HTTP/2 connections to each inference replica, used in turn: an inference replica runs several
    # processes on its port (its frontends) and each connection lands on one of them.
    upstream_connections: int = 8
    # Replica failures in a row (transport failures: refused, reset, GOAWAY; deadlines with no answer)
    # after which a replica is ejected (skipped for a while). Application answers (model loading,
    # queue full or timed out) never count; a replica whose channel cannot connect is ejected at once.
    eject_after_failures: int = 3
    # First ejection's length, in seconds; it doubles on each new ejection and a success resets it.
    eject_base_s: float = 1.0
    # Longest ejection, in seconds.
    eject_max_s: float = 30.0
    # Panic threshold: when more than this share of the replicas is ejected, every replica takes traffic.
    eject_panic_threshold: float = 0.5
    # Active health checks: grpc.health.v1 Check (service "") of each replica on its own channel every
    # this many seconds, give or take 20%. SERVING brings a replica seen down back at once; a check
    # that fails or times out counts as a transport failure; NOT_SERVING ejects at once. 0 turns them off.
    health_check_interval_s: float = 0.5
    # A health check with no answer within this long, in seconds, has failed.
    health_check_timeout_s: float = 1.0
    # How long a ModelInfer try may go unanswered before the same request also goes to another
    # replica (a hedge: the first answer wins, and a stalled try that loses counts against its
    # replica). "auto": max(per_try_timeout_floor_s, per_try_timeout_p99_factor x the replica's
    # recent p99 latency); a number: that many seconds; "off": a try waits for the caller's deadline.
    # No hedge when less than per_try_timeout_floor_s of the caller's deadline would be left.
    per_try_timeout: str = "auto"
    # Shortest per-try timeout in seconds, and the least time left to the caller's deadline for a hedge.
    per_try_timeout_floor_s: float = 0.25
    # The "auto" per-try timeout is this many times the replica's recent p99.
    per_try_timeout_p99_factor: float = 3.0
    # Shadow copies in flight at once; beyond it sampled copies are dropped. 0 drops every copy.
    shadow_max_concurrency: int = 16
    # A shadow's numeric outputs match the live ones within this, relative and absolute (BYTES exactly).
    shadow_tolerance: float = 1e-4
    # Requests of one ModelStreamInfer stream in flight at once; further ones wait to be read.
    stream_window: int = 64
    # ModelInfer calls to one target (model version or alias) per replica running at once before further
    # requests to it wait and go merged into one call when one comes back (their rows concatenated, up
    # to the version's max batch size; see services/gateway/merging.py). A lone request never waits.
    # 0 forwards every request on its own.
    merge_max_in_flight: int = 1
    # Share of successful ModelInfer requests whose inputs are sent to the monitor for drift (PSI);
    # the reporter also caps samples per model per second. 0 turns it off.
    drift_sample_rate: float = 0.01
    # Share of successful ModelInfer requests carrying an `id` whose prediction is kept for Feedback
    # (labels sent back later, joined to it for online accuracy); 0 turns it off.
    feedback_sample_rate: float = 0.05
    # How long a kept prediction waits for its label, in seconds (the Redis TTL).
    feedback_window_s: float = 6 * 3600.0
    # Kept predictions waiting to be written at once; beyond it they are dropped (counted).
    feedback_max_pending: int = 256
    # Predictions kept in this process when redis_url is unset (the oldest go first).
    feedback_max_entries: int = 100_000

    # Largest request accepted, in bytes; also the gRPC receive limit (RESOURCE_EXHAUSTED above it).
    # grpcio buffers an oversized message once before refusing it, so the API key is checked
    # before any body is read.
    max_request_bytes: int = 64 * 1024 * 1024
    # A caller's request message must arrive within this long once its key was accepted (keys
    # are checked before any body is read); long enough for the largest request on a slow link.
    body_timeout_s: float = 10.0
    # Inputs one request may carry; more is refused with INVALID_ARGUMENT.
    max_inputs: int = 64
    # Dimensions one input's shape may have; more is refused with INVALID_ARGUMENT.
    max_rank: int = 8
    # Elements one input may hold (the product of its shape); more is refused with INVALID_ARGUMENT.
    max_elements: int = 64 * 1024 * 1024

    @property
    def process_count(self) -> int:
        """Processes that serve the ports, this one included."""
        return auto_process_count(self.processes) if self.redis_url else 1

    def try_timeouts(self) -> TryTimeouts:
        return TryTimeouts.parse(self.per_try_timeout, floor_s=self.per_try_timeout_floor_s,
                                 p99_factor=self.per_try_timeout_p99_factor)

    def _validate_openai(self) -> None:
        if not 0 <= self.openai_port <= 65535 or (self.openai_enabled and self.openai_port == self.port != 0):
            raise InvalidArgument("openai_port must be a port (0-65535) other than the gRPC port")
        if self.openai_max_body_bytes < 1024:
            raise InvalidArgument("openai_max_body_bytes must be at least 1 KiB")
        if self.openai_max_connections < 1 or self.openai_keep_alive_s <= 0 or self.generation_timeout_s <= 0:
            raise InvalidArgument(
                "openai_max_connections must be >= 1, openai_keep_alive_s and generation_timeout_s > 0"
            )

    def _validate_feedback(self) -> None:
        if not 0.0 <= self.feedback_sample_rate <= 1.0:
            raise InvalidArgument("feedback_sample_rate must be within [0, 1]")
        if self.feedback_window_s <= 0 or self.feedback_max_pending < 1 or self.feedback_max_entries < 1:
            raise InvalidArgument("feedback_window_s must be > 0, feedback_max_pending and feedback_max_entries >= 1")

    def _validate_processes(self) -> None:
        if not 0 <= self.processes <= MAX_PROCESSES:
            raise InvalidArgument(f"processes must be between 0 (one per available core) and {MAX_PROCESSES}")
        if self.processes > 1 and not self.redis_url:
            raise InvalidArgument(
                "processes > 1 share quotas and kept predictions through Redis: set redis_url, or run one process"
            )

    def validate(self) -> None:
        super().validate()
        if self.redis_failure_mode not in REDIS_FAILURE_MODES:
            raise InvalidArgument(f"redis_failure_mode must be one of {REDIS_FAILURE_MODES}")
        if not self.inference_targets:
            raise InvalidArgument("inference_targets needs at least one target")
        if self.auth_enabled and not self.key_pepper:
            raise InvalidArgument(
                "auth is on and key_pepper is empty: set AIAAS_GATEWAY_KEY_PEPPER (the same on every replica)"
            )
        if self.bootstrap_admin_key:
            try:
                parse_token(self.bootstrap_admin_key)
            except Unauthenticated:
                raise InvalidArgument("bootstrap_admin_key must be a token `aiaas_<key id>_<secret>`") from None
        self._validate_processes()
        if self.gateway_replicas < 1:
            raise InvalidArgument("gateway_replicas must be >= 1")
        if self.max_attempts < 1 or not 1 <= self.upstream_connections <= 64:
            raise InvalidArgument("max_attempts must be >= 1 and upstream_connections between 1 and 64")
        if not 0.0 <= self.eject_panic_threshold <= 1.0:
            raise InvalidArgument("eject_panic_threshold must be between 0 and 1")
        if self.health_check_interval_s < 0 or self.health_check_timeout_s <= 0:
            raise InvalidArgument("health_check_interval_s must be >= 0 and health_check_timeout_s > 0")
        self.try_timeouts()
        self._validate_openai()
        for name in ("default_key_rps", "default_model_rps", "redis_timeout_ms", "default_timeout_s",
                     "default_key_tokens_per_minute", "default_model_tokens_per_minute"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0")
        if not 0.0 <= self.drift_sample_rate <= 1.0:
            raise InvalidArgument("drift_sample_rate must be within [0, 1]")
        self._validate_feedback()
        if not 1024 <= self.max_request_bytes <= self.max_message_bytes:
            raise InvalidArgument(
                f"max_request_bytes must be between 1 KiB and max_message_bytes ({self.max_message_bytes})"
            )
        if self.body_timeout_s <= 0:
            raise InvalidArgument("body_timeout_s must be > 0")
        if self.shadow_max_concurrency < 0 or self.stream_window < 1 or self.merge_max_in_flight < 0:
            raise InvalidArgument("shadow_max_concurrency and merge_max_in_flight (0 turns merging off) must be "
                                  ">= 0, and stream_window >= 1")
