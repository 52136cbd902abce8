"""Start-up time of the light command paths (target: `pctop --help` under 0.3 s).

The unit tests prove these paths import neither Textual nor bcc (the cause of
a slow start); this measures the time itself, side by side with a bare
interpreter start so the figure can be read on a noisy machine.

    .venv/bin/python bench/startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "pctop --help": [sys.executable, "-m", "pctop", "--help"],
    "pctop monitor --help": [sys.executable, "-m", "pctop", "monitor", "--help"],
    "pctop doctor --json": [sys.executable, "-m", "pctop", "doctor", "--json"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.runs):  # interleaved, so load changes hit every case alike
        for name, argv in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            times[name].append(time.perf_counter() - t0)
    print(f"startup, {time.strftime('%Y-%m-%d')}, {platform.node()}, kernel {platform.release()}, "
          f"Python {platform.python_version()}, median of {args.runs}")
    floor = statistics.median(times["python -c pass (floor)"])
    print("| command | median wall time | vs bare interpreter |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| `{name}` | {m * 1000:.0f} ms | {m / floor:.1f}x |")


if __name__ == "__main__":
    main()
