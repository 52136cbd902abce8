"""Reference-engine benchmark: demand fault rate per strategy, stream throughput vs raw UFFDIO_COPY.

    .venv/bin/python bench/engine.py [--seconds 2] [--memory 512M] [--json]

Everything in one run on one machine, so the ratios compare like with like:
  * fault rate: each strategy at 1 and 2 vCPUs, KVM guest (threads without /dev/kvm),
    random pattern, background stream off (every first touch is a demand fault that
    goes to the source process and back). The guest runs --seconds over memory large
    enough that it keeps finding missing pages; the rate is faults / vCPU-seconds.
  * stream: the background stream alone (source process -> socket -> UFFDIO_COPY,
    no guest running) against raw UFFDIO_COPY of 2 MiB chunks from memory in this
    process into a registered region.
Targets are in /work/shared/notes/platform.md and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pctop.engine.run import Engine, EngineConfig  # noqa: E402
from pctop.engine.uffd import AnonMemory, Uffd  # noqa: E402
from pctop.sizes import parse_size  # noqa: E402

CHUNK = 2 << 20


class IdleGuest:
    """A workload that never touches memory: measures the stream with nothing competing.
    (A bench tool, not a stand-in in any test.)"""

    kind = "none"

    def __init__(self, data_addr, data_size, vcpus, **_):
        pass

    def start(self, on_memory_fault=None):
        pass

    def vcpu_tids(self):
        return []

    def dirty_pages(self):
        return set()

    def wait(self, timeout):
        return False

    def stop(self):
        pass


def fault_rate(strategy: str, vcpus: int, memory: int, seconds: float, workload: str, pin: bool) -> dict:
    cfg = EngineConfig(memory=memory, vcpus=vcpus, strategy=strategy, background=False, pattern="random",
                       duration=seconds, control="", workload=workload, pin=pin)
    s = Engine(cfg).run()
    assert s["ok"], s["mismatch_list"] or s["errors"]
    busy = sum(r["busy_ns"] for r in s["reader_threads"]) / 1e9
    return {"strategy": strategy, "vcpus": vcpus, "faults": s["faults_total"], "vcpu_s": s["vcpu_seconds"],
            "fault_rate": s["fault_rate"], "workload": s["workload"], "reader_busy_s": round(busy, 3),
            "mean_stall_us": round(sum(s["stall_ns_per_vcpu"]) / max(1, s["faults_total"]) / 1e3, 1)}


def stream_rate(memory: int) -> float:
    cfg = EngineConfig(memory=memory, vcpus=1, strategy="uffd", bandwidth=0, control="")
    eng = Engine(cfg, workload_cls=IdleGuest)
    s = eng.run()
    assert s["ok"], s["mismatch_list"] or s["errors"]
    t = eng.tel
    return s["pages_background"] * 4096 / (t.stream_last - t.stream_first)


def raw_copy_rate(memory: int) -> float:
    with Uffd() as uf, AnonMemory(memory) as dst, AnonMemory(CHUNK) as src:
        ctypes.memset(src.addr, 0x5A, CHUNK)
        uf.register(dst.addr, memory)
        t0 = time.perf_counter()
        for off in range(0, memory, CHUNK):
            assert uf.copy(dst.addr + off, src.addr, CHUNK) == CHUNK
        return memory / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--strategies", default="uffd,sharded,vcpu-exit")
    ap.add_argument("--pin", action="store_true", help="pin each vCPU and its fault-serving threads to one CPU")
    ap.add_argument("--vcpus", default="1,2")
    ap.add_argument("--no-stream", action="store_true")
    a = ap.parse_args()
    memory = parse_size(a.memory)
    workload = "kvm" if os.path.exists("/dev/kvm") else "threads"
    rows = [fault_rate(s, int(v), memory, a.seconds, workload, a.pin)
            for s in a.strategies.split(",") for v in a.vcpus.split(",")]
    stream = [stream_rate(memory) for _ in range(0 if a.no_stream else 2)] or [0.0]
    raw = [raw_copy_rate(memory) for _ in range(0 if a.no_stream else 2)] or [1.0]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
           "kernel": platform.release(), "cpus": os.cpu_count(), "faults": rows,
           "stream_bps": max(stream), "raw_copy_bps": max(raw)}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{out['date']}  {out['machine']}  kernel {out['kernel']}  {out['cpus']} CPUs  workload {workload}")
    print(f"{'strategy':10} {'vCPUs':>5} {'faults':>8} {'vCPU s':>7} {'faults/s':>9} {'stall us':>9} {'reader busy s':>13}")
    for r in rows:
        print(f"{r['strategy']:10} {r['vcpus']:>5} {r['faults']:>8} {r['vcpu_s']:>7.2f} {r['fault_rate']:>9.0f} "
              f"{r['mean_stall_us']:>9.1f} {r['reader_busy_s']:>13.3f}")
    by = {(r["strategy"], r["vcpus"]): r["fault_rate"] for r in rows}
    if ("uffd", 2) in by and ("vcpu-exit", 2) in by:
        print(f"vcpu-exit / uffd at 2 vCPUs: {by[('vcpu-exit', 2)] / by[('uffd', 2)]:.2f}x (target >= 1.4x)")
    print(f"stream {out['stream_bps'] / 1e9:.2f} GB/s, raw UFFDIO_COPY 2 MiB chunks {out['raw_copy_bps'] / 1e9:.2f} GB/s: "
          f"{100 * out['stream_bps'] / out['raw_copy_bps']:.0f}% (target >= 90%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
