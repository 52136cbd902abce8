"""`pctop export`: serve /metrics for Prometheus, headless; and `--export` for `pctop monitor`.

The glue between the command line and pctop/export (which knows only Samples): it opens
the same sources as `monitor` (pctop.cli.monitor.open_samples) and feeds their Samples to an
Exporter. Neither Textual nor bcc is imported here.
"""

from __future__ import annotations

import threading

import click

from pctop.cli.common import Command, UsageError, install_stop_handlers, live_options
from pctop.cli.monitor import open_samples, qmp_ends, sample_loop

LISTEN_HELP = ("[HOST:]PORT to serve /metrics on for Prometheus (default host 127.0.0.1; "
               "another address only when given: the endpoint has no authentication, README 'Fleet').")


def start_server(command: str, listen: str, header):
    """(Exporter, MetricsServer) listening on `listen`; bad input is a one-line error."""
    from pctop.export.collector import Exporter
    from pctop.export.server import ListenError, MetricsServer, is_loopback, parse_listen

    try:
        host, port = parse_listen(listen)
        exporter = Exporter(header)
        server = MetricsServer(exporter, host, port)
    except ListenError as e:
        raise UsageError(command, f"--{'listen' if command == 'export' else 'export'} {e}") from None
    click.echo(f"pctop {command}: serving {server.url}", err=True)
    if not is_loopback(host):
        click.echo(f"pctop {command}: note: {host} is not loopback and /metrics has no authentication; "
                   "put it behind TLS and basic auth or a reverse proxy (README, Fleet)", err=True)
    return exporter, server


@click.command("export", cls=Command)
@live_options
@click.option("--listen", default="127.0.0.1:9863", show_default=True, metavar="[HOST:]PORT", help=LISTEN_HELP)
def export(pids, comm, interval, count, no_ebpf, engine_sockets, qmp_sockets, qmp_source, page_ranges,
           listen) -> None:
    """Serve Prometheus metrics on /metrics, headless, for the same targets as `monitor`.

    Metrics are listed in docs/metrics.md; how to scrape them in docs/fleet.md.
    """
    from pctop.root import Tap

    if page_ranges:
        raise UsageError("export", "--page-ranges is not exported (address ranges are not metrics); "
                                    "use `pctop monitor --json --page-ranges`")
    qmp_sockets = qmp_ends("export", qmp_sockets, qmp_source)
    stop = threading.Event()
    install_stop_handlers(stop)
    header, stats, _ = open_samples("export", pids, comm, interval, no_ebpf, engine_sockets, qmp_sockets)
    try:
        exporter, server = start_server("export", listen, header)
    except BaseException:
        stats.close()
        raise
    try:
        sample_loop(Tap(stats, exporter.observe), interval, count, stop, lambda _sample: None)
    finally:
        server.close()
        stats.close()
