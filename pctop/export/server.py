"""Serving an Exporter on /metrics: a small threaded WSGI server in a daemon thread.

The format follows the scraper's Accept header: OpenMetrics when it asks for it
(Prometheus does), else the text format 0.0.4. No compression: the body is rendered
for every scrape, and gzip would cost more CPU than the render (bench/RESULTS.md).
Loopback by default: the endpoint has no authentication, so any other address must be
asked for (README, "Fleet", says how to protect it).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from pctop.export.collector import Exporter
from pctop.export.text import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9863  # pctop's default; not taken by a well-known exporter


class ListenError(ValueError):
    """A listen address that cannot be used (one line)."""


def parse_listen(spec: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPv6]:PORT` -> (host, port); host defaults to loopback."""
    spec = spec.strip()
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = DEFAULT_HOST, spec
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenError(f"{spec!r}: write an IPv6 address in brackets, e.g. [::1]:{DEFAULT_PORT}")
    if not host:
        raise ListenError(f"{spec!r}: give an address before the colon (e.g. 0.0.0.0:{port}), or only a port")
    try:
        n = int(port)
    except ValueError:
        raise ListenError(f"{spec!r}: the port must be a number") from None
    if not 0 <= n <= 65535:
        raise ListenError(f"{spec!r}: the port must be within 0..65535")
    return host, n


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_app(exporter: Exporter):
    """The WSGI application: /metrics (and /) answer with a scrape, anything else 404."""

    def app(environ, start_response):
        if environ.get("PATH_INFO", "/") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"pctop: metrics are on /metrics\n"]
        openmetrics = "application/openmetrics-text" in environ.get("HTTP_ACCEPT", "")
        body = exporter.render(openmetrics)
        start_response("200 OK", [("Content-Type", OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE),
                                  ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # a scrape a second must not fill stderr
        pass


class MetricsServer:
    """An HTTP server answering /metrics from one Exporter; close() stops it."""

    def __init__(self, exporter: Exporter, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except OSError as e:
            raise ListenError(f"cannot listen on {_show(host, port)}: {e.strerror or e}") from None

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = family

        try:
            self._httpd = make_server(host, port, metrics_app(exporter), Server, handler_class=_Quiet)
        except OSError as e:
            raise ListenError(f"cannot listen on {_show(host, port)}: {e.strerror or e}") from None
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="pctop-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{_show(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
