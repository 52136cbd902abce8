"""The composition root's stream stages: Tap, and DemoEnd, which ends `pctop demo`'s
stream on the engine child's exit. The child is a real process; the Samples are
synthetic (pctop.ui.synthetic), standing in for what the aggregator hands on."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from pctop.model import MigrationState
from pctop.root import DemoEnd, Tap, verdict
from pctop.ui.synthetic import synthetic_sample


class Samples:
    """collect() hands out the given Samples in turn; close() is counted."""

    def __init__(self, samples) -> None:
        self.samples, self.closed, self.sources = list(samples), 0, ["engine"]

    def collect(self):
        return self.samples.pop(0)

    def close(self) -> None:
        self.closed += 1


def test_tap_hands_every_sample_to_its_observer_and_passes_the_rest_through():
    seen = []
    inner = Samples([synthetic_sample(seq=1), synthetic_sample(seq=2)])
    tap = Tap(inner, seen.append)
    assert [tap.collect().seq, tap.collect().seq] == [1, 2] and [s.seq for s in seen] == [1, 2]
    tap.close()
    assert inner.closed == 1 and tap.sources == ["engine"]


@pytest.mark.parametrize("code, state, ended", [
    (0, MigrationState.COMPLETED, "demo finished: verified"),
    (3, MigrationState.FAILED, "demo FAILED (exit 3)"),
])
def test_demo_end_shows_the_last_view_once_more_with_the_verdict_then_nothing(tmp_path, code, state, ended):
    out = open(tmp_path / "out", "w+")
    # The engine child: runs until its stdin closes, prints its last lines, exits with `code`.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); "
                              "print('line 1\\nline 2\\n\\nline 3\\nverified: 4/4 pages'); "
                              f"sys.exit({code})"], stdin=subprocess.PIPE, stdout=out)
    try:
        last_run = synthetic_sample(seq=2)
        after = replace(synthetic_sample(seq=3), targets=())  # the engine and its socket are gone
        inner = Samples([synthetic_sample(seq=1), last_run, after, synthetic_sample(seq=4)])
        demo = DemoEnd(inner, child, out)
        assert demo.collect().seq == 1 and demo.collect() is last_run and demo.ended is None
        child.stdin.close()
        child.wait(30)
        final = demo.collect()
        assert demo.ended == ended
        assert (final.seq, final.time) == (after.seq, after.time)
        m, was = final.targets[0].migration, last_run.targets[0].migration
        assert final.targets[0].pid == last_run.targets[0].pid and m.state is state and m.eta_s is None
        assert m.pages_received == (was.pages_total if code == 0 else was.pages_received)
        texts = [e.text for e in final.events]
        assert texts == ["line 2", "line 3", "verified: 4/4 pages", f"{child.pid}: {ended}; q quits"]
        assert demo.collect() is None and demo.collect() is None and len(inner.samples) == 1
        demo.close()
        assert inner.closed == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        out.close()


def test_verdict_names_the_signal_that_ended_the_engine():
    assert verdict(-9) == "demo FAILED (the engine was ended by SIGKILL)"
    assert verdict(-15) == "demo FAILED (the engine was ended by SIGTERM)"
