"""The kinds of registry Records the platform keeps, each with its name rule and its codec.

A Record is (kind, name, data bytes) in the registry, versioned by revision and sent on the change
feed. The gateway keeps API keys and routes there, the monitor SLOs and baselines, the CLI writes
the first admin key, and a model's evaluation gate lists what its promotion requires. Adding a
kind is a `RecordKind` here (its data is one proto message).
"""

from __future__ import annotations

import dataclasses
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from aiaas.errors import InvalidArgument
from aiaas.gateway.v1 import gateway_pb2
from aiaas.monitor.v1 import monitor_pb2
from aiaas.registry.v1 import evaluation_pb2, registry_pb2

M = TypeVar("M", bound=Message)


@dataclasses.dataclass(frozen=True)
class RecordKind(Generic[M]):
    """One kind of Record: its `kind` string, the message its data holds, and how it is named."""

    kind: str
    message: type[M]
    named_by: str

    def encode(self, message: M) -> bytes:
        if not isinstance(message, self.message):
            raise TypeError(f"a {self.kind} record holds {self.message.DESCRIPTOR.full_name}, "
                            f"not {type(message).__name__}")
        return message.SerializeToString()

    def decode(self, data: bytes, name: str = "") -> M:
        try:
            return self.message.FromString(data)
        except DecodeError:
            raise InvalidArgument(f"{self.kind} record {name!r} does not parse as "
                                  f"{self.message.DESCRIPTOR.full_name}") from None

    def record(self, name: str, message: M) -> registry_pb2.Record:
        """The registry Record that stores `message` under `name`."""
        return registry_pb2.Record(kind=self.kind, name=name, data=self.encode(message))


API_KEY = RecordKind("api_key", gateway_pb2.StoredApiKey, "key id")
ROUTE = RecordKind("route", gateway_pb2.Route, "model")
SLO = RecordKind("slo", monitor_pb2.SLO, "model")
BASELINE = RecordKind("baseline", monitor_pb2.Baseline, "<model>/<version>")
# The evaluations a model requires before a gated alias moves; read by the registry's promotion gate.
EVALUATION_GATE = RecordKind("evaluation_gate", evaluation_pb2.EvaluationGate, "model")

KINDS: dict[str, RecordKind[Message]] = {k.kind: k for k in (  # type: ignore[misc]
    API_KEY, ROUTE, SLO, BASELINE, EVALUATION_GATE)}


def baseline_name(model: str, version: int) -> str:
    return f"{model}/{version}"


def baseline_key(name: str) -> tuple[str, int]:
    """(model, version) of a baseline record's name (the inverse of `baseline_name`)."""
    model, _, version = name.rpartition("/")
    if not model or not version.isdigit():
        raise InvalidArgument(f"baseline record name {name!r} is not <model>/<version>")
    return model, int(version)
