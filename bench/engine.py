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
Targets and results are in bench/RESULTS.md.
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


def fault_rate(strategy: str, vcpus: int, memory: int, seconds: float, workload: str, pin: bool,
               readers: int = 1) -> dict:
    cfg = EngineConfig(memory=memory, vcpus=vcpus, strategy=strategy, background=False, pattern="random",
                       duration=seconds, control="", workload=workload, pin=pin, readers=readers)
    s = Engine(cfg).run()
    assert s["ok"], s["mismatch_list"] or s["errors"]
    busy = sum(r["busy_ns"] for r in s["reader_threads"]) / 1e9
    return {"strategy": strategy if readers == 1 else f"{strategy} r{readers}", "vcpus": vcpus,
            "faults": s["faults_total"], "vcpu_s": s["vcpu_seconds"],
            "fault_rate": s["fault_rate"], "workload": s["workload"], "reader_busy_s": round(busy, 3),
            "mean_stall_us": round(sum(s["stall_ns_per_vcpu"]) / max(1, s["faults_total"]) / 1e3, 1)}


def local_floor(vcpus: int, memory: int, seconds: float, workload: str, pin: bool) -> dict:
    """No source, no round trip: one reader in this process resolves each fault with
    UFFDIO_COPY of a page it already has (the throw-away prototypes the targets came from). The floor
    that the machine's fault path and wake-ups set for the uffd strategy."""
    import select
    import threading

    from pctop.engine.dest import pin as pin_thread
    from pctop.engine.run import pick_workload
    from pctop.engine.uffd import UFFD_MSG

    cpus = sorted(os.sched_getaffinity(0))
    cpu_for = (lambda i: cpus[i % len(cpus)]) if pin and len(cpus) > 1 else (lambda i: None)
    count = [0]
    stop = os.eventfd(0)
    with Uffd() as uf, AnonMemory(memory) as mem, AnonMemory(4096) as page:
        ctypes.memset(page.addr, 1, 4096)
        uf.register(mem.addr, memory)

        def reader() -> None:
            pin_thread(cpu_for(0))
            p = select.poll()
            p.register(uf.fd, select.POLLIN)
            p.register(stop, select.POLLIN)
            while True:
                if any(fd == stop for fd, _ in p.poll()):
                    return
                for _ev, _fl, addr, _tid in UFFD_MSG.iter_unpack(uf.read_raw(64)):
                    uf.copy(addr & ~4095, page.addr, 4096)
                    count[0] += 1

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        wl = pick_workload(workload)(mem.addr, memory, vcpus, pattern="random")
        wl.start()
        for i, tid in enumerate(wl.vcpu_tids()):
            pin_thread(cpu_for(i), tid)
        t0, c0 = time.monotonic(), count[0]
        time.sleep(seconds)
        rate = (count[0] - c0) / (time.monotonic() - t0)
        wl.stop()  # faults still being served: the reader runs until after this
        os.eventfd_write(stop, 1)
        t.join()
    os.close(stop)
    return {"strategy": "local-floor", "vcpus": vcpus, "faults": count[0], "vcpu_s": seconds,
            "fault_rate": round(rate, 1), "workload": workload, "reader_busy_s": 0.0, "mean_stall_us": 0.0}


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
    ap.add_argument("--pin", default="yes,no", help="pinning modes to measure: yes, no or yes,no")
    ap.add_argument("--vcpus", default="1,2")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    memory = parse_size(a.memory)
    workload = "kvm" if os.path.exists("/dev/kvm") else "threads"
    runs = [(s, int(v), 1) for s in a.strategies.split(",") for v in a.vcpus.split(",")]
    if "uffd" in a.strategies.split(",") and "2" in a.vcpus.split(","):
        runs.insert(2, ("uffd", 2, 2))  # one uffd, a reader per vCPU
    trials: dict[tuple, list[dict]] = {}
    for _ in range(a.rounds):  # rounds interleave the configurations: load from others hits all alike
        for mode in a.pin.split(","):
            pin = mode == "yes"
            for s, v, r in runs:
                trials.setdefault((mode, s, v, r), []).append(fault_rate(s, v, memory, a.seconds, workload, pin, r))
            for v in a.vcpus.split(","):
                trials.setdefault((mode, "local-floor", int(v), 1), []).append(
                    local_floor(int(v), memory, a.seconds, workload, pin))
    rows = []
    for key, got in trials.items():
        got.sort(key=lambda x: x["fault_rate"])
        row = dict(got[len(got) // 2])  # the median trial
        row["fault_rate_all"] = [round(x["fault_rate"]) for x in got]
        row["pinned"] = key[0]
        rows.append(row)
    stream, raw = [0.0], [1.0]
    for _ in range(0 if a.no_stream else a.rounds):
        stream.append(stream_rate(memory))
        raw.append(raw_copy_rate(memory))
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
           "kernel": platform.release(), "cpus": os.cpu_count(), "faults": rows,
           "stream_bps": max(stream), "raw_copy_bps": max(raw),
           "stream_all": [round(x / 1e9, 2) for x in stream[1:]], "raw_all": [round(x / 1e9, 2) for x in raw[1:]]}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{out['date']}  {out['machine']}  kernel {out['kernel']}  {out['cpus']} CPUs  workload {workload}")
    print(f"median of {a.rounds} interleaved rounds; all rounds in the last column")
    print(f"{'pinned':6} {'strategy':12} {'vCPUs':>5} {'faults':>8} {'vCPU s':>7} {'faults/s':>9} {'stall us':>9} "
          f"{'reader busy s':>13}  all faults/s")
    for r in rows:
        print(f"{r['pinned']:6} {r['strategy']:12} {r['vcpus']:>5} {r['faults']:>8} {r['vcpu_s']:>7.2f} {r['fault_rate']:>9.0f} "
              f"{r['mean_stall_us']:>9.1f} {r['reader_busy_s']:>13.3f}  {r['fault_rate_all']}")
    by = {(r["pinned"], r["strategy"], r["vcpus"]): r["fault_rate"] for r in rows}
    for mode in a.pin.split(","):
        if (mode, "uffd", 2) in by and (mode, "vcpu-exit", 2) in by:
            print(f"pinned={mode}: vcpu-exit / uffd at 2 vCPUs: "
                  f"{by[(mode, 'vcpu-exit', 2)] / by[(mode, 'uffd', 2)]:.2f}x (target >= 1.4x)")
    print(f"stream {out['stream_bps'] / 1e9:.2f} GB/s, raw UFFDIO_COPY 2 MiB chunks {out['raw_copy_bps'] / 1e9:.2f} GB/s: "
          f"{100 * out['stream_bps'] / out['raw_copy_bps']:.0f}% (target >= 90%; best of rounds: "
          f"stream {out['stream_all']}, raw {out['raw_all']} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
