"""What watching costs: the engine's fault rate with and without `pctop monitor` attached.

    .venv/bin/python bench/monitor_overhead.py [--window 2] [--rounds 4] [--toggles 8] [--strategy uffd] [--json]

One reference-engine run (KVM guest, 2 vCPUs, sequential pattern, background stream off:
every touch is a demand fault at a steady rate) is watched in alternating windows:
  * off: nothing of pctop attached;
  * on:  `pctop monitor --json -p <engine pid> --interval 1` (the real CLI, its output
         read and dropped); the window starts SETTLE_S after its header (probes compiled
         and attached: the one-off start-up is not what a running monitor costs).
Rounds go off-on, on-off, ... (ABBA) so a drift in the engine's rate cancels; each
round's on/off ratio is reported and their median is the result. Rates come from the
engine's own control-socket counters (faults_total deltas over measured time).

Then the probes alone, toggled in this process without recompiling: the same probes
(EbpfSource following the engine) attached / detached in alternating short windows
(ABBA again), so the kernel-side cost is measured tightly interleaved.
Last, one window with sysctl kernel.bpf_stats_enabled=1 (restored after; it is off in
every rate window above because the kernel's own accounting costs time per program run):
per program, run_time_ns / run_cnt (EbpfSource.prog_stats(), from /proc/self/fdinfo of
the prog fds), and the probes' ns per engine fault.
Other sessions on the machine may run probes or load of their own: they fall on both
kinds of window alike, so the ratios still compare like with like (but widen the spread).
Target (issue 5): <= 5 % fault-rate loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.toggle import ToggledProbes  # noqa: E402
from pctop.sources.engine import EngineConnection, EngineError  # noqa: E402

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"
# After the monitor's header: its first collect and the compiler's exit (hundreds of MB
# unmapped) are a start-up cost, not what an attached monitor costs.
SETTLE_S = 1.5


class Window(NamedTuple):
    kind: str  # "off" | "on" | "probes-in-bench"
    seconds: float
    faults: int
    engine_cpu_s: float = 0.0  # CPU time of the engine's processes (destination + source)

    @property
    def rate(self) -> float:
        return self.faults / self.seconds

    @property
    def cpu_us_per_fault(self) -> float:
        return 1e6 * self.engine_cpu_s / max(1, self.faults)


def status(conn: EngineConnection) -> dict:
    return conn.request({"cmd": "status"})


def faulting(conn: EngineConnection) -> bool:
    try:
        return status(conn)["faults_total"] > 0
    except EngineError:  # its socket is not there yet
        return False


def engine_cpu_seconds(pid: int) -> float:
    """The engine's CPU: its destination process and every process it started (the source).
    Probe runs are charged to the thread they interrupt, on the fault path mostly the engine's,
    so CPU per fault shows their cost with far less noise than the fault rate does."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(conn: EngineConnection, kind: str, seconds: float) -> Window:
    pid = status(conn)["pid"]
    a, t0, c0 = status(conn), time.monotonic(), engine_cpu_seconds(pid)
    time.sleep(seconds)
    b, t1, c1 = status(conn), time.monotonic(), engine_cpu_seconds(pid)
    if b["state"] not in ("postcopy", "paused"):
        raise SystemExit(f"the engine left post-copy ({b['state']}) during a window: give it more --memory")
    return Window(kind, t1 - t0, b["faults_total"] - a["faults_total"], c1 - c0)


def monitor_window(conn: EngineConnection, pid: int, seconds: float) -> tuple[Window, float]:
    """One window with `pctop monitor --json` attached -> (window, the monitor's CPU seconds)."""
    mon = subprocess.Popen([sys.executable, "-m", "pctop", "monitor", "--json", "--interval", "1", "-p", str(pid)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        header = json.loads(mon.stdout.readline())
        if header.get("probe_tier") != "ebpf":
            raise SystemExit(f"pctop monitor runs without eBPF here: {header.get('missing')}")
        # drain its samples so it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in mon.stdout], daemon=True).start()
        time.sleep(SETTLE_S)
        cpu0 = cpu_seconds(mon.pid)
        w = measure(conn, "on", seconds)
        cpu1 = cpu_seconds(mon.pid)
    finally:
        mon.send_signal(signal.SIGTERM)
        try:
            mon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            mon.kill()
            mon.wait()
    return w, cpu1 - cpu0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def toggled_probes(conn: EngineConnection, pid: int, pairs: int, seconds: float
                   ) -> tuple[list[Window], Window, dict[str, tuple[int, int]]]:
    """The probes attached / detached in alternating windows (bcc's own attach calls on
    the one loaded object: no recompiling between windows); then one window with the
    kernel's per-program accounting on -> (windows, cost window, {program: (runs, ns)})."""
    from pctop.sources.ebpf import EbpfSource

    src = EbpfSource([pid])
    src.start()
    probes = ToggledProbes(src)
    windows: list[Window] = []
    stats_before = None
    try:
        for r in range(pairs):
            for kind in (("off", "on") if r % 2 == 0 else ("on", "off")):
                probes.set(kind == "on")
                src.collect()
                windows.append(measure(conn, kind, seconds))
        probes.set(True)
        stats_before = open(BPF_STATS).read().strip()
        with open(BPF_STATS, "w") as f:
            f.write("1")
        before = src.prog_stats()
        cost = measure(conn, "on+stats", max(seconds, 2.0))
        after = src.prog_stats()
    finally:
        if stats_before is not None:
            with open(BPF_STATS, "w") as f:
                f.write(stats_before)
        src.close()
    per = {name: (cnt - before.get(name, (0, 0))[0], ns - before.get(name, (0, 0))[1])
           for name, (cnt, ns) in after.items()}
    return windows, cost, {k: v for k, v in per.items() if v[0]}


def pair_ratios(windows: list[Window], metric: str = "rate") -> list[float]:
    """on/off `metric` (a Window property) of each consecutive (off, on) or (on, off) pair."""
    out = []
    for i in range(0, len(windows) - 1, 2):
        pair = {w.kind: getattr(w, metric) for w in windows[i:i + 2]}
        out.append(pair["on"] / pair["off"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=2.0, help="seconds per measured window")
    ap.add_argument("--rounds", type=int, default=4, help="off/on pairs with pctop monitor")
    ap.add_argument("--toggles", type=int, default=8, help="off/on pairs with the probes alone")
    ap.add_argument("--toggle-window", type=float, default=1.0, help="seconds per probes-alone window")
    ap.add_argument("--strategy", default="uffd", choices=["uffd", "sharded", "vcpu-exit"])
    ap.add_argument("--memory", default="2G", help="guest memory (enough to keep faulting through all windows)")
    ap.add_argument("--latency", type=int, default=0, help="us the source adds to each demand reply (a link's RTT)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = ap.parse_args()
    from pctop.sources.ebpf import ebpf_unavailable_reason

    why = ebpf_unavailable_reason()
    if why:
        print(f"monitor_overhead: eBPF unavailable: {why}", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="pctop-bench-")
    sock = os.path.join(tmp, "engine.sock")
    eng = subprocess.Popen([sys.executable, "-m", "pctop", "demo", "--headless", "--json", "--workload", "kvm",
                            "--strategy", a.strategy, "--vcpus", "2", "--memory", a.memory, "--pattern", "seq",
                            "--no-background", "--latency", str(a.latency), "--duration", "600", "--control", sock],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    conn = EngineConnection(sock, timeout=10)
    windows: list[Window] = []
    mon_cpu = 0.0
    try:
        deadline = time.monotonic() + 120
        while not faulting(conn):
            if eng.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the engine did not start faulting")
            time.sleep(0.2)
        time.sleep(0.5)  # past the vCPUs' start-up
        for r in range(a.rounds):
            for kind in (("off", "on") if r % 2 == 0 else ("on", "off")):
                if kind == "off":
                    w = measure(conn, "off", a.window)
                else:
                    w, cpu = monitor_window(conn, eng.pid, a.window)
                    mon_cpu += cpu
                windows.append(w)
                print(f"monitor round {r}: {w.kind:3} {w.rate:8.0f} faults/s", file=sys.stderr)
        toggled, cost, per_prog = toggled_probes(conn, eng.pid, a.toggles, a.toggle_window)
        for w in toggled:
            print(f"probes alone: {w.kind:3} {w.rate:8.0f} faults/s", file=sys.stderr)
    finally:
        conn.close()
        try:
            os.killpg(eng.pid, signal.SIGTERM)
            eng.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(eng.pid, signal.SIGKILL)
            eng.wait()

    ratios, toggle_ratios = pair_ratios(windows), pair_ratios(toggled)
    cpu_ratios = pair_ratios(windows, "cpu_us_per_fault")
    toggle_cpu_ratios = pair_ratios(toggled, "cpu_us_per_fault")
    on_s = sum(w.seconds for w in windows if w.kind == "on")
    probe_runs = sum(c for c, _ in per_prog.values())
    probe_ns = sum(ns for _, ns in per_prog.values())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0], "strategy": a.strategy, "latency_us": a.latency,
        "monitor": {"window_s": a.window, "off_rates": [round(w.rate) for w in windows if w.kind == "off"],
                    "on_rates": [round(w.rate) for w in windows if w.kind == "on"],
                    "ratios": [round(x, 3) for x in ratios], "median_ratio": round(statistics.median(ratios), 3),
                    "cpu_pct": round(100 * mon_cpu / on_s, 1),
                    "engine_cpu_ratios": [round(x, 3) for x in cpu_ratios],
                    "engine_cpu_median_ratio": round(statistics.median(cpu_ratios), 3)},
        "probes_alone": {"window_s": a.toggle_window, "ratios": [round(x, 3) for x in toggle_ratios],
                         "median_ratio": round(statistics.median(toggle_ratios), 3),
                         "engine_cpu_ratios": [round(x, 3) for x in toggle_cpu_ratios],
                         "engine_cpu_median_ratio": round(statistics.median(toggle_cpu_ratios), 3),
                         "engine_cpu_us_per_fault_off": round(statistics.median(
                             w.cpu_us_per_fault for w in toggled if w.kind == "off"), 1),
                         "engine_cpu_us_per_fault_on": round(statistics.median(
                             w.cpu_us_per_fault for w in toggled if w.kind == "on"), 1)},
        "probe_cost": {"window_s": round(cost.seconds, 2), "faults": cost.faults,
                       "runs_per_fault": round(probe_runs / max(1, cost.faults), 1),
                       "ns_per_run": round(probe_ns / max(1, probe_runs)),
                       "ns_per_fault": round(probe_ns / max(1, cost.faults)),
                       "cpu_pct": round(100 * probe_ns / 1e9 / cost.seconds, 2),
                       "per_prog": {k: {"runs": c, "ns_per_run": round(ns / c)}
                                    for k, (c, ns) in sorted(per_prog.items())}},
    }
    if a.json:
        print(json.dumps(result))
        return 0
    m, p, c = result["monitor"], result["probes_alone"], result["probe_cost"]
    print(f"{result['date']}, {result['host']}, {result['cpus']} CPUs, kernel {result['kernel']}, "
          f"load {result['load_avg_1m']:.1f}, strategy {a.strategy}, link latency {a.latency} us")
    print(f"pctop monitor: off {m['off_rates']} on {m['on_rates']} faults/s; on/off {m['ratios']}, "
          f"median {m['median_ratio']} (target >= 0.95); monitor CPU {m['cpu_pct']} % of one core")
    print(f"  engine CPU per fault on/off {m['engine_cpu_ratios']}, median {m['engine_cpu_median_ratio']}")
    print(f"probes alone (toggled): on/off {p['ratios']}, median {p['median_ratio']}")
    print(f"  engine CPU per fault on/off {p['engine_cpu_ratios']}, median {p['engine_cpu_median_ratio']} "
          f"({p['engine_cpu_us_per_fault_off']} -> {p['engine_cpu_us_per_fault_on']} us)")
    print(f"probe cost (bpf_stats): {c['runs_per_fault']} runs/fault x {c['ns_per_run']} ns = "
          f"{c['ns_per_fault']} ns per fault, {c['cpu_pct']} % of one CPU")
    print("| program | runs | ns/run |\n|---|---|---|")
    for k, v in c["per_prog"].items():
        print(f"| {k} | {v['runs']} | {v['ns_per_run']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
