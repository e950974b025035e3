from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetLimitsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLimitsResponse(_message.Message):
    __slots__ = ("max_generations", "max_events")
    MAX_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    max_generations: int
    max_events: int
    def __init__(self, max_generations: _Optional[int] = ..., max_events: _Optional[int] = ...) -> None: ...

class StreamGenerationsRequest(_message.Message):
    __slots__ = ("tag", "request", "timeout_s", "request_id", "traceparent")
    TAG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    tag: int
    request: bytes
    timeout_s: float
    request_id: str
    traceparent: str
    def __init__(self, tag: _Optional[int] = ..., request: _Optional[bytes] = ..., timeout_s: _Optional[float] = ..., request_id: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class StreamGenerationsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[GenerationEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[GenerationEvent, _Mapping]]] = ...) -> None: ...

class GenerationEvent(_message.Message):
    __slots__ = ("tag", "response", "last", "error_code", "error_message")
    TAG_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tag: int
    response: bytes
    last: bool
    error_code: str
    error_message: str
    def __init__(self, tag: _Optional[int] = ..., response: _Optional[bytes] = ..., last: _Optional[bool] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...
