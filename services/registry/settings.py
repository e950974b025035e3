"""Registry settings: `AIAAS_REGISTRY_*` / `AIAAS_*` environment variables and flags (flags win)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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
    max_artifact_bytes: int = 4 * 1024**3
    # How many change-feed events are kept for watchers that resume after a disconnect.
    feed_retention: int = 10_000
    # How often a watched registry looks for commits made by other replicas.
    feed_poll_s: float = 0.25
    # How long a watch stays silent before a HEARTBEAT.
    heartbeat_s: float = 5.0

    def validate(self) -> None:
        super().validate()
        if self.max_artifact_bytes < 1:
            raise InvalidArgument("max_artifact_bytes must be positive")
        if self.feed_retention < 1:
            raise InvalidArgument("feed_retention must be at least 1")
        if self.feed_poll_s <= 0 or self.heartbeat_s <= 0:
            raise InvalidArgument("feed_poll_s and heartbeat_s must be positive")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{aiaas_home() / 'registry.db'}"

    def resolved_artifact_dir(self) -> Path:
        return Path(self.artifact_dir) if self.artifact_dir else aiaas_home() / "artifacts"
