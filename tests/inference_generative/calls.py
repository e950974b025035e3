"""The generate protocol as clients speak it, with `tritonclient.grpc` (unary and streaming)."""

from __future__ import annotations

import dataclasses
import json
import queue
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


@dataclasses.dataclass
class Answer:
    text: str
    params: dict[str, Any]
    id: str = ""

    @property
    def final(self) -> bool:
        return bool(self.params.get("triton_final_response"))


def inputs(prompt: str | None = None, *, stream: bool | None = None, sampling: dict[str, Any] | None = None,
           exclude_input: bool | None = None, messages: list[dict[str, str]] | None = None) -> list[Any]:
    tensors = []

    def add(name: str, datatype: str, value: Any) -> None:
        tensor = triton.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        tensors.append(tensor)

    if prompt is not None:
        add("text_input", "BYTES", prompt.encode())
    if messages is not None:
        add("messages", "BYTES", json.dumps(messages).encode())
    if stream is not None:
        add("stream", "BOOL", stream)
    if sampling is not None:
        add("sampling_parameters", "BYTES", json.dumps(sampling).encode())
    if exclude_input is not None:
        add("exclude_input_in_output", "BOOL", exclude_input)
    return tensors


def parameters(response: Any) -> dict[str, Any]:
    found = {}
    for key, value in response.parameters.items():
        found[key] = getattr(value, value.WhichOneof("parameter_choice"))
    return found


def answer_of(result: Any) -> Answer:
    text = result.as_numpy("text_output")
    response = result.get_response()
    return Answer(text[0].decode() if text is not None else "", parameters(response), response.id)


def infer(client: triton.InferenceServerClient, model: str, prompt: str | None = None, *,
          tensors: list[Any] | None = None, timeout_s: float | None = None, queue_timeout_us: int | None = None,
          **params: Any) -> Answer:
    """ModelInfer; `timeout_s` is the call's deadline, `queue_timeout_us` Triton's `timeout` parameter."""
    result = client.infer(model, tensors if tensors is not None else inputs(prompt), parameters=params or None,
                          client_timeout=timeout_s, timeout=queue_timeout_us)
    return answer_of(result)


class Stream:
    """One ModelStreamInfer call; answers (or errors) arrive in `events`."""

    def __init__(self, client: triton.InferenceServerClient, *, grpc_errors: bool = False) -> None:
        """`grpc_errors`: a failed request ends the stream with its status (Triton's `triton_grpc_error`)."""
        self.client = client
        self.events: queue.Queue[Answer | InferenceServerException] = queue.Queue()
        client.start_stream(callback=self._on_event, headers={"triton_grpc_error": "true"} if grpc_errors else None)

    def _on_event(self, result: Any, error: InferenceServerException | None) -> None:
        self.events.put(error if error is not None else answer_of(result))

    def send(self, model: str, prompt: str | None = None, *, tensors: list[Any] | None = None, request_id: str = "",
             stream: bool = True, **params: Any) -> None:
        self.client.async_stream_infer(model, tensors if tensors is not None else inputs(prompt, stream=stream),
                                       request_id=request_id, parameters=params or None)

    def next(self, timeout: float = 60.0) -> Answer | InferenceServerException:
        return self.events.get(timeout=timeout)

    def until_final(self, timeout: float = 60.0) -> list[Answer]:
        """Answers of one request up to its final one (an error raises)."""
        answers = []
        while True:
            event = self.next(timeout)
            if isinstance(event, InferenceServerException):
                raise event
            answers.append(event)
            if event.final:
                return answers

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
