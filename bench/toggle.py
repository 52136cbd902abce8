"""Probes that a benchmark can switch off and on without recompiling them.

bcc's own attach/detach calls on the one loaded object: toggling costs milliseconds,
so off and on windows can alternate tightly (ABBA) and compare like with like.
"""

from __future__ import annotations


class ToggledProbes:
    """An EbpfSource (started) whose tracepoints can be detached and attached again."""

    def __init__(self, src) -> None:
        self.src = src
        self._bpf = src._bpf  # a bench reaches into the source to detach its tracepoints
        self._tps = [tp.decode() if isinstance(tp, bytes) else tp for tp in self._bpf.tracepoint_fds]
        self.attached = True

    def set(self, on: bool) -> None:
        if on == self.attached:
            return
        for tp in self._tps:
            cat, event = tp.split(":")
            if on:
                self._bpf.attach_tracepoint(tp=tp, fn_name=f"tracepoint__{cat}__{event}")
            else:
                self._bpf.detach_tracepoint(tp)
        self.attached = on
