"""The probes against uffd users other than the reference engine, each a real C
program in tests/programs whose own counts are the truth: the shapes in which
demand-paging tests, lazy-restore daemons and VMMs use userfaultfd (a spinning
handler, a forking process with UFFD_FEATURE_EVENT_FORK, a uffd handed to a
separate handler process over SCM_RIGHTS, an fd number reused after close,
several threads on one page). Every stall must be counted on the thread that
stalled, from the first fault, and nothing else counted as a uffd's.
"""

from __future__ import annotations

import pytest

from tests.test_ebpf import (assert_same_count, follow_all, run_toucher, threads_of,  # noqa: F401  (fixtures)
                             toucher)

pytestmark = pytest.mark.bpf


def _debug_delta(src, before: dict) -> dict:
    after = src.debug_counters()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize("minor", [False, True], ids=["missing", "minor"])
def test_a_spinning_handler_that_wakes_the_thread_before_it_leaves_its_cpu(follow_all, toucher, minor):
    """A handler that spins on read() takes each message the moment it is queued, so
    its UFFDIO_COPY/CONTINUE often wakes the faulting thread while that thread is still
    on its CPU, before or during its schedule() in handle_userfault. Such a thread either
    never leaves the CPU or leaves it runnable; it waited all the same, and the handler
    counted that fault: every one must be a stall (they were dropped as "never stalled",
    0.2 % of the faults). The debug counters name the path (woken_on_cpu: how often the
    race happened; it is timing-dependent and may be 0 in a run)."""
    before = follow_all.debug_counters()
    truth, r = run_toucher(follow_all, toucher, "-t", "1", "-p", "16384", "-S", *(["-M"] if minor else []))
    races = _debug_delta(follow_all, before)
    (t,) = truth["touchers"]
    tf = threads_of(r, truth["pid"]).get(t["tid"])
    assert tf is not None and t["faults"] == 16384
    assert_same_count(tf.faults, t["faults"], races.get("missed_wake", 0), f"stalls ({races})")
    assert tf.faults_no_read == 0 and sum(tf.hist) == tf.faults
    assert tf.queued_ns + tf.service_ns + tf.runq_ns == tf.stall_ns
    assert tf.stall_ns <= t["touch_ns"]
