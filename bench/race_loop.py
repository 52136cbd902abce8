"""Race loop: one run of a tests/programs uffd user many times against one
EbpfSource, each run inside its own interval, every thread's stalls compared with
the program's own count.

    .venv/bin/python bench/race_loop.py [--runs 2000] [--tree DIR] [--program P] [--] [args]

As root. --program uffd_scenarios (default; args default `scm -t 3 -p 128`: a
handler process that got the uffd over a unix socket, ~25 ms a run) or
uffd_toucher (args default `-t 2 -p 256 -m read -S`: a spinning handler); any
run whose JSON lists its `touchers` with their `faults`. A race that drops one
stall in a few hundred runs needs thousands of runs to show: the soak
(bench/soak.py) takes seconds a run, this a few milliseconds. `--tree` loads the probes and collector of another
checkout (e.g. a `git worktree` of an older commit), to compare miss rates side by
side. Prints each short thread with the probes' debug-counter deltas of its run,
then the totals; exit status 1 if any thread came out short beyond the races the
probes named (missed_wake).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARGS = {"uffd_scenarios": ["scm", "-t", "3", "-p", "128"],
                "uffd_toucher": ["-t", "2", "-p", "256", "-m", "read", "-S"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--tree", default=ROOT, help="checkout whose probes and collector to load")
    ap.add_argument("--program", choices=sorted(DEFAULT_ARGS), default="uffd_scenarios")
    ap.add_argument("scenario", nargs="*", help="the program's arguments")
    a = ap.parse_args()
    a.scenario = a.scenario or DEFAULT_ARGS[a.program]
    tree = os.path.abspath(a.tree)
    sys.path.insert(0, tree)
    from pctop.sources.ebpf import EbpfSource, ebpf_unavailable_reason

    why = ebpf_unavailable_reason()
    if why:
        raise SystemExit(f"race_loop: eBPF unavailable: {why}")
    with tempfile.TemporaryDirectory(prefix="pctop-race-") as d:
        prog = os.path.join(d, a.program)
        subprocess.run(["gcc", "-O2", "-pthread", "-o", prog, os.path.join(tree, f"tests/programs/{a.program}.c")],
                       check=True)
        src = EbpfSource(None, follow_all=True)
        src.start()
        short, totals, t0 = 0, {}, time.monotonic()
        try:
            for i in range(a.runs):
                src.collect()
                before = src.debug_counters()
                p = subprocess.run([prog, *a.scenario], capture_output=True, text=True, timeout=60)
                r = src.collect()
                races = {k: v - before[k] for k, v in src.debug_counters().items() if v != before[k]}
                for k, v in races.items():
                    totals[k] = totals.get(k, 0) + v
                if p.returncode != 0:
                    raise SystemExit(f"race_loop: run {i}: {p.stderr.strip()}")
                truth = json.loads(p.stdout)
                got = {t.tid: t.faults for t in r.threads if t.pid == truth["pid"]}
                for t in truth.get("touchers", []):
                    n = got.get(t["tid"], 0)
                    if t["faults"] - n > races.get("missed_wake", 0) or n > t["faults"]:
                        short += 1
                        print(f"run {i}: thread {t['tid']}: {n} of {t['faults']} stalls; {races}", flush=True)
                if (i + 1) % 250 == 0:
                    print(f"... {i + 1}/{a.runs} runs, {short} short, {time.monotonic() - t0:.0f} s",
                          file=sys.stderr, flush=True)
        finally:
            src.close()
    print(f"{tree}: {short} short threads in {a.runs} runs of {a.program} {' '.join(a.scenario)}")
    print(f"debug counters over all runs: {json.dumps(totals, sort_keys=True)}")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
