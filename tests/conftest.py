"""Shared test helpers: where the checkout is, and how to run pctop as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_pctop(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run `python -m pctop ARGS` in a fresh interpreter, as the installed command would."""
    return subprocess.run([sys.executable, "-m", "pctop", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


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
