"""What the probes cost a fast C fault handler (the reference engine is Python; VMMs are not).

    .venv/bin/python bench/c_handler_overhead.py [--pairs 8] [--pages 20000] [--json]

tests/programs/uffd_toucher.c (built here with gcc): 2 toucher threads fault on 20000
pages each of a uffd region; one handler thread reads up to 8 messages per read() and
UFFDIO_COPYs each page (no delay): a demand fault costs ~20-25 us end to end, the fastest
honest uffd round trip on one host. The probes (EbpfSource following every uffd/KVM user,
as `pctop monitor` does) are attached and detached between runs without recompiling,
ABBA, and each pair's on/off fault rate is a ratio; the median is the result, with its
distribution-free 95 % interval (bench/median_ci.py). Faults per second come from the
program's own count and its wall time.
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

from bench.median_ci import median_ci, verdict  # noqa: E402
from bench.toggle import ToggledProbes, abba_pairs, require_ebpf  # noqa: E402


def build_toucher(out_dir: str) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("c_handler_overhead: gcc is needed to build tests/programs/uffd_toucher.c")
    out = os.path.join(out_dir, "uffd_toucher")
    subprocess.run([gcc, "-O2", "-pthread", "-o", out, os.path.join(ROOT, "tests/programs/uffd_toucher.c")],
                   check=True)
    return out


def fault_rate(toucher: str, pages: int) -> float:
    t0 = time.monotonic()
    p = subprocess.run([toucher, "-t", "2", "-p", str(pages), "-i", "-b", "8"], capture_output=True, text=True,
                       timeout=120)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"c_handler_overhead: uffd_toucher failed: {p.stderr.strip()}")
    return sum(t["faults"] for t in json.loads(p.stdout)["touchers"]) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8, help="off/on pairs")
    ap.add_argument("--pages", type=int, default=20000, help="pages per toucher thread per run")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    a = ap.parse_args()
    from pctop.sources.ebpf import EbpfSource

    require_ebpf("c_handler_overhead")
    tmp = tempfile.TemporaryDirectory(prefix="pctop-bench-")  # its programs, removed at the end
    toucher = build_toucher(tmp.name)
    src = EbpfSource(None, follow_all=True)
    src.start()
    probes = ToggledProbes(src)

    def run() -> float:
        rate = fault_rate(toucher, a.pages)
        src.collect()  # what a monitor does each interval; keeps the maps small
        return rate

    try:
        pairs = abba_pairs(probes, a.pairs, run, "faults/s, ")
    finally:
        src.close()
        tmp.cleanup()
    rates = {"off": [round(off) for off, _ in pairs], "on": [round(on) for _, on in pairs]}
    ratios = [on / off for off, on in pairs]
    ci = median_ci(ratios)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
              "cpus": os.cpu_count(), "kernel": platform.release(), "load_avg_1m": os.getloadavg()[0],
              "rates": rates, "ratios": [round(x, 3) for x in ratios],
              "median_ratio": round(ci.median, 3), "ci95": [round(ci.low, 3), round(ci.high, 3)],
              "ci_confidence": round(ci.confidence, 3), "verdict": verdict(ci, 0.95),
              "us_per_fault_off": round(1e6 / statistics.median(rates["off"]), 1),
              "us_per_fault_on": round(1e6 / statistics.median(rates["on"]), 1)}
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"{result['date']}, {result['host']}, {result['cpus']} CPUs, kernel {result['kernel']}, "
          f"load {result['load_avg_1m']:.1f}")
    print(f"C handler, probes on/off: {result['ratios']}, median {result['median_ratio']} "
          f"({result['ci_confidence']:.0%} interval {result['ci95'][0]}-{result['ci95'][1]}, "
          f"target >= 0.95 {result['verdict']}); "
          f"{result['us_per_fault_off']} -> {result['us_per_fault_on']} us per fault (median rates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
