"""Cost of the Prometheus exporter (the targets: a scrape of 8 VMs x 256 vCPUs within
50 ms of CPU; the exporter within 2 % of a core at 1 Hz while the engine runs).

1. scrape: synthetic Samples of 8 targets x 256 vCPUs (every vCPU with faults in 10 of the
   24 buckets and two exit reasons, one uffd and a migration per target) go into an
   Exporter; then the CPU time (this thread) of rendering /metrics, text and OpenMetrics,
   median of --scrapes.
2. live: `pctop export --interval 1` (eBPF probes, as a user runs it) beside
   `pctop demo --headless`, scraped once a second; the exporter process's CPU time (all its
   threads, /proc/PID/stat) over the engine's run, as a share of one core.

    .venv/bin/python bench/export.py [--scrapes 20] [--memory 1G]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from pctop.export.collector import Exporter
from pctop.model import HIST_BUCKETS, Migration, Sample, StallParts, Target, UffdSample, VcpuSample

VMS, VCPUS = 8, 256


def synthetic(seq: int) -> Sample:
    hist = tuple([3] * 10 + [0] * (HIST_BUCKETS - 10))
    targets = []
    for vm in range(VMS):
        vcpus = tuple(VcpuSample(vcpu=i, tid=10_000 * (vm + 1) + i, faults=30, stall_ns=30 * 50_000, hist=hist,
                                 parts=StallParts(10_000, 30_000, 10_000), exits={"mmio": 5, "io": 2})
                      for i in range(VCPUS))
        targets.append(Target(pid=1000 + vm, comm=f"vm{vm}", vcpus=vcpus,
                              uffds=(UffdSample(fd=20, pending_mean=2.0, msgs_read=VCPUS * 30),),
                              handler_cpu_pct=40.0,
                              migration=Migration(source="engine", state="postcopy", pages_total=1 << 20,
                                                  pages_received=seq * 1000, bandwidth_bps=1e8, eta_s=60.0)))
    return Sample(time=time.time(), interval_s=1.0, seq=seq, probe_tier="ebpf", sources=("ebpf",),
                  targets=tuple(targets))


def bench_scrape(scrapes: int) -> None:
    ex = Exporter()
    for seq in range(1, 4):
        ex.observe(synthetic(seq))
    for name, openmetrics in (("text 0.0.4", False), ("OpenMetrics", True)):
        cpu = []
        for _ in range(scrapes):
            t0 = time.thread_time()
            body = ex.render(openmetrics)
            cpu.append(time.thread_time() - t0)
        lines = sum(1 for x in body.splitlines() if not x.startswith(b"#"))
        print(f"| {VMS} VMs x {VCPUS} vCPUs, {name} | {lines} series, {len(body) / 1e6:.1f} MB | "
              f"{statistics.median(cpu) * 1e3:.0f} ms (min {min(cpu) * 1e3:.0f}, max {max(cpu) * 1e3:.0f}) |")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_live(memory: str) -> None:
    exp = subprocess.Popen([sys.executable, "-m", "pctop", "export", "--interval", "1", "--listen", "127.0.0.1:0"],
                           stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        url = re.search(r"(http://\S+)", exp.stderr.readline()).group(1)
        time.sleep(3)  # probes loaded and settled

        def scrape() -> None:
            while not stop.wait(1.0):
                with urllib.request.urlopen(url, timeout=5) as r:
                    r.read()

        threading.Thread(target=scrape, daemon=True).start()
        c0, t0 = _cpu_s(exp.pid), time.monotonic()
        subprocess.run([sys.executable, "-m", "pctop", "demo", "--headless", "--memory", memory],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        c1, t1 = _cpu_s(exp.pid), time.monotonic()
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
        series = sum(1 for x in body.splitlines() if not x.startswith(b"#"))
        print(f"| `pctop export --interval 1` (eBPF) beside `pctop demo --headless --memory {memory}`, "
              f"scraped at 1 Hz | {t1 - t0:.0f} s | {100 * (c1 - c0) / (t1 - t0):.2f} % of a core "
              f"({series} series at the end) |")
    finally:
        stop.set()
        exp.terminate()
        exp.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--skip-live", action="store_true")
    args = ap.parse_args()
    print(f"export, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, kernel "
          f"{platform.release()}, Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    print("| scrape | size | CPU per scrape (median) |\n|---|---|---|")
    bench_scrape(args.scrapes)
    if not args.skip_live:
        print("\n| run | length | exporter CPU |\n|---|---|---|")
        bench_live(args.memory)


if __name__ == "__main__":
    main()
