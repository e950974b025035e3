"""Typed settings from `AIAAS_*` environment variables and command-line flags (flags win).

A service declares a dataclass deriving from `ServerSettings`; `load_settings` reads, for each
field `foo_bar`: the flag `--foo-bar`, else `AIAAS_<SERVICE>_FOO_BAR`, else `AIAAS_FOO_BAR`,
else the dataclass default. Settings are built once at start-up and passed down.

`--help` lists every setting with its type, default, environment variables and description: the
comment lines above the field (or `field(metadata={"help": ...})`), read by `settings_help` only then.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from aiaas.identity import ClientIdentity
from services.common.errors import InvalidArgument
from services.common.eventloop import CHOICES as EVENT_LOOPS
from services.common.eventloop import loop_kind

T = TypeVar("T", bound="ServerSettings")

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every gRPC service shares. Services subclass it and override `port`."""

    # Address the gRPC server (and the metrics endpoint) binds: loopback unless told otherwise;
    # 0.0.0.0 listens on every interface (containers, where the pod network is the boundary).
    host: str = "127.0.0.1"
    # gRPC port; each service sets its own default, 0 picks a free one.
    port: int = 0
    # Largest gRPC message sent or received (a service may cap what it receives lower); a larger one
    # is refused with RESOURCE_EXHAUSTED.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # PEM certificate chain file; set with tls_key, the service serves TLS instead of plaintext.
    tls_cert: str | None = None
    # PEM private key file of tls_cert.
    tls_key: str | None = None
    # When set, clients must present a certificate signed by this CA (mTLS).
    tls_client_ca: str | None = None
    # Every call must carry a verified caller identity (an mTLS client certificate when
    # tls_client_ca is set, or a token verified with identity_token_key) allowed by the
    # authorization policy; off: anyone may call anything (local development only).
    require_identity: bool = True
    # PEM file of the Ed25519 public key(s) that verify development identity tokens (aiaas up
    # makes one per stack); unset: only certificates identify callers.
    identity_token_key: str | None = None
    # The authorization policy (YAML: identity -> RPCs and resources); unset: the built-in one,
    # services/common/authz_policy.yaml.
    authz_policy: str | None = None
    # SPIFFE trust domain of caller certificates (spiffe://<trust_domain>/<namespace>/<name>).
    trust_domain: str = "aiaas"
    # Calls this service makes to other aiaas services: the CA that signed their certificates
    # (turns client TLS on).
    client_tls_ca: str | None = None
    # This service's own certificate, presented to the services it calls (mTLS identity).
    client_tls_cert: str | None = None
    # PEM private key of client_tls_cert.
    client_tls_key: str | None = None
    # Server name expected in the called services' certificates, when it differs from the
    # address's host name.
    client_tls_server_name: str | None = None
    # File holding this service's development identity token, sent on calls to other services.
    identity_token_file: str | None = None
    # On SIGTERM, how long in-flight calls may run on before they are cancelled.
    grace_period_s: float = 20.0
    # Python logging level: debug, info, warning, error.
    log_level: str = "info"
    # One JSON object per log line (for collectors); off: plain text for people.
    log_json: bool = True
    # OpenTelemetry collector (host:port, gRPC) receiving traces and metrics; unset: no export.
    otlp_endpoint: str | None = None
    # Port for a Prometheus /metrics endpoint; 0 disables it.
    metrics_port: int = 0
    # Calls the whole server runs at once; further calls are refused with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 10_000
    # Per connection: how many calls one connection may have open at once (HTTP/2
    # SETTINGS_MAX_CONCURRENT_STREAMS), so one connection cannot take every call slot. Internal
    # clients multiplex all their calls on one connection (gateway -> inference): keep it high.
    max_concurrent_streams: int = 1024
    # Ping a connection that has been quiet this long, and close it when no answer comes within
    # the timeout: a dead or vanished peer does not hold its calls and file descriptor forever.
    keepalive_time_ms: int = 60_000
    # How long such a ping may go unanswered before the connection is closed.
    keepalive_timeout_ms: int = 20_000
    # Clients may ping at most this often when no data flows (more often: GOAWAY), and may ping
    # with no call open when `keepalive_permit_without_calls` is on.
    keepalive_min_ping_interval_ms: int = 10_000
    # Accept client pings on a connection with no call open.
    keepalive_permit_without_calls: bool = True
    # Close a connection with no open call for this long (0: never).
    max_connection_idle_ms: int = 300_000
    # Close every connection after this long, letting open calls finish within the grace
    # (0: never). Off by default: it also ends long watch and inference streams, which their
    # clients must then reopen; set it where a load balancer needs connections to move.
    max_connection_age_ms: int = 0
    # How long calls still open at max_connection_age_ms may run before the connection closes.
    max_connection_age_grace_ms: int = 30_000
    # The event loop: auto (uvloop where installed, else asyncio's own), uvloop (fail without it)
    # or asyncio. The service's own child processes (gateway processes, inference frontends) run
    # on the same one.
    event_loop: str = "auto"

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be 0..65535, got {self.port}")
        if self.max_message_bytes < 1024 * 1024:
            raise InvalidArgument("max_message_bytes must be at least 1 MiB")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if bool(self.client_tls_cert) != bool(self.client_tls_key):
            raise InvalidArgument("client_tls_cert and client_tls_key must be given together")
        if self.client_tls_cert and not self.client_tls_ca:
            raise InvalidArgument("client_tls_cert needs client_tls_ca (the CA that signed the services)")
        if self.grace_period_s < 0:
            raise InvalidArgument("grace_period_s must be >= 0")
        if self.max_concurrent_rpcs < 1 or self.max_concurrent_streams < 1:
            raise InvalidArgument("max_concurrent_rpcs and max_concurrent_streams must be >= 1")
        if self.keepalive_time_ms < 1000 or self.keepalive_timeout_ms < 1000:
            raise InvalidArgument("keepalive_time_ms and keepalive_timeout_ms must be at least 1000")
        for name in ("keepalive_min_ping_interval_ms", "max_connection_idle_ms", "max_connection_age_ms",
                     "max_connection_age_grace_ms"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0 (0 turns it off)")
        if self.event_loop not in EVENT_LOOPS:
            raise InvalidArgument(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        try:
            loop_kind(self.event_loop)
        except RuntimeError as exc:
            raise InvalidArgument(str(exc)) from None


    def client_identity(self) -> ClientIdentity:
        """What this service presents when it calls another aiaas service."""
        try:
            return ClientIdentity.from_files(
                tls_ca=self.client_tls_ca, tls_cert=self.client_tls_cert, tls_key=self.client_tls_key,
                server_name=self.client_tls_server_name, token_file=self.identity_token_file,
            )
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"client identity: {exc}") from None


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Return (inner type, optional) for annotations like `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, _ = _base_type(args[0])
        return inner, True
    if origin in (list, tuple):
        return list, False
    return annotation, False


def _parse(raw: str, kind: type, name: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is list:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise InvalidArgument(f"setting {name}: cannot read {raw!r} as {kind.__name__}") from None


def _env_names(service: str, name: str) -> list[str]:
    return [f"AIAAS_{service.upper()}_{name.upper()}", f"AIAAS_{name.upper()}"]


def _add_setting(container: argparse._ActionsContainer, field: dataclasses.Field[Any], kind: type,
                 help_text: str | None = None) -> argparse.Action:
    flag = "--" + field.name.replace("_", "-")
    if kind is bool:
        return container.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                                      help=help_text)
    return container.add_argument(flag, dest=field.name, default=None, metavar=kind.__name__.upper(), help=help_text)


class _SettingsHelp(argparse.Action):
    """`-h/--help`: every setting with its type, default, env names and description, then exit. The
    descriptions are read from source here, so a service that starts normally never pays for it."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, settings_cls: type, service: str) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show every setting: flag, type, default, environment variables, description")
        self.settings_cls = settings_cls
        self.service = service

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from services.common.settings_help import help_parser

        described = help_parser(self.settings_cls, self.service, _add_setting, lambda a: _base_type(a)[0],
                                lambda name: _env_names(self.service, name))
        described.print_help()
        parser.exit()


def load_settings(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    service: str,
    environ: Mapping[str, str] | None = None,
) -> T:
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}", description=cls.__doc__,
                                     add_help=False)
    parser.add_argument("-h", "--help", action=_SettingsHelp, settings_cls=cls, service=service)
    for field in dataclasses.fields(cls):
        _add_setting(parser, field, _base_type(hints[field.name])[0])
    parsed = vars(parser.parse_args(list(argv) if argv is not None else []))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind, _ = _base_type(hints[field.name])
        flag_value = parsed.get(field.name)
        if flag_value is not None:
            values[field.name] = flag_value if kind is bool else _parse(flag_value, kind, field.name)
            continue
        for key in _env_names(service, field.name):
            if key in env:
                values[field.name] = _parse(env[key], kind, key)
                break
    settings = cls(**values)
    settings.validate()
    return settings
