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

from pctop.cli.common import HELP, Unavailable, UsageError
from pctop.cli.common import Command as ClickCommand
from pctop.controls import Command
from pctop.hostpaths import RUN_DIR

NUMERIC = {Command.BANDWIDTH, Command.LATENCY}
# The engine's commands (pctop.controls.ENGINE_COMMANDS, which a test holds equal), with
# their argument, for `ctl --help` and `ctl help`.
COMMANDS = {
    Command.STATUS: "the engine's state and counters (docs/engine-control.md)",
    Command.PAUSE: "pause the background stream (demand faults are still served)",
    Command.RESUME: "resume the background stream",
    Command.BANDWIDTH: "BYTES_PER_S (K/M/G allowed; 0 = unlimited): cap the background stream",
    Command.LATENCY: "MICROSECONDS: added to every demand reply, as a longer link would",
    Command.DROP_LINK: "close every channel to the source, as a failed link would",
    Command.RECOVER: "reconnect after a link failure",
}


def _commands_text() -> str:
    return "\n".join(f"  {name:<10} {what}" for name, what in COMMANDS.items())


def _find_socket(run_dir: str = RUN_DIR) -> str:
    found = sorted(glob.glob(os.path.join(run_dir, "engine-*.sock")))
    if not found:
        raise Unavailable("ctl", f"no engine control socket in {run_dir}; give --control PATH")
    if len(found) > 1:
        raise UsageError("ctl", f"several engines in {run_dir} ({', '.join(found)}); give --control PATH")
    return found[0]


def _parse(word: str, arg: str | None) -> tuple[Command, int | None]:
    """The command and its argument, or a UsageError saying what is wrong."""
    if word not in COMMANDS:
        raise UsageError("ctl", f"unknown command {word!r}; the commands: {', '.join(COMMANDS)} "
                                 "(pctop ctl help)")
    command = Command(word)
    if arg is not None and command not in NUMERIC:
        raise UsageError("ctl", f"{command} takes no argument, got {arg!r}")
    if arg is None:
        if command in NUMERIC:
            raise UsageError("ctl", f"{command} needs a number")
        return command, None
    if command is Command.BANDWIDTH:
        from pctop.sizes import parse_size
        try:
            return command, parse_size(arg)
        except ValueError as e:
            raise UsageError("ctl", f"bandwidth: {e}") from None
    try:  # latency
        return command, int(arg)
    except ValueError:
        raise UsageError("ctl", f"latency needs whole microseconds, got {arg!r}") from None


@click.command("ctl", cls=ClickCommand, context_settings=HELP,
               epilog="Commands:\n\n\b\n" + _commands_text() + "\n\nExit status: 0 the engine said ok, "
                      "1 it refused or could not be reached, 2 bad usage.")
@click.option("--control", metavar="PATH", help="The engine's control socket (default: the only one in /run/pctop).")
@click.argument("command")
@click.argument("arg", required=False)
def ctl(control: str | None, command: str, arg: str | None) -> None:
    """Send one control COMMAND (with ARG) to a running engine and print its JSON reply.

    `pctop ctl help` lists the commands.
    """
    from pctop.sources.engine import EngineConnection, EngineUnreachable

    if command == "help":
        click.echo("pctop ctl COMMAND [ARG], where COMMAND is one of:\n" + _commands_text())
        return
    cmd, value = _parse(command, arg)  # before looking for a socket: bad input is said first
    path = control or _find_socket()
    req: dict = {"cmd": cmd}
    if value is not None:
        req["arg"] = value
    conn = EngineConnection(path, timeout=5.0)
    try:
        reply = conn.request(req)
    except EngineUnreachable as e:
        click.echo(f"pctop ctl: error: {e}", err=True)
        sys.exit(1)
    finally:
        conn.close()
    click.echo(json.dumps(reply))
    sys.exit(0 if reply.get("ok") else 1)
