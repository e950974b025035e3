"""One /metrics endpoint for a service on several processes (services/common/telemetry.py): its
own families and its other processes' (read from their loopback exporters), each sample labelled
`process`; a process that does not answer is left out of that scrape, not an error."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from services.common.telemetry import _merged
from tests.support.servers import free_port


def registry_with(calls: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("calls", "Calls served.", ["method"], registry=registry)
    counter.labels("infer").inc(calls)
    histogram = Histogram("latency_ms", "Latency.", buckets=(1.0, 10.0), registry=registry)
    for _ in range(calls):
        histogram.observe(5.0)
    return registry


def test_families_merge_with_a_process_label_and_a_silent_process_is_skipped() -> None:
    other = registry_with(3)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=other)
    try:
        merged = list(_merged(registry_with(2).collect(), [("1", server.server_port), ("2", free_port())]))
    finally:
        server.shutdown()

    class Merged:
        def collect(self):  # type: ignore[no-untyped-def]
            return merged

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(Merged()).decode())}  # type: ignore[arg-type]
    calls = {s.labels["process"]: s.value for s in families["calls"].samples if s.name == "calls_total"}
    assert calls == {"0": 2.0, "1": 3.0}
    buckets = {(s.labels["process"], s.labels["le"]): s.value for s in families["latency_ms"].samples
               if s.name == "latency_ms_bucket"}
    assert buckets[("0", "10.0")] == 2.0 and buckets[("1", "10.0")] == 3.0 and buckets[("1", "1.0")] == 0.0
    assert all(s.labels["method"] == "infer" for s in families["calls"].samples if s.name == "calls_total")


def test_a_process_answering_garbage_is_left_out_whole() -> None:
    import http.server
    import threading

    class Garbled(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"calls_total{process=\"9\"} 1\nthis is { not an exposition\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        merged = list(_merged(registry_with(2).collect(), [("1", server.server_address[1])]))
    finally:
        server.shutdown()
    processes = {s.labels["process"] for family in merged for s in family.samples}
    assert processes == {"0"}  # nothing of the garbled one, not even its first good line
