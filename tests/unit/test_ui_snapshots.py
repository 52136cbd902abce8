"""Snapshots of the dashboard, the vCPU detail and the help screen, rendered
from NDJSON recordings of real reference-engine runs (tests/data, made by
`scripts/screenshots.py --record tests/data`), so CI needs no live target.

Deterministic: fixed terminal sizes, playback paused at a fixed sample,
every time on screen comes from the recording, shown in UTC.
Refresh after an intended change: pytest tests/unit/test_ui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pctop.root import open_replay
from pctop.ui.app import PctopApp

DATA = Path(__file__).resolve().parents[1] / "data"
EBPF = DATA / "engine-uffd-ebpf.ndjson"  # 12 samples; stream paused in samples 5-7
PROCFS = DATA / "engine-uffd-procfs.ndjson"  # same kind of run, --no-ebpf: the degraded tier


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def replay_app(path: Path, position: int) -> PctopApp:
    return PctopApp(open_replay(path, paused=True, position=position))


def after_first_sample(*keys: str):
    async def run_before(pilot) -> None:
        while pilot.app.sample is None:
            await pilot.pause(0.05)
        for k in keys:
            await pilot.press(k)
        await pilot.pause(0.2)
    return run_before


def test_dashboard(snap_compare):
    # Sample 9: after the pause, so the log holds the stream's pause and resume.
    assert snap_compare(replay_app(EBPF, 8), terminal_size=(120, 36), run_before=after_first_sample())


def test_dashboard_80x24(snap_compare):
    assert snap_compare(replay_app(EBPF, 8), terminal_size=(80, 24), run_before=after_first_sample())


def test_dashboard_wide_200x60(snap_compare):
    assert snap_compare(replay_app(EBPF, 8), terminal_size=(200, 60), run_before=after_first_sample())


def test_dashboard_degraded_procfs(snap_compare):
    assert snap_compare(replay_app(PROCFS, 5), terminal_size=(120, 36), run_before=after_first_sample())


def test_vcpu_detail(snap_compare):
    assert snap_compare(replay_app(EBPF, 11), terminal_size=(120, 36),
                        run_before=after_first_sample("down", "enter"))


def test_help(snap_compare):
    assert snap_compare(replay_app(EBPF, 3), terminal_size=(100, 40),
                        run_before=after_first_sample("question_mark"))


# A real QEMU post-copy (2 vCPUs, KVM) watched with --qmp and eBPF; QEMU 7.2 reports its
# blocktime when the migration completes, in sample 11: the "qemu blk" column beside the stall.
QEMU = DATA / "qemu-postcopy-ebpf.ndjson"


def test_dashboard_qemu_80x24(snap_compare):
    assert snap_compare(replay_app(QEMU, 10), terminal_size=(80, 24), run_before=after_first_sample())


def test_vcpu_detail_qemu(snap_compare):
    # Sorted by QEMU's blocktime (third s), the worst vCPU's detail.
    assert snap_compare(replay_app(QEMU, 10), terminal_size=(120, 36),
                        run_before=after_first_sample("s", "s", "s", "home", "enter"))
