"""`pctop ctl [--control PATH] COMMAND [ARG]`: one request to an engine's control socket.

Prints the JSON reply on stdout (one line). Commands are the engine's
(docs/engine-control.md): status, pause, resume, bandwidth BYTES_PER_S
(K/M/G allowed), latency MICROSECONDS, drop-link, recover. Without
--control, the only engine socket in /run/pctop is used.
Exit status: 0 the engine said ok, 1 it refused or could not be reached, 2 bad usage.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import click

from pctop.monitor_cli import _Command, _UsageError

RUN_DIR = "/run/pctop"
NUMERIC = {"bandwidth", "latency"}


def _find_socket(run_dir: str = RUN_DIR) -> str:
    found = sorted(glob.glob(os.path.join(run_dir, "engine-*.sock")))
    if not found:
        raise _UsageError("ctl", f"no engine control socket in {run_dir}; give --control PATH")
    if len(found) > 1:
        raise _UsageError("ctl", f"several engines in {run_dir} ({', '.join(found)}); give --control PATH")
    return found[0]


def _parse_arg(command: str, arg: str | None):
    if arg is None:
        if command in NUMERIC:
            raise _UsageError("ctl", f"{command} needs a number")
        return None
    if command == "bandwidth":
        from pctop.sizes import parse_size
        try:
            return parse_size(arg)
        except ValueError as e:
            raise _UsageError("ctl", f"bandwidth: {e}") from None
    if command == "latency":
        try:
            return int(arg)
        except ValueError:
            raise _UsageError("ctl", f"latency needs whole microseconds, got {arg!r}") from None
    try:
        return json.loads(arg)
    except ValueError:
        return arg


@click.command("ctl", cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--control", metavar="PATH", help="The engine's control socket (default: the only one in /run/pctop).")
@click.argument("command")
@click.argument("arg", required=False)
def ctl(control: str | None, command: str, arg: str | None) -> None:
    """Send one control COMMAND (with ARG) to a running engine and print its JSON reply."""
    from pctop.sources.engine import EngineConnection, EngineError

    path = control or _find_socket()
    req: dict = {"cmd": command}
    value = _parse_arg(command, arg)
    if value is not None:
        req["arg"] = value
    conn = EngineConnection(path, timeout=5.0)
    try:
        reply = conn.request(req)
    except EngineError as e:
        click.echo(f"pctop ctl: error: {e}", err=True)
        sys.exit(1)
    finally:
        conn.close()
    click.echo(json.dumps(reply))
    sys.exit(0 if reply.get("ok") else 1)
