"""Shared test helpers: where the checkout is, and how to run pctop as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_pctop(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run `python -m pctop ARGS` in a fresh interpreter, as the installed command would."""
    return subprocess.run([sys.executable, "-m", "pctop", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


class FreshRun(NamedTuple):
    lines: list[str]  # what the command printed
    imported: dict[str, bool]  # textual, bcc, rich -> whether the run imported it


def cli_in_fresh_interpreter(argv: list[str]) -> FreshRun:
    """Run the CLI with argv in a fresh interpreter: what it printed, and which of the
    heavy libraries it imported."""
    code = (
        "import sys, json\n"
        "from pctop.cli import cli\n"
        "try:\n"
        f"    cli.main({argv!r}, prog_name='pctop', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "mods = set(sys.modules)\n"
        "print(json.dumps({m: any(x == m or x.startswith(m + '.') for x in mods)"
        " for m in ('textual', 'bcc', 'rich')}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    *lines, last = r.stdout.strip().splitlines()
    return FreshRun(lines, json.loads(last))


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (eBPF, /dev/kvm, mounts)")


def need_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm (KVM not available on this machine)")


def need_uffd() -> None:
    from pctop.engine.uffd import Uffd

    try:
        Uffd().close()
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")


def need_qemu(accel: str = "tcg") -> None:
    from pctop.qemu.launch import qemu_unavailable_reason

    reason = qemu_unavailable_reason(accel)
    if reason:
        pytest.skip(reason)
