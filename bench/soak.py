"""Soak: every count pctop reports against the truth of real uffd users, many times.

    .venv/bin/python bench/soak.py [--runs 4] [--hog both|on|off] [--cases all|engine|programs]

As root. One `pctop monitor --json` follows every uffd user for the whole soak,
as a user would run it. Each case runs --runs times without and with a CPU hog
on CPU 1 (`--hog`), one after the other:
  engine: the reference engine (2 vCPUs, 16 MiB), each strategy, stream off/on;
  programs: tests/programs/uffd_toucher.c (a spinning handler; two touchers and
    a delayed handler) and tests/programs/uffd_scenarios.c (fork with
    EVENT_FORK, a uffd sent to a separate handler process, fd reuse after
    close, three threads on one page).
Each run's own counts (its JSON) are compared with the sum of the monitor's
samples for its pids. A difference is explained only by a race the probes
counted meanwhile (their debug counters, read from the monitor's `dbg` map with
bpftool), within 0.1 %, as tests/system/test_validation.py allows; every difference is
printed with its cause, and the exit status is 1 if any is unexplained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pctop.sources.ebpf import DEBUG_COUNTERS, ebpf_unavailable_reason  # noqa: E402

ENGINE = [sys.executable, "-m", "pctop", "demo", "--headless", "--json", "--workload", "kvm", "--vcpus", "2",
          "--memory", "16M", "--pattern", "random", "--control", ""]


class Monitor:
    """`pctop monitor --json` in the background; its samples, and its probes' debug counters."""

    def __init__(self, interval: float = 0.25):
        self.p = subprocess.Popen([sys.executable, "-m", "pctop", "monitor", "--json", "--interval", str(interval)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        self.samples: list[dict] = []
        self.cv = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.wait(lambda: len(self.samples) >= 1, 120):
            raise SystemExit(f"soak: the monitor did not start: {self.p.stderr.read()[-500:]}")
        self._dbg_id = self._find_dbg_map()

    def _pump(self) -> None:
        for line in self.p.stdout:
            d = json.loads(line)
            with self.cv:
                if d.get("type") == "sample":
                    self.samples.append(d)
                elif d.get("type") == "header" and d.get("probe_tier") != "ebpf":
                    raise SystemExit(f"soak: the monitor runs without the probes: {d.get('missing')}")
                self.cv.notify_all()

    def wait(self, pred, timeout: float = 60) -> bool:
        with self.cv:
            return self.cv.wait_for(pred, timeout)

    def settle(self) -> int:
        """Wait until two more samples are in (the interval of a run's last events is
        reported); returns how many samples there are."""
        n = len(self.samples)
        self.wait(lambda: len(self.samples) >= n + 2, 30)
        return len(self.samples)

    def _find_dbg_map(self) -> int:
        """The id of the `dbg` map among the maps the monitor holds (its fds' fdinfo map_id)."""
        held = set()
        for fd in os.listdir(f"/proc/{self.p.pid}/fd"):
            try:
                with open(f"/proc/{self.p.pid}/fdinfo/{fd}") as f:
                    held.update(int(line.split()[1]) for line in f if line.startswith("map_id:"))
            except OSError:
                continue
        maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True).stdout)
        for m in maps:
            if m.get("name") == "dbg" and m["id"] in held:
                return m["id"]
        raise SystemExit("soak: cannot find the monitor's dbg map with bpftool")

    def debug(self) -> dict[str, int]:
        out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(self._dbg_id)], capture_output=True,
                             text=True).stdout
        vals = {e["formatted"]["key"]: sum(v["value"] for v in e["formatted"]["values"]) for e in json.loads(out)}
        return {name: vals.get(i, 0) for i, name in enumerate(DEBUG_COUNTERS)}

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def sums(samples: list[dict], pids: set[int]) -> tuple[dict, dict]:
    """Per (pid, tid): summed vCPU-row counters; per (pid, fd): summed uffd counters."""
    threads: dict[tuple[int, int], dict] = {}
    uffds: dict[tuple[int, int], dict] = {}
    for s in samples:
        for t in s["targets"]:
            if t["pid"] not in pids:
                continue
            for v in t["vcpus"]:
                d = threads.setdefault((t["pid"], v["tid"]), {"faults": 0, "faults_no_read": 0})
                d["faults"] += v["faults"]
                d["faults_no_read"] += v["faults_no_read"]
            for u in t["uffds"]:
                d = uffds.setdefault((t["pid"], u["fd"]), {"msgs_read": 0, "read_calls": 0, "pages_installed": 0})
                for k in d:
                    d[k] += u[k]
    return threads, uffds


class Checker:
    def __init__(self):
        self.diffs: list[str] = []
        self.unexplained = 0
        self.checks = 0

    def same(self, what: str, got: int, truth: int, races: dict[str, int], *names: str) -> None:
        """got must be truth, or fall short by at most the named races (and 0.1 %)."""
        self.checks += 1
        if got == truth:
            return
        allowed = sum(races.get(n, 0) for n in names)
        short = truth - got
        ok = 0 < short <= allowed and short <= max(1, truth // 1000)
        cause = ", ".join(f"{n} {races.get(n, 0)}" for n in names) or "no race named"
        self.diffs.append(f"{'explained' if ok else 'UNEXPLAINED'}: {what}: pctop {got}, truth {truth} ({cause})")
        self.unexplained += not ok


def run_engine(strategy: str, stream: bool) -> tuple[dict, set[int]]:
    bg = ["--bandwidth", "16M"] if stream else ["--no-background"]
    p = subprocess.run(ENGINE + ["--strategy", strategy, *bg], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"soak: the engine failed: {p.stderr.strip()[-300:]}")
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    return {"start": lines[0], "summary": lines[-1]}, {lines[0]["pid"]}


def check_engine(c: Checker, label: str, strategy: str, stream: bool, out: dict, th: dict, uf: dict,
                 races: dict) -> None:
    s, pid = out["summary"], out["start"]["pid"]
    c.same(f"{label} messages read", sum(v["msgs_read"] for (p, _), v in uf.items() if p == pid),
           sum(r["msgs"] for r in s["reader_threads"]), races)
    c.same(f"{label} pages installed", sum(v["pages_installed"] for (p, _), v in uf.items() if p == pid),
           s["pages_total"], races)
    for v in s["per_vcpu"]:
        got = th.get((pid, v["tid"]), {"faults": 0, "faults_no_read": 0})
        if strategy == "vcpu-exit" and stream and got["faults"] == v["faults"] - 1:
            c.checks += 1  # the stream ended the run between an exit and its re-entry: that stall stays open
            c.diffs.append(f"explained: {label} vCPU {v['vcpu']} stalls: pctop {got['faults']}, truth "
                           f"{v['faults']} (stopped between its last EFAULT return and the re-entry)")
        elif stream:
            c.same(f"{label} vCPU {v['vcpu']} read stalls", got["faults"] - got["faults_no_read"], v["faults"],
                   races, "missed_wake", "msg_unmatched")
        else:
            c.same(f"{label} vCPU {v['vcpu']} stalls", got["faults"], v["faults"], races, "missed_wake")


def run_program(argv: list[str]) -> dict:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if p.returncode:
        raise SystemExit(f"soak: {argv[0]} failed: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout)


def program_cases(bins: dict[str, str]) -> list[tuple[str, list[str]]]:
    t, s = bins["uffd_toucher"], bins["uffd_scenarios"]
    return [("toucher spin", [t, "-t", "1", "-p", "8192", "-S"]),
            ("toucher delay", [t, "-t", "2", "-p", "512", "-d", "50", "-b", "4"]),
            ("fork", [s, "fork", "-p", "512"]), ("scm", [s, "scm", "-t", "3", "-p", "256"]),
            ("reuse", [s, "reuse", "-p", "200"]), ("samepage", [s, "samepage", "-t", "3", "-p", "48"])]


def check_program(c: Checker, label: str, truth: dict, th: dict, uf: dict, races: dict) -> None:
    pid = truth["pid"]
    if "touchers" in truth:
        for t in truth["touchers"]:
            got = th.get((pid, t["tid"]), {"faults": 0, "faults_no_read": 0})
            c.same(f"{label} thread {t['tid']} stalls", got["faults"], t["faults"], races, "missed_wake")
            c.same(f"{label} thread {t['tid']} read stalls", got["faults"] - got["faults_no_read"], t["faults"],
                   races, "missed_wake")
        hp, fd = truth.get("handler_pid", pid), truth.get("handler_uffd", truth.get("uffd"))
        got = uf.get((hp, fd), {"msgs_read": 0, "read_calls": 0})
        c.same(f"{label} messages read", got["msgs_read"], truth["msgs"], races)
        c.same(f"{label} read calls", got["read_calls"], truth["reads"], races)
    elif "child" in truth:
        got = th.get((truth["child"], truth["child"]), {"faults": 0, "faults_no_read": 0})
        c.same(f"{label} child stalls", got["faults"], truth["child_msgs"], races, "missed_wake")
        u = uf.get((pid, truth["child_uffd"]), {"msgs_read": 0, "read_calls": 0})
        c.same(f"{label} child uffd messages", u["msgs_read"], truth["child_msgs"], races)
        c.same(f"{label} child uffd read calls", u["read_calls"], truth["child_reads"], races)
    elif "reused" in truth:
        for fd in truth["reused"]:
            u = uf.get((pid, fd), {"msgs_read": 0, "read_calls": 0})
            c.same(f"{label} fd {fd} uffd reads", u["read_calls"] + u["msgs_read"], 0, races)
    else:  # samepage
        for i, tid in enumerate(truth["tids"]):
            got = th.get((pid, tid), {"faults": 0, "faults_no_read": 0})
            c.same(f"{label} thread {i} stalls", got["faults"], truth["msgs"], races, "missed_wake")
            if i == 0:  # its message was the one read
                c.same(f"{label} thread 0 read stalls", got["faults"] - got["faults_no_read"], truth["msgs"],
                       races, "missed_wake")
            else:
                c.same(f"{label} thread {i} unread stalls", got["faults_no_read"], truth["msgs"], races,
                       "missed_wake")


def build(tmp: str) -> dict[str, str]:
    gcc = shutil.which("gcc")
    if not gcc:
        raise SystemExit("soak: gcc is needed to build tests/programs/*.c")
    out = {}
    for name in ("uffd_toucher", "uffd_scenarios"):
        out[name] = os.path.join(tmp, name)
        subprocess.run([gcc, "-O2", "-pthread", "-o", out[name], os.path.join(ROOT, "tests", "programs", name + ".c")],
                       check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4, help="runs of each case, per hog setting")
    ap.add_argument("--hog", default="both", choices=["both", "on", "off"])
    ap.add_argument("--cases", default="all", choices=["all", "engine", "programs"])
    a = ap.parse_args()
    if a.runs < 1:
        raise SystemExit("soak: --runs must be at least 1")
    why = ebpf_unavailable_reason()
    if why:
        raise SystemExit(f"soak: eBPF unavailable: {why}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}", file=sys.stderr)
    c = Checker()
    hogs = {"both": (False, True), "on": (True,), "off": (False,)}[a.hog]
    engine_cases = [(st, stream) for st in ("uffd", "sharded", "vcpu-exit") for stream in (False, True)]
    runs = 0
    with tempfile.TemporaryDirectory(prefix="pctop-soak-") as tmp:
        bins = build(tmp)
        cases = ([("engine", ec) for ec in engine_cases] if a.cases in ("all", "engine") else []) + \
                ([("program", pc) for pc in program_cases(bins)] if a.cases in ("all", "programs") else [])
        total = len(cases) * a.runs * len(hogs)
        mon = Monitor()
        hog = None
        try:
            for with_hog in hogs:
                if with_hog:
                    hog = subprocess.Popen(["taskset", "-c", "1", "sh", "-c", "while :; do :; done"])
                for r in range(a.runs):
                    for kind, case in cases:
                        runs += 1
                        first, before = len(mon.samples), mon.debug()
                        if kind == "engine":
                            label = f"{case[0]} stream {'on' if case[1] else 'off'}{' +hog' if with_hog else ''}"
                            out, pids = run_engine(*case)
                        else:
                            label = case[0] + (" +hog" if with_hog else "")
                            out = run_program(case[1])
                            pids = {out["pid"]} | {out[k] for k in ("child", "handler_pid") if k in out}
                        last = mon.settle()
                        after = mon.debug()
                        races = {k: after[k] - before[k] for k in after}
                        th, uf = sums(mon.samples[first:last], pids)
                        if kind == "engine":
                            check_engine(c, label, case[0], case[1], out, th, uf, races)
                        else:
                            check_program(c, label, out, th, uf, races)
                        print(f"[{runs}/{total}] {label}: {c.unexplained} unexplained so far", file=sys.stderr,
                              flush=True)
                if hog is not None:
                    hog.kill()
                    hog.wait()
                    hog = None
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            mon.close()
    for d in c.diffs:
        print(d)
    print(f"{runs} runs, {c.checks} counts compared, {len(c.diffs)} differences, {c.unexplained} unexplained")
    return 1 if c.unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
