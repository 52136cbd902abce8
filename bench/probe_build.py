"""How long the probes take to build each way (pctop/probe_build.py), side by side.

Each run is a fresh interpreter that starts an EbpfSource and reports its
startup_s (compile + load + attach); the cases are interleaved so load from
other work hits them alike:
- headers: bcc's own lookup under /lib/modules (own or stand-in headers);
- BTF, warm: the vmlinux.h tree and its trial build already in the cache;
- BTF, cold: an empty cache, so bpftool's dump and the trial build count too.
Needs root, and a host that offers both ways (`pctop doctor` lists them).

    .venv/bin/python bench/probe_build.py [--runs 5]
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

from pctop import probe_build as pb

CHILD = """
import json, os
from pctop.hostpaths import DEFAULT
from pctop import probe_build as pb
from pctop.sources.ebpf import EbpfSource
if os.environ.get("BENCH_WAY") == "headers":  # leave BTF out: bcc looks under /lib/modules itself
    pb.btf_way = lambda paths=DEFAULT: None
src = EbpfSource([])
src.start()
src.close()
print(json.dumps({"startup_s": src.startup_s, "way": src.built_with.name}))
"""


def run(way: str, cache: str) -> tuple[float, str]:
    env = dict(os.environ, BENCH_WAY=way, PCTOP_CACHE=cache)
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"{way}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["startup_s"], out["way"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    names = [w.name for w in pb.ways()]
    if pb.BTF not in names or not {pb.OWN, pb.STAND_IN} & set(names):
        raise SystemExit(f"needs both BTF and headers here; this host offers: {', '.join(names) or 'none'}")
    times: dict[str, list[float]] = {"headers": [], "BTF, warm": [], "BTF, cold": []}
    ways: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="pctop-bench-") as tmp:
        warm = os.path.join(tmp, "warm")
        run("btf", warm)  # fills the warm cache
        for i in range(args.runs):
            cold = os.path.join(tmp, f"cold{i}")
            for case, way, cache in (("headers", "headers", warm), ("BTF, warm", "btf", warm),
                                     ("BTF, cold", "btf", cold)):
                s, ways[case] = run(way, cache)
                times[case].append(s)
            shutil.rmtree(cold)
    print(f"probe build, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, kernel {platform.release()}, median of {args.runs}")
    print("| way | built with | startup_s median (min-max) |")
    print("|---|---|---|")
    for case, ts in times.items():
        print(f"| {case} | {ways[case]} | {statistics.median(ts):.2f} s ({min(ts):.2f}-{max(ts):.2f}) |")


if __name__ == "__main__":
    main()
