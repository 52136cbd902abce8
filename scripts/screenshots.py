"""Screenshots of the dashboard on a real reference-engine run, and the
recordings the snapshot tests render.

    .venv/bin/python scripts/screenshots.py              # screenshots/*.svg and *.png
    .venv/bin/python scripts/screenshots.py --record tests/data

Screenshots: one engine run (`pctop demo --headless` when that command exists,
else the engine module directly) is watched live by the App, headless, at
fixed terminal sizes; after a few samples the dashboard, the vCPU detail and
the help screen are exported as SVG (Textual) and converted to PNG with
rsvg-convert (package librsvg2-bin).

A real QEMU post-copy migration (pctop.qemu.migration, 2 vCPUs, KVM when
/dev/kvm is there) is shot the same way at the sample where QEMU's own
blocktime arrives (QEMU 7.2 reports it only when the migration completes),
beside pctop's stall: qemu-dashboard-80x24, qemu-detail-120x36.

--record: `pctop record` against such a run writes small NDJSON recordings
(eBPF tier and, with --no-ebpf, the degraded procfs tier; and one of a QEMU
post-copy watched with --qmp).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# KVM guest, 2 vCPUs, hotset access pattern: demand faults and a background
# stream limited to 4 MiB/s, so a run lasts while it is being watched.
ENGINE = """
import sys
from pctop.engine.run import Engine, EngineConfig
cfg = EngineConfig(memory=1 << 30, vcpus=2, strategy=sys.argv[3], bandwidth=4 << 20,
                   pattern="hotset", hot_fraction=0.02, control=sys.argv[1],
                   duration=float(sys.argv[2]))
Engine(cfg).run()
"""
SIZES = ((120, 36), (80, 24), (200, 60))


def start_engine(sock: str, seconds: float, strategy: str = "uffd") -> subprocess.Popen:
    from pctop.cli import SUBCOMMANDS

    if "demo" in SUBCOMMANDS:
        argv = [sys.executable, "-m", "pctop", "demo", "--headless", "--control", sock,
                "--duration", str(seconds), "--strategy", strategy, "--memory", "1G",
                "--bandwidth", "4M", "--pattern", "hotset"]
    else:
        argv = [sys.executable, "-c", ENGINE, sock, str(seconds), strategy]
    from pctop.root import wait_for_path

    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not wait_for_path(sock, proc, 60):
        proc.kill()
        raise SystemExit(f"engine did not start: {proc.stderr.read().decode()[-500:]}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    from pctop.root import stop_child

    stop_child(proc)


async def shoot(sock: str, pid: int, out: Path, samples: int, w: int, h: int) -> list[Path]:
    from pctop.root import open_live
    from pctop.ui.app import PctopApp
    from pctop.ui.feeds import LiveFeed

    made = []
    if True:
        header, stats = open_live([pid], None, engine_sockets=[sock])
        app = PctopApp(LiveFeed(header, stats.collect, 1.0, on_close=stats.close,
                                controls=next((s for s in stats.sources if s.name == "engine"), None)))
        async with app.run_test(size=(w, h)) as pilot:
            while app.history.samples < samples:
                await pilot.pause(0.2)
            await pilot.press("s", "s")  # sorted by % of time stalled: the worst first
            await pilot.pause(0.3)
            shots = [("dashboard", ())]
            if (w, h) == SIZES[0]:
                shots += [("detail", ("enter",)), ("help", ("escape", "question_mark"))]
            made += await take(pilot, out, "", shots, w, h)
    return made


async def take(pilot, out: Path, prefix: str, shots, w: int, h: int) -> list[Path]:
    """For each (name, keys): press the keys, then save out/PREFIXNAME-WxH.svg."""
    made = []
    for name, keys in shots:
        for k in keys:
            await pilot.press(k)
        await pilot.pause(0.5)
        svg = out / f"{prefix}{name}-{w}x{h}.svg"
        pilot.app.save_screenshot(str(svg.name), path=str(out))
        made.append(svg)
    return made


QEMU_SHOTS = {(80, 24): (("dashboard", ()),), (120, 36): (("detail", ("home", "enter")),)}


def qemu_migration():
    """Two QEMUs booted, post-copy set up, pre-copy through one pass: ready to switch."""
    from pctop.qemu.launch import default_accel
    from pctop.qemu.migration import MIB, MigrationSettings, QemuMigration

    mig = QemuMigration(MigrationSettings(accel=default_accel(), vcpus=2, region_mib=16,
                                          postcopy_bandwidth=2 * MIB))
    try:
        mig.boot()
        mig.prepare()
        mig.start_precopy()
        mig.wait_precopy_pass()
    except BaseException:
        mig.close()
        raise
    return mig


async def shoot_qemu(out: Path, w: int, h: int) -> list[Path]:
    from pctop.root import open_live
    from pctop.sources.qmp import attach
    from pctop.ui.app import PctopApp
    from pctop.ui.feeds import LiveFeed

    made = []
    mig = qemu_migration()
    try:
        pair = mig.pair
        header, stats = open_live((pair.destination.pid, pair.source.pid), None)
        header, qmp = attach(header, stats, [pair.destination.qmp_path, pair.source.qmp_path])
        app = PctopApp(LiveFeed(header, stats.collect, 1.0, controls=qmp, on_close=stats.close))
        async with app.run_test(size=(w, h)) as pilot:
            while app.sample is None:
                await pilot.pause(0.2)
            await asyncio.to_thread(mig.switch_to_postcopy)
            while not any(v.vmm_blocktime_ms for t in app.sample.targets for v in t.vcpus):
                await pilot.pause(0.2)
            await pilot.press("space")  # hold the sample that carries QEMU's blocktime
            await pilot.press("s", "s", "s")  # by QEMU's blocktime: the destination's vCPUs first
            await pilot.pause(0.3)
            made += await take(pilot, out, "qemu-", QEMU_SHOTS[(w, h)], w, h)
    finally:
        mig.close()
    return made


def record_qemu(path: Path, count: int) -> None:
    """`pctop record --qmp DEST --qmp SOURCE` over a QEMU post-copy (eBPF tier)."""
    mig = qemu_migration()
    try:
        pair = mig.pair
        argv = [sys.executable, "-m", "pctop", "record", "-o", str(path), "-p", str(pair.destination.pid),
                "-p", str(pair.source.pid), "--qmp", pair.destination.qmp_path, "--qmp", pair.source.qmp_path,
                "--count", str(count), "--interval", "1"]
        rec = subprocess.Popen(argv, cwd=ROOT)
        try:
            while not path.exists() or path.stat().st_size == 0:
                time.sleep(0.1)
            time.sleep(2)
            mig.switch_to_postcopy()
            if rec.wait(count * 3 + 60) != 0:
                raise SystemExit(f"pctop record failed ({rec.returncode})")
        finally:
            stop(rec)
    finally:
        mig.close()


def record(sock: str, pid: int, path: Path, count: int, ebpf: bool) -> None:
    """`pctop record` for `count` samples; midway the background stream is
    paused for 3 s and its bandwidth changed, so the log has state changes."""
    from pctop.sources.engine import EngineConnection

    argv = [sys.executable, "-m", "pctop", "record", "-o", str(path), "-p", str(pid),
            "--engine", sock, "--count", str(count), "--interval", "1"]
    if not ebpf:
        argv.append("--no-ebpf")
    rec = subprocess.Popen(argv, cwd=ROOT)
    conn = EngineConnection(sock)
    try:
        while not path.exists() or path.stat().st_size == 0:  # header written: sources started
            time.sleep(0.1)
        time.sleep(4)
        conn.request({"cmd": "pause"})
        time.sleep(3)
        conn.request({"cmd": "resume"})
        conn.request({"cmd": "bandwidth", "arg": 8 << 20})
        if rec.wait(count * 3 + 60) != 0:
            raise SystemExit(f"pctop record failed ({rec.returncode})")
    finally:
        conn.close()
        stop(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "screenshots"))
    ap.add_argument("--samples", type=int, default=6, help="samples to wait for before a shot")
    ap.add_argument("--record", metavar="DIR", help="write NDJSON recordings for tests instead")
    ap.add_argument("--only", choices=("engine", "qemu"), help="only the reference-engine or the QEMU runs")
    a = ap.parse_args()
    engine, qemu = a.only != "qemu", a.only != "engine"
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "engine.sock")
        if a.record:
            d = Path(a.record)
            d.mkdir(parents=True, exist_ok=True)
            for name, strategy, ebpf in (("engine-uffd-ebpf", "uffd", True),
                                         ("engine-uffd-procfs", "uffd", False)) if engine else ():
                eng = start_engine(sock, 60, strategy)
                try:
                    time.sleep(1)
                    record(sock, eng.pid, d / f"{name}.ndjson", 12, ebpf)
                finally:
                    stop(eng)
                    if os.path.exists(sock):
                        os.unlink(sock)
                print(d / f"{name}.ndjson")
            if qemu:
                record_qemu(d / "qemu-postcopy-ebpf.ndjson", 16)
                print(d / "qemu-postcopy-ebpf.ndjson")
            return
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        svgs = []
        for w, h in SIZES if engine else ():  # a fresh run per size: each shows the same phase of a migration
            eng = start_engine(sock, 60)
            try:
                svgs += asyncio.run(shoot(sock, eng.pid, out, a.samples, w, h))
            finally:
                stop(eng)
                if os.path.exists(sock):
                    os.unlink(sock)
        for w, h in QEMU_SHOTS if qemu else ():
            svgs += asyncio.run(shoot_qemu(out, w, h))
    rsvg = shutil.which("rsvg-convert")
    for svg in svgs:
        if rsvg:
            to_png(rsvg, svg)
        print(svg, "+ png" if rsvg else "(rsvg-convert missing: no png)")


def to_png(rsvg: str, svg: Path) -> None:
    """rsvg-convert draws Textual's no-break spaces narrower than a cell, which
    shifts right-aligned text; plain spaces kept by xml:space draw true."""
    text = svg.read_text(encoding="utf-8").replace("&#160;", " ").replace("<svg ", '<svg xml:space="preserve" ', 1)
    subprocess.run([rsvg, "-o", str(svg.with_suffix(".png"))], input=text.encode(), check=True)


if __name__ == "__main__":
    main()
