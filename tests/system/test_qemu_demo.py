"""`pctop demo --vmm qemu` as a user runs it (README): real QEMUs, JSON Lines out."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import need_qemu, need_root, run_pctop

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]


def test_demo_vmm_qemu_json_migrates_and_compares_with_qemu():
    need_root()
    need_qemu()
    r = run_pctop("demo", "--vmm", "qemu", "--accel", "tcg", "--json", "--bandwidth", "4M", timeout=150)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    header, samples, summary = lines[0], lines[1:-1], lines[-1]
    assert header["type"] == "header" and "qmp" in header["sources"]
    assert samples and all(s["type"] == "sample" for s in samples)
    assert summary["type"] == "qemu-summary" and summary["ok"] and summary["guest_runs_on_destination"]
    assert summary["states"][-2:] == ["postcopy", "completed"]
    rows = {what: (pctop, qemu) for what, pctop, qemu in summary["rows"]}
    pctop_ms, qemu_ms = rows["vCPU 0 time stalled (ms)"]
    assert int(pctop_ms) >= int(qemu_ms) > 0
    # The destination's vCPU row carries QEMU's blocktime beside pctop's stall.
    assert any(v.get("vmm_blocktime_ms") for s in samples for t in s["targets"] for v in t["vcpus"])


def test_demo_vmm_qemu_says_how_to_get_qemu_when_it_is_missing(tmp_path):
    # A PATH without qemu-system-x86_64 (the real lookup, nothing mocked).
    env = {**os.environ, "PATH": str(tmp_path)}
    r = run_pctop("demo", "--vmm", "qemu", "--headless", env=env)
    assert r.returncode == 1
    assert "qemu-system-x86_64 not found" in r.stderr and "apt-get install qemu-system-x86" in r.stderr
    assert r.stderr.count("\n") == 1
