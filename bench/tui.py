"""TUI benchmark: frame time for a big Sample, and pctop's own CPU at 1 Hz.

1. Frame time: the dashboard (200x60, headless) is handed a synthetic Sample
   with 256 vCPUs and 8 uffds; the time from apply_sample() until the frame
   is rendered (the App's message queue drained and the screen composited)
   is measured over several samples. Target <= 50 ms.
2. CPU at 1 Hz: a real reference-engine run (KVM when /dev/kvm exists) is
   watched by `pctop monitor` (the TUI, in a pseudo-terminal of 120x40) and,
   side by side, by `pctop monitor --json`; each one's CPU time (user+sys,
   all threads, from /proc/PID/stat) over the same window is reported as a
   share of one core. Target <= 5% for the TUI.

Usage: .venv/bin/python bench/tui.py [--seconds 30] [--frames 20]
Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import platform
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINE = """
import sys
from pctop.engine.run import Engine, EngineConfig
cfg = EngineConfig(memory=1 << 30, vcpus=2, strategy="uffd", bandwidth=4 << 20, pattern="hotset",
                   hot_fraction=0.02, control=sys.argv[1], duration=float(sys.argv[2]))
Engine(cfg).run()
"""


async def frame_times(frames: int) -> list[float]:
    from pctop.model import Header
    from pctop.ui.app import PctopApp
    from pctop.ui.feeds import ReplayFeed
    from pctop.ui.synthetic import synthetic_sample

    samples = [synthetic_sample(seq=i, vcpus=256, uffds=8) for i in range(1, frames + 2)]
    header = Header(host="bench", kernel=platform.release(), probe_tier="ebpf", sources=("engine",))
    # A paused replay feed of one sample: the worker stays idle, the bench
    # hands samples in itself so that only rendering is timed.
    app = PctopApp(ReplayFeed(header, samples[:1], paused=True))
    out = []
    async with app.run_test(size=(200, 60)) as pilot:
        while app.sample is None:
            await pilot.pause(0.05)
        for s in samples[1:]:
            t0, c0 = time.perf_counter(), time.process_time()
            app.apply_sample(s)
            await pilot.pause()  # drain messages: layout + refresh
            app.screen._compositor.render_update(full=True)  # composite the whole frame
            out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def spawn_in_pty(argv: list[str], cols: int, rows: int) -> subprocess.Popen:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                            start_new_session=True)
    os.close(slave)

    def drain() -> None:  # a terminal that is not read blocks the app's writes
        while True:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break
    threading.Thread(target=drain, daemon=True).start()
    return proc


def cpu_at_1hz(seconds: float, warmup: float = 8.0) -> dict:
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "engine.sock")
        engine = subprocess.Popen([py, "-c", ENGINE, sock, str(seconds + warmup + 30)], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs: list[subprocess.Popen] = []
        try:
            from pctop.root import wait_for_path

            if not wait_for_path(sock, engine, 60):
                raise SystemExit(f"engine did not start: {engine.stderr.read().decode()[-500:]}")
            args = ["-m", "pctop", "monitor", "-p", str(engine.pid), "--engine", sock, "--interval", "1"]
            tui = spawn_in_pty([py, *args], 120, 40)
            js_out = open(os.path.join(tmp, "json.ndjson"), "w")
            js = subprocess.Popen([py, *args, "--json"], cwd=ROOT, stdout=js_out,
                                  stderr=subprocess.DEVNULL)
            procs = [tui, js]
            time.sleep(warmup)  # probe compilation and start-up are not the steady state
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"pctop exited early ({p.returncode})")
            eng0, t0 = cpu_seconds(engine.pid), time.monotonic()
            c0 = [cpu_seconds(p.pid) for p in procs]
            time.sleep(seconds)
            c1 = [cpu_seconds(p.pid) for p in procs]
            eng1, t1 = cpu_seconds(engine.pid), time.monotonic()
            wall = t1 - t0
            alive = engine.poll() is None
            with open(os.path.join(tmp, "json.ndjson")) as f:
                header = json.loads(f.readline())
            return {"wall": wall, "tui": (c1[0] - c0[0]) / wall, "json": (c1[1] - c0[1]) / wall,
                    "engine": (eng1 - eng0) / wall, "tier": header.get("probe_tier"),
                    "engine_alive": alive}
        finally:
            from pctop.root import stop_child

            for p in procs + [engine]:
                stop_child(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--skip-cpu", action="store_true")
    a = ap.parse_args()
    ft = asyncio.run(frame_times(a.frames))
    ms = sorted(w * 1000 for w, _ in ft)
    cpu = sorted(c * 1000 for _, c in ft)
    print(f"## TUI ({time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}, Python {platform.python_version()})\n")
    print("| what | result | target |\n|---|---|---|")
    print(f"| frame, 256 vCPUs + 8 uffds, 200x60 (apply + layout + composite), median of {len(ms)}: "
          f"CPU time | {statistics.median(cpu):.1f} ms (min {cpu[0]:.1f}, max {cpu[-1]:.1f}) | <= 50 ms |")
    print(f"| same frames, wall time (includes the App's refresh timer, up to 1/60 s idle) "
          f"| {statistics.median(ms):.1f} ms (min {ms[0]:.1f}, max {ms[-1]:.1f}) | - |")
    if not a.skip_cpu:
        r = cpu_at_1hz(a.seconds)
        print(f"| pctop monitor (TUI, 120x40 pty) CPU at 1 Hz watching the engine, {r['wall']:.0f} s "
              f"| {r['tui'] * 100:.1f}% of one core | <= 5% |")
        print(f"| pctop monitor --json, same engine, same window (side by side) "
              f"| {r['json'] * 100:.1f}% of one core | - |")
        print(f"| the engine itself in that window (still migrating at the end: {r['engine_alive']}) "
              f"| {r['engine'] * 100:.0f}% of one core | - |")
        print(f"\nProbe tier of both monitors: {r['tier']}.")


if __name__ == "__main__":
    main()
