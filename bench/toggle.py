"""Probes that a benchmark can switch off and on without recompiling them.

bcc's own attach/detach calls on the one loaded object: toggling costs milliseconds,
so off and on windows can alternate tightly (ABBA) and compare like with like.
EmptyProbes is their floor: a program that only returns 0 on each of the same
tracepoints, i.e. what the kernel's tracepoint and BPF machinery costs before any
probe logic runs. No tracepoint-based design can cost less.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def require_ebpf(bench: str) -> None:
    """Exit with one line naming what is missing when the probes cannot load here."""
    from pctop.sources.ebpf import ebpf_unavailable_reason

    why = ebpf_unavailable_reason()
    if why:
        print(f"{bench}: eBPF unavailable: {why}", file=sys.stderr)
        raise SystemExit(1)


def abba_order(r: int) -> tuple[str, str]:
    """The windows of pair r: off-on, on-off, off-on, ... so a drift cancels."""
    return ("off", "on") if r % 2 == 0 else ("on", "off")


def abba_pairs(probes: "ToggledProbes", pairs: int, run: Callable[[], float], label: str = ""
               ) -> list[tuple[float, float]]:
    """`run()` with the probes off and on, in pairs ordered off-on, on-off, ... so a drift
    cancels -> [(off, on)] per pair."""
    out = []
    for r in range(pairs):
        pair = {}
        for kind in abba_order(r):
            probes.set(kind == "on")
            pair[kind] = run()
        out.append((pair["off"], pair["on"]))
        print(f"{label}pair {r}: off {pair['off']:.0f} on {pair['on']:.0f}", file=sys.stderr)
    return out


def _names(tps) -> list[str]:
    return sorted(tp.decode() if isinstance(tp, bytes) else tp for tp in tps)


class ToggledProbes:
    """An EbpfSource (started) whose tracepoints can be detached and attached again."""

    def __init__(self, src) -> None:
        self.src = src
        self._bpf = src._bpf  # a bench reaches into the source to detach its tracepoints
        self.tracepoints = _names(self._bpf.tracepoint_fds)
        self.attached = True

    def set(self, on: bool) -> None:
        if on == self.attached:
            return
        for tp in self.tracepoints:
            cat, event = tp.split(":")
            if on:
                self._bpf.attach_tracepoint(tp=tp, fn_name=f"tracepoint__{cat}__{event}")
            else:
                self._bpf.detach_tracepoint(tp)
        self.attached = on


class EmptyProbes(ToggledProbes):
    """`return 0` on each of `tracepoints` (category:event), loaded detached."""

    def __init__(self, tracepoints: list[str], text: str = "") -> None:
        """text: programs of its own, which take the place of `return 0` on their tracepoints."""
        from bcc import BPF

        for tp in tracepoints:
            probe = "TRACEPOINT_PROBE({}, {})".format(*tp.split(":"))
            if probe not in text:
                text += probe + " { return 0; }\n"
        self._bpf = BPF(text=text.encode())  # bcc attaches TRACEPOINT_PROBEs on load
        self.tracepoints = _names(self._bpf.tracepoint_fds)
        self.attached = True
        self.set(False)

    def close(self) -> None:
        self._bpf.cleanup()


class SkeletonProbes(EmptyProbes):
    """bench/skeleton_probes.c (the least work per fault, #17) where it has a program, and
    `return 0` on the rest of `tracepoints`, so that the same tracepoints fire."""

    def __init__(self, tracepoints: list[str]) -> None:
        probes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "probes")
        with open(os.path.join(probes, "pctop_defs.h")) as f:
            defs = f.read()
        with open(os.path.join(probes, "pctop_state.c")) as f:
            state = f.read()
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "skeleton_probes.c")) as f:
            text = f.read()
        start = state.index("static __always_inline u32 hist_bucket(")
        text = text.replace("HIST_BUCKET_FN", state[start:state.index("\n}\n", start) + 3])
        super().__init__(tracepoints, defs + text)

    def counted(self) -> dict[str, int]:
        """What it followed: stalls ended and resolving ioctls seen, summed over CPUs."""
        done = self._bpf["done"]
        return {name: sum(done[done.Key(i)]) for i, name in enumerate(("stalls", "resolves"))}
