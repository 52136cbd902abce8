"""Demand-fault latency across a network link against injected round-trip time.

    .venv/bin/python bench/latency.py [--seconds 3] [--memory 32M] [--rtts 0,100,1000] [--json]

One run, one machine, as root: two network namespaces joined by a veth pair
(tests/helpers/netns.py); `pctop engine source` in one, `pctop engine dest` in the other,
over TCP. The background stream is off, so every first touch of the 2-vCPU KVM
guest (threads without /dev/kvm) is a demand fault that crosses the link. For each
injected RTT the destination reports exact stall percentiles (fault read from the
uffd -> page installed). The delay is injected with `tc netem` (half the RTT on each
side) where the kernel has netem; where it does not (this project's machines), the
source's own `latency` control adds it to every demand reply, which is the same
thing for a request/reply exchange. Expected shape: stall = RTT + a constant service time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
sys.path.insert(0, ROOT)

from netns import VethLink, can_make_netns  # noqa: E402

PCTOP = [sys.executable, "-m", "pctop"]


def one(link: VethLink, rtt_us: int, netem: bool, seconds: float, memory: str) -> dict:
    if netem:
        for side in "ab":
            subprocess.run(link.prefix(side) + ["tc", "qdisc", "replace", "dev", link.dev[side], "root", "netem",
                                                "delay", f"{rtt_us / 2000:.3f}ms"], check=True)
    src = link.popen("a", PCTOP + ["engine", "source", "--listen", f"{link.addr['a']}:0", "--memory", memory,
                                   "--no-background", "--wait", "30"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                     env=dict(os.environ, PCTOP_ENGINE_TOKEN="bench"))
    try:
        address = json.loads(src.stdout.readline())["address"]
        argv = PCTOP + ["engine", "dest", "--connect", address, "--memory", memory, "--vcpus", "2", "--json",
                        "--pattern", "random", "--write-ratio", "0", "--duration", str(seconds), "--control", "",
                        "--latency", "0" if netem else str(rtt_us)]
        r = subprocess.run(link.prefix("b") + argv, capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env=dict(os.environ, PCTOP_ENGINE_TOKEN="bench"))
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        if not lines or lines[-1].get("type") != "summary":
            raise SystemExit(f"dest failed: {r.stderr.strip()}")
        s = lines[-1]
        return {"rtt_us": rtt_us, "injected_by": "netem" if netem else "engine latency", "ok": s["ok"],
                "faults": s["faults_total"], "p50_us": s["stall_us_p50"], "p99_us": s["stall_us_p99"],
                "workload": s["workload"]}
    finally:
        src.wait(30) if src.poll() is None else None
        if src.poll() is None:
            src.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--memory", default="32M")
    ap.add_argument("--rtts", default="0,100,1000", help="injected RTTs, microseconds")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    why = can_make_netns()
    if why:
        print(f"bench/latency.py: {why}", file=sys.stderr)
        return 2
    rows = []
    with VethLink("L") as link:
        netem = link.netem_available()
        for rtt in (int(x) for x in a.rtts.split(",")):
            rows.append(one(link, rtt, netem, a.seconds, a.memory))
    base = rows[0]["p50_us"] - rows[0]["rtt_us"]
    for r in rows:
        r["p50_minus_rtt_us"] = round(r["p50_us"] - r["rtt_us"], 1)
    if a.json:
        print(json.dumps({"machine": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}))
        return 0
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}; delay injected by {rows[0]['injected_by']}; workload {rows[0]['workload']}")
    print("| injected RTT | faults | stall p50 | stall p99 | p50 - RTT |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rtt_us']} us | {r['faults']} | {r['p50_us']:.0f} us | {r['p99_us']:.0f} us | "
              f"{r['p50_minus_rtt_us']:.0f} us |")
    print(f"constant service time at RTT 0: {base:.0f} us (p50)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
