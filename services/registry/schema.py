"""The registry's SQL schema and its versioned migrations.

`MIGRATIONS` is an ordered list; `migrate(engine)` applies those newer than the number stored
in `schema_version`, all in one transaction (DDL is transactional on SQLite and PostgreSQL)
under a lock, so that several replicas can start at once. Never edit a shipped migration: append a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import sqlalchemy as sa

log = logging.getLogger("aiaas.registry.schema")

metadata = sa.MetaData()

models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("labels", sa.Text, nullable=False, default="{}"),
    # Highest number ever given to a version: numbers are never reused after a deletion.
    sa.Column("last_version", sa.Integer, nullable=False, default=0),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
)

versions = sa.Table(
    "versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("signature", sa.Text, nullable=False),
    sa.Column("serving_config", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Column("reports", sa.Text, nullable=False, default="{}"),
    sa.Column("parent_model", sa.String(63), nullable=False, default=""),
    sa.Column("parent_version", sa.Integer, nullable=False, default=0),
    sa.Column("transformation", sa.String(256), nullable=False, default=""),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
)

aliases = sa.Table(
    "aliases", metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("alias", sa.String(63), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
)

alias_moves = sa.Table(
    "alias_moves", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    sa.Column("alias", sa.String(63), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=False),
    sa.Column("to_version", sa.Integer, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("time_us", sa.BigInteger, nullable=False),
    sa.Index("ix_alias_moves_model_alias", "model_id", "alias", "id"),
)

records = sa.Table(
    "records", metadata,
    sa.Column("kind", sa.String(63), primary_key=True),
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time_us", sa.BigInteger, nullable=False, index=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("model", sa.String(63), nullable=False, default=""),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("details", sa.Text, nullable=False, default="{}"),
    sa.Index("ix_audit_model_id", "model", "id"),
)

# The change feed. Revisions come from `feed_head`, whose single row every writing
# transaction updates first: that row lock serializes writers, so revisions are gapless and
# become visible in order, and a reader can trust "everything after N" (see feed.py).
feed = sa.Table(
    "feed", metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("model", sa.String(63), nullable=False, default=""),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("alias", sa.String(63), nullable=False, default=""),
    sa.Column("from_version", sa.Integer, nullable=False, default=0),
    sa.Column("record_kind", sa.String(63), nullable=False, default=""),
    sa.Column("record_name", sa.String(200), nullable=False, default=""),
    sa.Column("record_data", sa.LargeBinary, nullable=True),
    sa.Column("time_us", sa.BigInteger, nullable=False),
)

feed_head = sa.Table(
    "feed_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

# One row per artifact file the store holds (or is about to remove). `refs` counts the versions that use
# it and changes in the transactions that create and delete them; a file is placed and removed only
# inside a writing transaction (serialized across replicas, see sql_store.py), so replicas sharing a
# directory never remove a file that a version has just started to use.
blobs = sa.Table(
    "blobs", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("refs", sa.Integer, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
    sa.Index("ix_blobs_refs", "refs"),
)

# The files of a multi-file version (a checkpoint directory), each a blob; the version's own sha256 is
# the blob of their manifest. A version holds one reference to each distinct blob it lists.
version_files = sa.Table(
    "version_files", metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("path", sa.String(255), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
)

# Labeled data sets for evaluations: content-addressed files counted in `blobs` like artifacts.
datasets = sa.Table(
    "datasets", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("num_rows", sa.BigInteger, nullable=False),
    sa.Column("columns", sa.Text, nullable=False),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
)

# One EvaluationResult (serialized) per version and evaluation name; deleted with its version.
evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("version_id", "name", name="uq_evaluations_version_name"),
)

schema_version = sa.Table(
    "schema_version", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
)


def _initial_schema(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[models, versions, aliases, alias_moves, records, audit, feed, feed_head])
    conn.execute(feed_head.insert().values(id=1, revision=0))


def _blob_references(conn: sa.Connection) -> None:
    blobs.create(conn)
    now_us = time.time_ns() // 1000
    conn.execute(blobs.insert().from_select(
        ["sha256", "size", "refs", "update_us"],
        sa.select(versions.c.sha256, sa.func.max(versions.c.size), sa.func.count(),
                  sa.literal(now_us, sa.BigInteger)).group_by(versions.c.sha256)))


def _version_files(conn: sa.Connection) -> None:
    version_files.create(conn)


def _datasets_and_evaluations(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[datasets, evaluations])


Migration = Callable[[sa.Connection], None]

# Append only: index + 1 is the schema version a migration produces.
MIGRATIONS: list[tuple[str, Migration]] = [
    ("initial schema", _initial_schema),
    ("blob references", _blob_references),
    ("files of multi-file versions", _version_files),
    ("data sets and evaluations", _datasets_and_evaluations),
]

LATEST = len(MIGRATIONS)


def current_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    found = conn.execute(sa.select(schema_version.c.version).where(schema_version.c.id == 1)).scalar()
    return int(found or 0)


def migrate(engine: sa.Engine) -> int:
    """Bring the database to `LATEST`; returns the schema version found before."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait and then find nothing to do.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242001)"))
        schema_version.create(conn, checkfirst=True)
        found = current_version(conn)
        if found > LATEST:
            raise RuntimeError(f"database schema version {found} is newer than this registry ({LATEST}); upgrade it")
        for number, (title, step) in enumerate(MIGRATIONS[found:], start=found + 1):
            log.info("applying schema migration %d: %s", number, title)
            step(conn)
        if found == 0:
            conn.execute(schema_version.insert().values(id=1, version=LATEST))
        elif found < LATEST:
            conn.execute(schema_version.update().where(schema_version.c.id == 1).values(version=LATEST))
    return found
