"""What pctop costs the rest of the host: processes it does not follow, while it runs.

    .venv/bin/python bench/host_overhead.py [--pairs 20] [--floor] [--json]

Tracepoints fire for every process: while the probes are attached, every page fault,
context switch, wake-up, read() and ioctl() on the host runs the tracepoint machinery
and a program that turns it away. Two small C programs (bench/programs/, built here with
gcc) time that, neither of them followed: a page-fault loop (ns per fault) and a pipe
ping-pong between two processes (ns per round trip), across CPUs and pinned to one. The
probes (EbpfSource following nothing, as `pctop monitor -p PID` for some other PID) are
attached and detached between runs without recompiling, ABBA; each pair's on/off time is
a ratio, reported as a median with its distribution-free 95 % interval (bench/median_ci.py).
--floor adds the same pairs for empty programs on the same tracepoints (bench/toggle.py
EmptyProbes): what the tracepoint machinery costs before any probe logic runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.median_ci import median_ci  # noqa: E402
from bench.toggle import ToggledProbes, abba_pairs, require_ebpf  # noqa: E402

PROGRAMS = {  # name -> (source, argument, what one unit is, CPU list to pin it to or None)
    "fault_loop": ("fault_loop.c", "6", "page fault", None),
    "pipe_pingpong": ("pipe_pingpong.c", "50000", "round trip", None),
    # both processes on one CPU: a round trip is a few us instead of ~40 (the cross-CPU
    # wake-up), so what each tracepoint hit costs shows
    "pipe_pingpong_1cpu": ("pipe_pingpong.c", "200000", "round trip", "0"),
}


def build(out_dir: str) -> dict[str, list[str]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("host_overhead: gcc is needed to build bench/programs/*.c")
    cmds = {}
    for name, (src, arg, _, cpus) in PROGRAMS.items():
        out = os.path.join(out_dir, src.removesuffix(".c"))
        if not os.path.exists(out):
            subprocess.run([gcc, "-O2", "-o", out, os.path.join(ROOT, "bench", "programs", src)], check=True)
        cmds[name] = (["taskset", "-c", cpus] if cpus else []) + [out, arg]
    return cmds


def ns_per_unit(cmd: list[str]) -> float:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"host_overhead: {os.path.basename(cmd[0])} failed: {p.stderr.strip()}")
    return float(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20, help="off/on pairs per program")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    ap.add_argument("--floor", action="store_true",
                    help="also empty programs on the same tracepoints (what the tracepoints cost alone)")
    a = ap.parse_args()
    from bench.toggle import EmptyProbes
    from pctop.sources.ebpf import EbpfSource

    require_ebpf("host_overhead")
    tmp = tempfile.TemporaryDirectory(prefix="pctop-bench-")  # its programs, removed at the end
    cmds = build(tmp.name)
    src = EbpfSource(None)  # follows nothing: everything it sees is turned away
    src.start()
    probes = ToggledProbes(src)
    columns = [("", probes)]
    out = {}
    try:
        if a.floor:
            columns.append((" (floor)", EmptyProbes(probes.tracepoints)))
        for name, cmd in cmds.items():
            for suffix, toggled in columns:
                for _, other in columns:  # only the column measured may be attached
                    other.set(False)
                pairs = abba_pairs(toggled, a.pairs, lambda: ns_per_unit(cmd), f"{name}{suffix} ns, ")
                ci = median_ci([on / off for off, on in pairs])
                out[name + suffix] = {
                    "unit": PROGRAMS[name][2], "ns_off": round(statistics.median(off for off, _ in pairs)),
                    "ns_on": round(statistics.median(on for _, on in pairs)),
                    "ratios": [round(on / off, 3) for off, on in pairs],
                    "median_ratio": round(ci.median, 3), "ci95": [round(ci.low, 3), round(ci.high, 3)],
                    "ci_confidence": round(ci.confidence, 3)}
    finally:
        for _, toggled in columns[1:]:
            toggled.close()
        src.close()
        tmp.cleanup()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
              "cpus": os.cpu_count(), "kernel": platform.release(), "load_avg_1m": os.getloadavg()[0],
              "programs": out}
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"{result['date']}, {result['host']}, {result['cpus']} CPUs, kernel {result['kernel']}, "
          f"load {result['load_avg_1m']:.1f}")
    for name, d in out.items():
        print(f"{name}: {d['ns_off']} -> {d['ns_on']} ns per {d['unit']} (median times); time on/off median "
              f"{d['median_ratio']} ({d['ci_confidence']:.0%} interval {d['ci95'][0]}-{d['ci95'][1]}, n={a.pairs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
