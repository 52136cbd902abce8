"""Serving an Exporter on /metrics (prometheus_client's HTTP server, in a daemon thread).

prometheus_client negotiates the format from the Accept header: the text format 0.0.4 by
default, OpenMetrics when the scraper asks for it (Prometheus does). Loopback by default:
the endpoint has no authentication, so any other address must be asked for
(README, "Fleet", says how to protect it).
"""

from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry, start_http_server

from pctop.export.collector import Exporter

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


class MetricsServer:
    """An HTTP server answering /metrics from one Exporter; close() stops it."""

    def __init__(self, exporter: Exporter, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(exporter)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ListenError(f"cannot listen on {_show(host, port)}: {e.strerror or e}") from None
        self.host, self.port = self._httpd.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{_show(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Tee:
    """A Stats (anything with collect() -> Sample) whose every Sample also goes to an
    Exporter: how `monitor --export` serves /metrics beside the JSON Lines or the
    dashboard without either knowing. Other attributes (close, sources) pass through."""

    def __init__(self, stats, exporter: Exporter) -> None:
        self._stats = stats
        self._exporter = exporter

    def collect(self):
        sample = self._stats.collect()
        self._exporter.observe(sample)
        return sample

    def __getattr__(self, name: str):
        return getattr(self._stats, name)
