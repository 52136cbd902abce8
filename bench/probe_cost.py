"""Probe program time per engine fault (bpf_stats), for several source trees side by side.

    .venv/bin/python bench/probe_cost.py [--tree DIR ...] [--floor] [--skeleton] [--rounds 6] [--strategy uffd] [--json]

As root. Each round runs, for every tree in turn (the order alternates between
rounds, so drift on a shared machine falls on both alike), one measurement in a
fresh process whose imports come from that tree: its EbpfSource follows every
uffd user, kernel.bpf_stats_enabled is on, and that tree's reference engine
migrates a 2-vCPU, 32 MiB guest with the stream off (every first touch is a
demand fault). The figure is the summed run_time_ns of all probe programs over
the engine's faults, and the same per program. Without --tree it compares the
working tree with nothing (one column). To compare with an older commit:
`git worktree add /tmp/old <commit>` and pass `--tree /tmp/old --tree .`.
--floor adds a column measured the same way: a program that only returns 0 on each
tracepoint the first tree's probes attach (bench/toggle.py EmptyProbes), i.e. what the
kernel's tracepoint and BPF machinery (and bpf_stats' own clock reads) cost per engine
fault before any probe logic runs. --skeleton adds bench/skeleton_probes.c on the same
tracepoints: the least work any design does to time each fault (a slot lookup per hit,
the clocks, the user reads, a stall's statistics), with the number of stalls it counted,
so that it is seen to follow every fault. Both load from the first tree's bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"

# Runs inside the tree under test (its own pctop on sys.path): prints one JSON line.
MEASURE = r"""
import json, subprocess, sys
from pctop.sources.ebpf import EbpfSource
strategy, mode = sys.argv[1], (sys.argv[2:] or ["probes"])[0]
src = EbpfSource(None, follow_all=True)
src.start()
if mode != "probes":  # the same tracepoints: their names and fds stand in for the probes'
    sys.path.insert(0, "bench")
    from toggle import EmptyProbes, SkeletonProbes
    tps = [tp.decode() if isinstance(tp, bytes) else tp for tp in src._bpf.tracepoint_fds]
    src.close()
    src = EmptyProbes(tps) if mode == "floor" else SkeletonProbes(tps)
    src.set(True)
    src.prog_stats = lambda: EbpfSource.prog_stats(src)
try:
    if mode == "probes":
        src.collect()
    before = src.prog_stats()
    p = subprocess.run([sys.executable, "-m", "pctop", "demo", "--headless", "--json", "--strategy", strategy,
                        "--workload", "kvm", "--vcpus", "2", "--memory", "32M", "--pattern", "random",
                        "--control", "", "--no-background"], capture_output=True, text=True, timeout=300)
    after = src.prog_stats()
    counted = src.counted() if mode == "skeleton" else None
finally:
    src.close()
if p.returncode:
    sys.exit("the engine failed: " + p.stderr.strip()[-300:])
faults = json.loads(p.stdout.splitlines()[-1])["faults_total"]
per = {k: after[k][1] - before.get(k, (0, 0))[1] for k in after}
hits = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after}
print(json.dumps({"faults": faults, "ns": {k: v for k, v in per.items() if v},
                  "hits": {k: hits[k] for k, v in per.items() if v}, "counted": counted}))
"""


FLOOR = "floor (empty programs)"
SKELETON = "skeleton (least work, bench/skeleton_probes.c)"
MODES = {FLOOR: "floor", SKELETON: "skeleton"}  # columns measured with the first tree's tracepoints


def measure(tree: str, strategy: str, mode: str = "probes") -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("PCTOP_PROBES", None)
    p = subprocess.run([sys.executable, "-c", MEASURE, strategy, mode],
                       capture_output=True, text=True, cwd=tree, env=env, timeout=600)
    if p.returncode:
        raise SystemExit(f"probe_cost: {tree}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="a source tree (repeatable); default: this one")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--strategy", default="uffd", choices=["uffd", "sharded", "vcpu-exit"])
    ap.add_argument("--floor", action="store_true", help="add empty programs on the same tracepoints")
    ap.add_argument("--skeleton", action="store_true",
                    help="add bench/skeleton_probes.c, the least work per fault, on the same tracepoints")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.rounds < 1:
        raise SystemExit("probe_cost: --rounds must be at least 1")
    trees = [os.path.abspath(t) for t in a.tree] or [ROOT]
    for t in trees:
        if not os.path.isfile(os.path.join(t, "pctop", "sources", "ebpf.py")):
            raise SystemExit(f"probe_cost: {t} is not a pctop source tree")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}, strategy {a.strategy}", file=sys.stderr)
    old_stats = open(BPF_STATS).read().strip()
    columns = trees + ([FLOOR] if a.floor else []) + ([SKELETON] if a.skeleton else [])
    results: dict[str, list[dict]] = {t: [] for t in columns}
    try:
        with open(BPF_STATS, "w") as f:
            f.write("1")
        for r in range(a.rounds):
            for t in (columns if r % 2 == 0 else columns[::-1]):
                m = measure(trees[0], a.strategy, MODES[t]) if t in MODES else measure(t, a.strategy)
                results[t].append(m)
                counted = f", it counted {m['counted']}" if m.get("counted") else ""
                print(f"[{r + 1}/{a.rounds}] {t}: {sum(m['ns'].values()) / m['faults']:.0f} ns/fault "
                      f"({m['faults']} faults{counted})", file=sys.stderr, flush=True)
    finally:
        with open(BPF_STATS, "w") as f:
            f.write(old_stats)
    summary = {}
    for t, ms in results.items():
        per_fault = [sum(m["ns"].values()) / m["faults"] for m in ms]
        progs: dict[str, list[float]] = {}
        hits: dict[str, list[float]] = {}
        for m in ms:
            for k, v in m["ns"].items():
                progs.setdefault(k, []).append(v / m["faults"])
                hits.setdefault(k, []).append(m.get("hits", {}).get(k, 0) / m["faults"])
        summary[t] = {"median_ns_per_fault": statistics.median(per_fault), "runs": per_fault,
                      "programs": {k: statistics.median(v) for k, v in sorted(progs.items())},
                      "hits_per_fault": {k: statistics.median(v) for k, v in sorted(hits.items())}}
    if a.json:
        print(json.dumps(summary))
        return
    for t, s in summary.items():
        print(f"{t}: {s['median_ns_per_fault']:.0f} ns per fault (median of {len(s['runs'])}: "
              + ", ".join(f"{x:.0f}" for x in s["runs"]) + ")")
        print(f"    {'program':<40} {'ns/fault':>8} {'hits/fault':>10}")
        for k, v in sorted(s["programs"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:<40} {v:8.0f} {s['hits_per_fault'].get(k, 0):10.2f}")


if __name__ == "__main__":
    main()
