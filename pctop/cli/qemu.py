"""`pctop qemu CMD`: steer a QEMU migration over QMP from the command line.

The same controls the TUI sends through the QMP source (pctop.qemu.control).
Give the destination's and/or the source's QMP socket; each command says which
end it needs. QEMU serves one client per QMP socket: while `pctop monitor --qmp`
holds one, give QEMU a second `-qmp` socket for these commands (the demo does).

Exit status: 0 done, 1 QEMU refused, did not answer or is not there, 2 bad usage.
"""

from __future__ import annotations

import json

import click

from pctop.cli.common import HELP, SIZE, Group, Unavailable, UsageError


class Ends:
    """The QMP connections the command needs, opened on first use."""

    def __init__(self, dest: str | None, source: str | None) -> None:
        self.paths = {"destination": dest, "source": source}
        self.conns: dict = {}

    def get(self, role: str, why: str):
        from pctop.qemu.qmp import QmpConnection, QmpError

        if role not in self.conns:
            path = self.paths[role]
            if not path:
                flag = "--dest" if role == "destination" else "--source"
                raise UsageError("qemu", f"{why} needs the {role}'s QMP socket ({flag} SOCKET)")
            try:
                self.conns[role] = QmpConnection(path).connect()
            except QmpError as e:  # a QEMU that is not there: unavailable (1), as ctl and monitor say
                raise Unavailable("qemu", str(e)) from None
        return self.conns[role]

    def given(self) -> list[str]:
        return [r for r, p in self.paths.items() if p]

    def close(self) -> None:
        for c in self.conns.values():
            c.close()


@click.group("qemu", cls=Group, context_settings=HELP)
@click.option("--dest", metavar="SOCKET", help="The migration destination's QMP socket.")
@click.option("--source", metavar="SOCKET", help="The migration source's QMP socket.")
@click.pass_context
def qemu(ctx: click.Context, dest: str | None, source: str | None) -> None:
    """Steer a QEMU post-copy migration over QMP (docs/qemu.md)."""
    ends = Ends(dest, source)
    ctx.obj = ends
    ctx.call_on_close(ends.close)


def _run(action):
    """Run one QEMU action; QEMU's refusal is exit 1 with one line."""
    from pctop.qemu.qmp import QmpError

    try:
        return action()
    except QmpError as e:
        raise Unavailable("qemu", str(e)) from None


def _on(ends: Ends, role: str, command: str, action, done: str) -> None:
    """`action(connection)` on one end, then "<role>: <done>"."""
    conn = ends.get(role, command)
    _run(lambda: action(conn))
    click.echo(f"{role}: {done}")


@qemu.command("status")
@click.option("--json", "as_json", is_flag=True, help="query-migrate of each end as one JSON object.")
@click.pass_obj
def status(ends: Ends, as_json: bool) -> None:
    """query-migrate on each end given: status, RAM counters, blocktime."""
    from pctop.qemu import control
    from pctop.sources.qmp import migration_extra

    if not ends.given():
        raise UsageError("qemu", "status needs --dest SOCKET and/or --source SOCKET")
    infos = {role: _run(lambda r=role: control.query(ends.get(r, "status"))) for role in ends.given()}
    if as_json:
        click.echo(json.dumps(infos))
        return
    for role, info in infos.items():
        extra = migration_extra(role, infos.get("destination"), infos.get("source"))
        fields = " ".join(f"{k}={v}" for k, v in extra.items() if k not in ("role",))
        click.echo(f"{role}: {fields}")


@qemu.command("enable-postcopy")
@click.pass_obj
def enable_postcopy(ends: Ends) -> None:
    """Turn on postcopy-ram on each end given (and postcopy-blocktime on the destination).
    Both ends need it before `migrate`."""
    from pctop.qemu import control

    if not ends.given():
        raise UsageError("qemu", "enable-postcopy needs --dest SOCKET and/or --source SOCKET")
    for role in ends.given():
        caps = _run(lambda r=role: control.enable_postcopy(ends.get(r, "enable-postcopy"), r == "destination"))
        click.echo(f"{role}: {', '.join(caps)} on")


@qemu.command("listen")
@click.argument("uri")
@click.pass_obj
def listen(ends: Ends, uri: str) -> None:
    """Destination (started with -incoming defer): wait for the migration on URI."""
    from pctop.qemu import control

    _on(ends, "destination", "listen", lambda c: control.listen(c, uri), f"listening on {uri}")


@qemu.command("migrate")
@click.argument("uri")
@click.pass_obj
def migrate(ends: Ends, uri: str) -> None:
    """Source: start migrating to URI (pre-copy first)."""
    from pctop.qemu import control

    _on(ends, "source", "migrate", lambda c: control.start_migration(c, uri), f"migrating to {uri}")


@qemu.command("start-postcopy")
@click.pass_obj
def start_postcopy(ends: Ends) -> None:
    """Source: switch the running migration to post-copy."""
    from pctop.qemu import control

    _on(ends, "source", "start-postcopy", control.start_postcopy, "switching to post-copy")


@qemu.command("bandwidth")
@click.argument("size", type=SIZE)
@click.option("--precopy", is_flag=True, help="Set max-bandwidth (pre-copy) instead.")
@click.pass_obj
def bandwidth(ends: Ends, size: int, precopy: bool) -> None:
    """Source: max-postcopy-bandwidth in bytes/s (K/M/G = powers of 1024; 0 = unlimited)."""
    from pctop.qemu import control

    key = "max-bandwidth" if precopy else "max-postcopy-bandwidth"
    _on(ends, "source", "bandwidth", lambda c: control.set_bandwidth(c, size, postcopy=not precopy), f"{key} = {size} B/s")


@qemu.command("pause")
@click.pass_obj
def pause(ends: Ends) -> None:
    """migrate-pause (on the source if given, else the destination): both ends go to
    postcopy-paused and vCPUs that need a page wait until `recover`."""
    from pctop.qemu import control

    role = "source" if ends.paths["source"] else "destination"
    _on(ends, role, "pause", control.pause, "migration paused")


@qemu.command("recover")
@click.argument("uri", required=False)
@click.pass_obj
def recover(ends: Ends, uri: str | None) -> None:
    """Resume a paused post-copy on a new channel: the destination listens on URI
    (default tcp:127.0.0.1:<a free port>), then the source reconnects to it."""
    from pctop.qemu import control

    dest, src = ends.get("destination", "recover"), ends.get("source", "recover")
    uri = uri or control.local_uri()
    _run(lambda: control.recover(dest, src, uri))
    click.echo(f"recovering over {uri}")
