"""The `pctop doctor` command: prints pctop.doctor's checks."""

from __future__ import annotations

import json
import sys

import click

from pctop import doctor as d


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
@click.option("--fix", is_flag=True, help="Mount tracefs/debugfs, make the BTF tree, link stand-in kernel headers, then check.")
def doctor(as_json: bool, fix: bool) -> None:
    """Check what pctop needs (eBPF, KVM, userfaultfd) and say how to fix what is missing.

    Exit status 0 when eBPF monitoring and the KVM engine can run, else 1.
    """
    actions = d.fix_host() if fix else []
    results = d.run_checks()
    ok = not any(r.failed for r in results)
    if as_json:
        json.dump({"ok": ok, "fixed": [a.text for a in actions if a.ok],
                   "not_fixed": [a.text for a in actions if not a.ok],
                   "checks": [dict(r._asdict(), failed=r.failed) for r in results]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for a in actions:
            click.echo(f"{'fixed' if a.ok else 'FAILED':<8} {a.text}")
        width = max(len(r.name) for r in results)
        for r in results:
            click.echo(f"{r.status:<8} {r.name:<{width}}  {r.detail}")
            if r.fix and r.status != d.OK:
                click.echo(f"{'':<8} {'':<{width}}  fix: {r.fix}")
        click.echo("pctop can run: eBPF monitoring and the KVM engine" if ok else
                   "pctop is degraded: fix the MISSING lines above (pctop doctor --fix does the local ones)")
    sys.exit(0 if ok else 1)
