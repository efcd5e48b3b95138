"""Prometheus metrics and the small HTTP server that also serves the status page.

The metrics live in their own CollectorRegistry (not prometheus_client's
global one), so two gateways, or two tests, in one process never share
counts. Counters and histograms are thread-safe in prometheus_client, so the
asyncio loop updates them while the HTTP thread reads them.

The server is the standard library's ThreadingHTTPServer on one daemon
thread: Prometheus scrapes and a technician's browser are a few requests a
second, and a thread keeps a slow client from ever stalling the event loop.
It serves:
  /metrics            Prometheus text format
  /                   the status page (gateway/status_page.py)
  /api/status.json    the dict the page polls
`status()` is called on the HTTP thread: hand it a function that returns a
snapshot (a fresh dict, or one the loop replaces whole and never mutates).
"""

import json
import logging
import math
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import status_page
from gateway.logs import log_event

log = logging.getLogger("prapa.gateway.http")

_log = partial(log_event, log)   # _log(level, event, exc_info=False, **fields): one JSON object per line


COMMIT_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
PUBACK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every gateway metric; the service updates the attributes directly.

    frames_received.labels(link=...).inc()         every frame off a link, good or bad
    rejections.labels(reason=...).inc()            a refused frame (reasons from protocol.link / secure)
    readings_committed.inc(n)                      entries durably committed (then acknowledged)
    backlog.set(n)                                 entries committed but not yet PUBACKed
    commit_latency.observe(s)                      one group commit, BEGIN to fsynced COMMIT
    puback_latency.observe(s)                      PUBLISH sent to PUBACK received
    device_seen(device_id, t)                      last verified frame of a device (Unix seconds)
    broker_connected.labels(broker=url).set(0|1)
    acks_withheld.set(0|1)                         1 while the disk-full guard holds back acknowledgements
    """

    def __init__(self, site=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_received = Counter("prapa_frames_received", "Frames received from boards, good or bad",
                                       ["link"], registry=r)
        self.rejections = Counter("prapa_frames_rejected", "Frames refused, by reason", ["reason"], registry=r)
        self.readings_committed = Counter("prapa_readings_committed", "Entries durably committed to the store",
                                          registry=r)
        self.backlog = Gauge("prapa_backlog_entries", "Entries committed and not yet PUBACKed by a broker",
                             registry=r)
        self.commit_latency = Histogram("prapa_commit_latency_seconds", "Group commit time, BEGIN to fsynced COMMIT",
                                        buckets=COMMIT_BUCKETS_S, registry=r)
        self.puback_latency = Histogram("prapa_puback_latency_seconds", "PUBLISH to PUBACK time",
                                        buckets=PUBACK_BUCKETS_S, registry=r)
        self.device_last_seen = Gauge("prapa_device_last_seen_timestamp_seconds",
                                      "Unix time of the last verified frame from a device", ["device"], registry=r)
        self.broker_connected = Gauge("prapa_broker_connected", "1 while connected to this broker",
                                      ["broker"], registry=r)
        self.acks_withheld = Gauge("prapa_acks_withheld", "1 while low disk space holds back acknowledgements",
                                   registry=r)
        if site is not None:
            Gauge("prapa_gateway_info", "This gateway", ["site"], registry=r).labels(site=site).set(1)

    def device_seen(self, device_id, t):
        self.device_last_seen.labels(device=str(device_id)).set(t)

    def exposition(self):
        """The /metrics body (bytes, Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)


class HttpServer:
    """/metrics, / and /api/status.json on one address, from a daemon thread.

    HttpServer(host, port, metrics, status): port 0 picks a free port (see
    .port). start() binds and returns at once; close() stops and joins.
    A bind failure (port taken) raises OSError from start(), before the
    service reports READY.
    """

    def __init__(self, host, port, metrics, status):
        self.host, self.requested_port, self.metrics, self.status = host, port, metrics, status
        self._server = None
        self._thread = None

    @property
    def port(self):
        return self._server.server_address[1]

    def start(self):
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = ThreadingHTTPServer((self.host, self.requested_port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="prapa-http", daemon=True)
        self._thread.start()
        _log(logging.INFO, "http_listening", host=self.host, port=self.port)
        return self

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    owner = None
    server_version = "prapa-gateway"
    sys_version = ""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, self.owner.metrics.exposition())
            elif path == "/api/status.json":
                body = json.dumps(_finite(self.owner.status()), allow_nan=False, default=str).encode()
                self._send(200, "application/json", body)
            elif path in ("/", "/index.html"):
                page = status_page.render(self.owner.status()).encode()
                self._send(200, "text/html; charset=utf-8", page, {"Content-Security-Policy": status_page.CSP})
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /, /metrics or /api/status.json\n")
        except Exception:
            _log(logging.ERROR, "http_error", path=path, exc_info=True)
            self._send(500, "text/plain; charset=utf-8", b"status unavailable; see the gateway log\n")

    def _send(self, code, content_type, body, headers=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        _log(logging.DEBUG, "http_request", request=fmt % args)


def _finite(value):
    """NaN and infinities as null: browsers' JSON.parse refuses them, and one bad reading must not blank the page."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
