"""What watching costs: the engine's fault rate with and without `pctop monitor` attached.

    .venv/bin/python bench/monitor_overhead.py [--rounds 40] [--toggles 200] [--engine-cpus 0]
        [--monitor-arg=--no-ebpf] [--json]

The reference engine (KVM guest, 2 vCPUs, sequential pattern, background stream off: every
touch is a demand fault at a steady rate) runs on --engine-cpus (default CPU 0: there it is
CPU-bound, so probe time on its path costs fault rate one for one, and a monitor's start-up,
this process and the monitor itself run on the other CPUs). It is watched in windows:
  * off: nothing of pctop attached;
  * on:  `pctop monitor --json -p <engine pid> --interval 1` (the real CLI, its output read
         and dropped); the windows start --settle s after its header (probes compiled and
         attached: the one-off start-up is not what a running monitor costs).
They go off, ON, ON, off (one monitor start-up serves two pairs) so a drift in the engine's
rate cancels. Then the probes alone, attached/detached in this process without recompiling,
in many short ABBA windows. Last, one window with sysctl kernel.bpf_stats_enabled=1
(restored after; off in every rate window because the kernel's accounting costs time per
program run): per program, run_time_ns / run_cnt, and the probes' ns per engine fault.

Rates come from the engine's own control-socket counters (faults_total over measured time).
Each pair gives an on/off ratio; the result is their median with a distribution-free 95 %
interval (bench/median_ci.py). Single pairs swing by 10-20 % on this shared VM, so the target
counts as met only when the whole interval clears it, missed when the whole interval falls
short, else the run cannot tell. The engine is restarted between pairs before its guest
memory runs out, so a run can be as long as its intervals need.
Target: <= 5 % fault-rate loss.
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

from bench.median_ci import median_ci, verdict  # noqa: E402
from bench.toggle import EmptyProbes, ToggledProbes, abba_order, require_ebpf  # noqa: E402
from pctop.sources.engine import EngineConnection, EngineUnreachable  # noqa: E402

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"
# After the monitor's header: its first collect and the compiler's exit (hundreds of MB
# unmapped) are a start-up cost, not what an attached monitor costs.
SETTLE_S = 1.5  # default --settle
MONITOR_START_S = 15.0  # a monitor's compile and attach, with room: what an "on" window adds
TARGET_RATIO = 0.95  # the target: <= 5 % fault-rate loss


class Window(NamedTuple):
    kind: str  # "off" | "on" | "on+stats" (the bpf_stats window)
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
    except EngineUnreachable:  # its socket is not there yet
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and every process it started: for the engine, its destination
    and its source. Probe runs are charged to the thread they interrupt, on the fault path
    mostly the engine's, so CPU per fault shows their cost with far less noise than the
    fault rate does."""
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


class EngineUnderTest:
    """The reference engine being measured, on `cpus` (None: anywhere). Restarted between
    pairs of windows when its guest memory would run out during the next ones, so a long
    benchmark never runs out of pages to fault; a pair never spans a restart."""

    def __init__(self, args, cpus: set[int] | None) -> None:
        self.args, self.cpus = args, cpus
        self.proc: subprocess.Popen | None = None
        self.conn: EngineConnection | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.restarts = -1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        a = self.args
        self.tmp = tempfile.TemporaryDirectory(prefix="pctop-bench-")  # the socket's folder, removed by stop()
        sock = os.path.join(self.tmp.name, "engine.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pctop", "demo", "--headless", "--json", "--workload", "kvm",
             "--strategy", a.strategy, "--vcpus", "2", "--memory", a.memory, "--pattern", "seq",
             "--no-background", "--latency", str(a.latency), "--duration", "3600", "--control", sock],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)
        self.conn = EngineConnection(sock, timeout=10)
        self.restarts += 1
        deadline = time.monotonic() + 120
        while not faulting(self.conn):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the engine did not start faulting")
            time.sleep(0.2)
        time.sleep(0.5)  # past the vCPUs' start-up

    def fresh_if_needed(self, seconds_ahead: float) -> bool:
        """Restart unless the guest has pages left for twice `seconds_ahead` at its mean rate
        so far -> whether it restarted."""
        st = status(self.conn)
        rate = st["pages_received"] / max(st["elapsed_s"], 1e-3)
        if st["pages_total"] - st["pages_received"] > 2 * rate * seconds_ahead:
            return False
        self.stop()
        self.start()
        return True

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def measure(eng: EngineUnderTest, kind: str, seconds: float) -> Window:
    conn = eng.conn
    a, t0, c0 = status(conn), time.monotonic(), cpu_seconds(eng.pid)
    time.sleep(seconds)
    b, t1, c1 = status(conn), time.monotonic(), cpu_seconds(eng.pid)
    if b["state"] not in ("postcopy", "paused"):
        raise SystemExit(f"the engine left post-copy ({b['state']}) during a window: give it more --memory")
    return Window(kind, t1 - t0, b["faults_total"] - a["faults_total"], c1 - c0)


def monitor_windows(eng: EngineUnderTest, seconds: float, n: int, settle: float = SETTLE_S,
                    extra: tuple[str, ...] = ()) -> tuple[list[Window], float]:
    """n windows back to back with one `pctop monitor --json` (plus `extra` arguments)
    attached (one start-up serves them all) -> (windows, the monitor's CPU seconds over them)."""
    mon = subprocess.Popen([sys.executable, "-m", "pctop", "monitor", "--json", "--interval", "1",
                            "-p", str(eng.pid), *extra],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        header = json.loads(mon.stdout.readline())
        if header.get("probe_tier") != "ebpf" and "--no-ebpf" not in extra:
            raise SystemExit(f"pctop monitor runs without eBPF here: {header.get('missing')}")
        # drain its samples so it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in mon.stdout], daemon=True).start()
        time.sleep(settle)
        cpu0 = cpu_seconds(mon.pid)
        ws = [measure(eng, "on", seconds) for _ in range(n)]
        cpu1 = cpu_seconds(mon.pid)
    finally:
        mon.send_signal(signal.SIGTERM)
        try:
            mon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            mon.kill()
            mon.wait()
    return ws, cpu1 - cpu0


def toggled_probes(eng: EngineUnderTest, rounds: int, seconds: float
                   ) -> tuple[dict[str, list[Window]], Window, dict[str, tuple[int, int]]]:
    """The probes, and empty programs on the same tracepoints (their floor), each attached /
    detached against an adjacent "off" window (bcc's own attach calls on loaded objects: no
    recompiling between windows); then one window with the kernel's per-program accounting
    on -> ({"probes"|"empty": windows in pairs}, cost window, {program: (runs, ns)})."""
    from pctop.sources.ebpf import EbpfSource

    src = EbpfSource([eng.pid])
    src.start()
    probes = ToggledProbes(src)
    empty = EmptyProbes(probes.tracepoints)
    probes.set(False)
    kinds = {"probes": probes, "empty": empty}
    windows: dict[str, list[Window]] = {k: [] for k in kinds}
    stats_before = None
    try:
        for r in range(rounds):
            if eng.fresh_if_needed(4 * seconds + 1):
                src.add_pid(eng.pid)
            for name in (("probes", "empty") if r % 2 == 0 else ("empty", "probes")):
                for kind in abba_order(r):
                    kinds[name].set(kind == "on")
                    src.collect()
                    windows[name].append(measure(eng, kind, seconds))
                kinds[name].set(False)
                pair = windows[name][-2:]
                print(f"toggled, round {r}: {name:6} " + " ".join(f"{w.kind} {w.rate:6.0f}" for w in pair)
                      + " faults/s", file=sys.stderr)
        probes.set(True)
        stats_before = open(BPF_STATS).read().strip()
        with open(BPF_STATS, "w") as f:
            f.write("1")
        before = src.prog_stats()
        cost = measure(eng, "on+stats", max(seconds, 2.0))
        after = src.prog_stats()
    finally:
        if stats_before is not None:
            with open(BPF_STATS, "w") as f:
                f.write(stats_before)
        empty.close()
        src.close()
    per = {name: (cnt - before.get(name, (0, 0))[0], ns - before.get(name, (0, 0))[1])
           for name, (cnt, ns) in after.items()}
    return windows, cost, {k: v for k, v in per.items() if v[0]}


def split_cpus(spec: str) -> tuple[set[int] | None, set[int] | None]:
    """--engine-cpus -> (the engine's CPUs, everyone else's); (None, None) for 'all'."""
    if spec == "all":
        return None, None
    mine = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus <= mine:
        raise SystemExit(f"--engine-cpus {spec}: this process may only use CPUs {sorted(mine)}")
    return cpus, (mine - cpus) or None


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
    ap.add_argument("--toggles", type=int, default=8,
                    help="off/on pairs with the probes alone, and as many with empty programs")
    ap.add_argument("--toggle-window", type=float, default=1.0, help="seconds per probes-alone window")
    ap.add_argument("--strategy", default="uffd", choices=["uffd", "sharded", "vcpu-exit"])
    ap.add_argument("--memory", default="2G", help="guest memory (enough to keep faulting through all windows)")
    ap.add_argument("--latency", type=int, default=0, help="us the source adds to each demand reply (a link's RTT)")
    ap.add_argument("--engine-cpus", default="0",
                    help="CPUs for the engine, e.g. 0 or 0-1, or 'all'; this bench and the monitors it starts "
                         "run on the others (default 0: the engine is CPU-bound there, so any probe time on "
                         "its path costs fault rate, and the monitor's start-up does not land on it)")
    ap.add_argument("--settle", type=float, default=SETTLE_S,
                    help="seconds between a monitor's start (or exit) and the next window; with the engine on "
                         "every CPU the monitor's compile competes with it, so give its aftermath longer")
    ap.add_argument("--monitor-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the monitor (repeatable), e.g. --monitor-arg=--no-ebpf: "
                         "its user space alone, without the probes")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = ap.parse_args()
    if a.rounds < 1 or a.toggles < 1:
        ap.error("--rounds and --toggles need at least one pair each")
    require_ebpf("monitor_overhead")
    engine_cpus, bench_cpus = split_cpus(a.engine_cpus)
    if bench_cpus:
        os.sched_setaffinity(0, bench_cpus)  # this process and the monitors it starts
    eng = EngineUnderTest(a, engine_cpus)
    windows: list[Window] = []
    mon_cpu = 0.0
    try:
        eng.start()
        # off, ON, ON, off: two pairs per monitor start-up, each pair adjacent in time
        for r in range(0, a.rounds, 2):
            eng.fresh_if_needed(4 * a.window + MONITOR_START_S)
            both = r + 1 < a.rounds
            off = [measure(eng, "off", a.window)]
            on, cpu = monitor_windows(eng, a.window, 2 if both else 1, a.settle, tuple(a.monitor_arg))
            mon_cpu += cpu
            if both:
                time.sleep(a.settle)  # the engine runs ~20 % faster for ~1 s after a monitor exits
                off.append(measure(eng, "off", a.window))
            windows += [off[0], on[0]] + ([on[1], off[1]] if both else [])
            print(f"monitor, pairs {r}-{r + both}: off {[round(w.rate) for w in off]} "
                  f"on {[round(w.rate) for w in on]} faults/s", file=sys.stderr)
        toggled, cost, per_prog = toggled_probes(eng, a.toggles, a.toggle_window)
    finally:
        eng.stop()

    on_s = sum(w.seconds for w in windows if w.kind == "on")
    probe_runs = sum(c for c, _ in per_prog.values())
    probe_ns = sum(ns for _, ns in per_prog.values())

    def summary(ws: list[Window]) -> dict:
        rs, cpu = pair_ratios(ws), pair_ratios(ws, "cpu_us_per_fault")
        ci, cpu_ci = median_ci(rs), median_ci(cpu)
        return {"ratios": [round(x, 3) for x in rs], "median_ratio": round(ci.median, 3),
                "ci95": [round(ci.low, 3), round(ci.high, 3)], "ci_confidence": round(ci.confidence, 3),
                "verdict": verdict(ci, TARGET_RATIO),
                "engine_cpu_ratios": [round(x, 3) for x in cpu], "engine_cpu_median_ratio": round(cpu_ci.median, 3),
                "engine_cpu_ci95": [round(cpu_ci.low, 3), round(cpu_ci.high, 3)],
                "engine_cpu_us_per_fault_off": round(statistics.median(
                    w.cpu_us_per_fault for w in ws if w.kind == "off"), 1),
                "engine_cpu_us_per_fault_on": round(statistics.median(
                    w.cpu_us_per_fault for w in ws if w.kind == "on"), 1)}

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0], "strategy": a.strategy, "latency_us": a.latency,
        "engine_cpus": sorted(engine_cpus) if engine_cpus else "all", "engine_restarts": eng.restarts,
        "monitor_args": a.monitor_arg,
        "target_ratio": TARGET_RATIO,
        "monitor": {"window_s": a.window, "off_rates": [round(w.rate) for w in windows if w.kind == "off"],
                    "on_rates": [round(w.rate) for w in windows if w.kind == "on"], **summary(windows),
                    "cpu_pct": round(100 * mon_cpu / on_s, 1) if on_s else 0.0},
        "probes_alone": {"window_s": a.toggle_window, **summary(toggled["probes"])},
        "empty_programs": {"window_s": a.toggle_window, **summary(toggled["empty"])},
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
          f"load {result['load_avg_1m']:.1f}, strategy {a.strategy}, link latency {a.latency} us, "
          f"engine on CPUs {result['engine_cpus']} ({eng.restarts} restarts)")
    def ci(d: dict) -> str:
        return (f"median {d['median_ratio']} ({d['ci_confidence']:.0%} interval {d['ci95'][0]}-{d['ci95'][1]}, "
                f"n={len(d['ratios'])}): target >= {TARGET_RATIO} {d['verdict']}")

    mon_label = " ".join(["pctop monitor", *a.monitor_arg]) + " (started per pair)"
    for label, d in ((mon_label, m), ("probes alone (toggled)", p),
                     ("empty programs on the same tracepoints (toggled; the floor)", result["empty_programs"])):
        print(f"{label}:\n  rate on/off {ci(d)}")
        print(f"  engine CPU per fault on/off median {d['engine_cpu_median_ratio']} "
              f"(interval {d['engine_cpu_ci95'][0]}-{d['engine_cpu_ci95'][1]}; "
              f"{d['engine_cpu_us_per_fault_off']} -> {d['engine_cpu_us_per_fault_on']} us)")
    print(f"  monitor process CPU: {m['cpu_pct']} % of one core")
    print(f"probe cost (bpf_stats): {c['runs_per_fault']} runs/fault x {c['ns_per_run']} ns = "
          f"{c['ns_per_fault']} ns per fault, {c['cpu_pct']} % of one CPU")
    print("| program | runs | ns/run |\n|---|---|---|")
    for k, v in c["per_prog"].items():
        print(f"| {k} | {v['runs']} | {v['ns_per_run']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
