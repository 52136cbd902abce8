"""`pctop engine source --listen HOST:PORT` and `pctop engine dest --connect HOST:PORT`:
the two halves of the reference engine as separate processes, on one machine or two.

The source owns the memory image and serves it; the destination runs the guest,
takes the pages, serves the control socket and verifies every page at the end
(docs/engine-control.md, docs/protocol.md). `pctop demo` is the same pair on one
machine, joined by a unix socket.
"""

from __future__ import annotations

import json
import os
import sys

import click

from pctop.cli.common import HELP, SIZE, Command, UsageError
from pctop.cli.demo import demo

# The destination takes the demo's options for the guest and the run (same names,
# same defaults): they are the demo's own click parameters, not copies.
DEST_FROM_DEMO = ("memory", "vcpus", "strategy", "readers", "pattern", "write_ratio", "bandwidth",
                  "no_background", "duration", "pin", "seed", "control", "workload")


@click.group("engine", context_settings=HELP)
def engine() -> None:
    """Run the reference engine's source and destination as two processes (two hosts)."""


def _token(command: str, token_file: str | None) -> bytes | None:
    from pctop.engine.link import LinkError, load_token

    try:
        return load_token(token_file)
    except LinkError as e:
        raise UsageError(command, str(e)) from None


@engine.command("source", cls=Command, context_settings=HELP)
@click.option("--listen", default="127.0.0.1:7420", show_default=True, metavar="HOST:PORT",
              help="Where to wait for the destination (unix:PATH for a unix socket; port 0 = any free "
                   "port). Any address but loopback needs a token.")
@click.option("--memory", type=SIZE, default="512M", show_default=True, help="Guest memory (must match the destination).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=1, show_default=True,
              help="Image content seed (must match the destination).")
@click.option("--bandwidth", type=SIZE, default="32M", show_default=True, help="Background stream bytes/s; 0 = unlimited.")
@click.option("--no-background", is_flag=True, help="No background stream: pages move only on demand.")
@click.option("--prefetch", type=click.IntRange(0, 512), default=0, show_default=True,
              help="Pages after each demand fault the stream sends first.")
@click.option("--token-file", metavar="PATH", help="Shared token (else the PCTOP_ENGINE_TOKEN variable).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Give up when no destination has (re)connected for this many seconds.")
def source(listen, memory, seed, bandwidth, no_background, prefetch, token_file, wait_s):
    """Serve a memory image to one destination; survive link failures until it has every page.

    Prints one JSON line on stdout once listening: {"type": "listening", "address": ...}.
    Exit status: 0 the destination confirmed it has every page, 1 it never came (back), 2 bad usage.
    """
    from pctop.engine.link import LinkError, is_local, parse_address
    from pctop.engine.page_server import serve_source

    try:
        addr = parse_address(listen)
    except LinkError as e:
        raise UsageError("engine source", str(e)) from None
    if memory < 4096 or memory % 4096:
        raise UsageError("engine source", f"--memory must be a multiple of 4K, got {memory}")
    token = _token("engine source", token_file)
    if token is None and not is_local(addr):
        raise UsageError("engine source", f"listening on {addr.host} (not loopback) needs a shared token: "
                          "--token-file PATH or the PCTOP_ENGINE_TOKEN environment variable")

    def announce(bound) -> None:
        click.echo(json.dumps({"type": "listening", "address": str(bound), "pid": os.getpid(),
                               "pages_total": memory // 4096, "token": token is not None}))
        sys.stdout.flush()

    try:
        rc = serve_source(addr, npages=memory // 4096, seed=seed, bandwidth=bandwidth,
                          background=not no_background, prefetch=prefetch, token=token, wait_s=wait_s,
                          on_listening=announce)
    except OSError as e:
        click.echo(f"pctop engine source: error: cannot listen on {addr}: {e.strerror or e}", err=True)
        sys.exit(1)
    sys.exit(rc)


@engine.command("dest", cls=Command, context_settings=HELP)
@click.option("--connect", required=True, metavar="HOST:PORT", help="The source's address (unix:PATH for a unix socket).")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout: start, progress each second, summary last.")
@click.option("--token-file", metavar="PATH", help="Shared token (else the PCTOP_ENGINE_TOKEN variable).")
@click.option("--auto-recover", is_flag=True, help="When the link drops, reconnect by itself (with backoff) "
              "instead of waiting for the `recover` control command.")
@click.option("--latency", "latency_us", type=click.IntRange(0, 10_000_000), default=0, show_default=True,
              help="Microseconds the source adds to every demand reply (also a control command).")
@click.option("--link-timeout", type=click.FloatRange(min=0.2), default=3.0, show_default=True,
              help="Seconds without any frame (data or heartbeat) after which the link counts as down.")
@click.option("--give-up", "give_up_s", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="After a link loss, fail when the source's address refuses connections this long.")
@click.option("--recover-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Fail when the link stays down this long, whatever the reason.")
@click.pass_context
def dest(ctx, connect, as_json, token_file, auto_recover, latency_us, link_timeout, give_up_s, recover_timeout,
         **opts):
    """Receive a migration from `pctop engine source`, run the guest, verify every page.

    Exit status: 0 verified, 1 failed (integrity, the source is gone, engine error), 2 bad usage.
    """
    from pctop.cli.demo import run_engine
    from pctop.engine.link import LinkError, parse_address

    try:
        parse_address(connect)
    except LinkError as e:
        raise UsageError("engine dest", str(e)) from None
    if ctx.get_parameter_source("bandwidth") != click.core.ParameterSource.COMMANDLINE:
        opts["bandwidth"] = None  # the source's own setting
    token = _token("engine dest", token_file)
    run_engine("engine dest", as_json, link=dict(connect=connect, token=token, auto_recover=auto_recover,
                                                 latency_us=latency_us, link_timeout=link_timeout,
                                                 give_up_s=give_up_s, recover_timeout=recover_timeout), **opts)


dest.params += [p for p in demo.params if p.name in DEST_FROM_DEMO]
