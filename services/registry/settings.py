"""Registry settings: `AIAAS_REGISTRY_*` / `AIAAS_*` environment variables and flags (flags win)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from aiaas import artifact_gate
from services.common.errors import InvalidArgument
from services.common.settings import ServerSettings

DEFAULT_PORT = 50051


def aiaas_home() -> Path:
    return Path(os.environ.get("AIAAS_HOME") or Path.home() / ".aiaas")


@dataclasses.dataclass(frozen=True)
class RegistrySettings(ServerSettings):
    """The model registry: models, versions, artifacts, aliases, audit log and change feed."""

    port: int = DEFAULT_PORT
    # SQLAlchemy URL; empty means SQLite at $AIAAS_HOME/registry.db (~/.aiaas by default).
    # PostgreSQL (several replicas): postgresql+psycopg://user@host:5432/db
    database_url: str = ""
    # Content-addressed artifact directory; empty means $AIAAS_HOME/artifacts.
    artifact_dir: str = ""
    # Largest artifact a version may have, in bytes (4 GiB); a larger declared artifact_size (for a checkpoint
    # directory: the sum of its files) is refused (INVALID_ARGUMENT) before a byte is stored.
    max_artifact_bytes: int = 4 * 1024**3
    # How many change-feed events are kept for watchers that resume after a disconnect.
    feed_retention: int = 10_000
    # How often a watched registry looks for commits made by other replicas.
    feed_poll_s: float = 0.25
    # How long a watch stays silent before a HEARTBEAT.
    heartbeat_s: float = 5.0
    # Uploads in progress at once; one more is refused with RESOURCE_EXHAUSTED before it holds anything.
    max_concurrent_uploads: int = 64
    # An upload that sends no artifact bytes for this long is aborted (DEADLINE_EXCEEDED).
    upload_idle_timeout_s: float = 60.0
    # An upload still running after this long is aborted, however steadily it sends.
    upload_max_duration_s: float = 3600.0
    # Temporary files of dead uploads (a crashed replica, a lost stream) are removed once untouched
    # this long. Live uploads write at least every upload_idle_timeout_s, so keep it well above that:
    # replicas sharing an artifact directory sweep each other's files.
    upload_stale_after_s: float = 300.0
    # How often this process looks for such files (and for blobs a deletion left unreferenced without removing).
    upload_sweep_interval_s: float = 60.0
    # Artifact formats this registry accepts (comma-separated); each is checked by the artifact gate
    # at upload. Drop 'torchscript' to turn off the deprecated format whose archives carry code.
    allowed_formats: str = "torchscript,torch_export,onnx,safetensors,hf_causal_lm"
    # Largest labeled data set (UploadDataset) in bytes (4 GiB); a larger declared size is refused at once.
    max_dataset_bytes: int = 4 * 1024**3
    # Aliases the promotion gate guards (comma-separated): a model's evaluation gate must pass before one
    # of them points at a version, unless the move is forced with a reason (empty: no gate).
    gated_aliases: str = "production"

    def format_set(self) -> frozenset[str]:
        return frozenset(f.strip() for f in self.allowed_formats.split(",") if f.strip())

    def gated_alias_set(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.gated_aliases.split(",") if a.strip())

    def validate(self) -> None:
        super().validate()
        if self.max_artifact_bytes < 1:
            raise InvalidArgument("max_artifact_bytes must be positive")
        if self.feed_retention < 1:
            raise InvalidArgument("feed_retention must be at least 1")
        if self.feed_poll_s <= 0 or self.heartbeat_s <= 0:
            raise InvalidArgument("feed_poll_s and heartbeat_s must be positive")
        unknown = set(self.format_set()) - set(artifact_gate.FORMATS)
        if unknown or not self.format_set():
            raise InvalidArgument(f"allowed_formats {self.allowed_formats!r}: use a comma-separated subset of "
                                  f"{', '.join(artifact_gate.FORMATS)}")
        if self.max_dataset_bytes < 1:
            raise InvalidArgument("max_dataset_bytes must be positive")
        if self.max_concurrent_uploads < 1:
            raise InvalidArgument("max_concurrent_uploads must be at least 1")
        if self.upload_idle_timeout_s <= 0 or self.upload_sweep_interval_s <= 0:
            raise InvalidArgument("upload_idle_timeout_s and upload_sweep_interval_s must be positive")
        if self.upload_max_duration_s < self.upload_idle_timeout_s:
            raise InvalidArgument("upload_max_duration_s must be at least upload_idle_timeout_s")
        if self.upload_stale_after_s < 2 * self.upload_idle_timeout_s:
            raise InvalidArgument(
                f"upload_stale_after_s ({self.upload_stale_after_s:g}) must be at least twice upload_idle_timeout_s "
                f"({self.upload_idle_timeout_s:g}), or the sweeper could remove a live upload's file")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{aiaas_home() / 'registry.db'}"

    def resolved_artifact_dir(self) -> Path:
        return Path(self.artifact_dir) if self.artifact_dir else aiaas_home() / "artifacts"
