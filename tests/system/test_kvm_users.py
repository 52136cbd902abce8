"""The probes against a real KVM vCPU thread stalled on userfaultfd: the reference
engine's guest (pctop/engine/workload.py KvmWorkload, one vCPU touching each page of
its memory once, in order) on memory registered with a uffd in MISSING mode, and a
handler in the test that reads each message and installs the page. The messages the
handler read are the truth: each was a wait of the vCPU thread inside KVM_RUN (a
native guest's fault goes through get_user_pages into handle_userfault; no
page-fault exception fires, see probes/pctop_kvm.c on_kvm_fault).

A kicked page is what QEMU does to a vCPU in a fault when it needs the thread
(SIG_IPI): the signal takes the thread out of handle_userfault after its message
was read, KVM_RUN returns EINTR, the vCPU loop enters KVM_RUN again and the guest's
access faults again on the same page, a second message. Both were waits for the
handler (the uffd_scenarios.c `signal` scenario is the same for a thread faulting
from user space).
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import pytest

from pctop.engine.uffd import AnonMemory, FaultMsg, Uffd
from pctop.engine.workload import KvmWorkload
from tests.helpers.probes import assert_same_count, in_one_interval, threads_of
from tests.helpers.procs import read_wchan, wait_for

pytestmark = [pytest.mark.bpf, pytest.mark.kvm,
              pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                 reason="/dev/kvm is missing or not accessible")]

PAGE = 4096
WAIT_S = 10.0  # any single wait: a guest step takes microseconds, a stuck one fails the test


class GuestRun(NamedTuple):
    pid: int
    tid: int           # the vCPU thread
    msgs: list[FaultMsg]
    kicked: int        # pages whose fault a kick interrupted


def _read_one(uffd: Uffd) -> FaultMsg:
    """One page-fault message (the test reads them one by one: each is a fault to count)."""
    assert uffd.wait(WAIT_S), "no uffd message"
    msgs = uffd.read_faults(1)
    assert len(msgs) == 1, msgs
    return msgs[0]


def run_guest(npages: int, thread_id: bool, kick_every: int) -> GuestRun:
    """Run the one-vCPU guest over `npages` uffd-registered pages to its end, resolving
    each fault; every kick_every-th page (0: none) is kicked once while its vCPU sleeps
    in handle_userfault, and its second message read before the page is installed.
    Everything is torn down before it returns, whatever fails."""
    content = AnonMemory(PAGE)
    ctypes.memset(content.addr, 0x5A, PAGE)
    guest_ram = AnonMemory(npages * PAGE)
    uffd = Uffd(thread_id=thread_id)
    w = None
    try:
        uffd.register(guest_ram.addr, guest_ram.size)
        w = KvmWorkload(guest_ram.addr, guest_ram.size, 1, pattern="seq", passes=1)
        w.start()
        (tid,) = w.vcpu_tids()
        msgs: list[FaultMsg] = []
        kicked = 0
        for i in range(npages):
            first = _read_one(uffd)
            msgs.append(first)
            if kick_every and i % kick_every == 0:
                # only a thread asleep in the fault is taken out of it by the signal
                assert wait_for(lambda: read_wchan(tid) == "handle_userfault", WAIT_S), \
                    f"the vCPU does not sleep in handle_userfault (page {i}): {read_wchan(tid)!r}"
                w.kick(0)
                again = _read_one(uffd)
                msgs.append(again)
                assert (again.address, again.ptid) == (first.address, first.ptid), (first, again)
                kicked += 1
            assert uffd.copy(first.address & ~(PAGE - 1), content.addr, PAGE) == PAGE
        assert w.wait(WAIT_S), f"the guest did not finish: {w.progress()}"
        assert w.progress()[0].touched == npages
        return GuestRun(os.getpid(), tid, msgs, kicked)
    finally:
        if w is not None:
            w.stop()   # kicks a vCPU still in a fault; joins its thread, closes KVM
        uffd.close()
        guest_ram.close()
        content.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kick_every", [0, 2], ids=["plain", "kicked"])
@pytest.mark.parametrize("thread_id", [False, True], ids=["by-address", "thread-id"])
def test_every_uffd_message_a_vcpu_waited_for_is_one_stall(follow_all, thread_id, kick_every):
    """plain: one message per page, each ended by its UFFDIO_COPY. kicked: every other
    page's first wait is ended by a kick (no uffd wake-up reaches it; the thread leaves
    KVM_RUN with EINTR and faults again), and the second by the copy: each message is
    one stall, the interrupted ones ended by end_unwoken (probes/pctop.bpf.c) when the
    vCPU's next fault begins (probes/pctop_kvm.c on_kvm_fault).

    Except by address: such a fault has no address (no exception) and its message no
    thread id, so only a uffd wake-up, whose waker is inside the installing ioctl and
    whose wakee is the thread, ties a message to the vCPU. An interrupted wait has none;
    the kick's wake-up is judged "not uffd" and that wait is not counted (the README's
    "What counts as a stall" says so). Its second wait, on the same page, is."""
    npages = 48
    truth, r, races = in_one_interval(follow_all, lambda: run_guest(npages, thread_id, kick_every))
    want_kicked = -(-npages // kick_every) if kick_every else 0
    assert truth.kicked == want_kicked and len(truth.msgs) == npages + want_kicked
    mine = [m for m in truth.msgs if m.ptid == truth.tid] if thread_id else truth.msgs
    assert len(mine) == len(truth.msgs)   # only the vCPU touches the guest's memory
    tf = threads_of(r, truth.pid).get(truth.tid)
    assert tf is not None, f"the vCPU thread was not seen ({races})"
    unseen = 0 if thread_id else truth.kicked  # the interrupted waits nothing ties to the vCPU
    assert_same_count(tf.faults, len(mine) - unseen, races.get("missed_wake", 0), f"stalls ({tf}, {races})")
    assert races.get("unwoken_end", 0) == truth.kicked - unseen, f"{tf} ({races})"
    assert races.get("not_uffd_wake", 0) >= truth.kicked, races  # each kick's wake-up, seen as no uffd's
    assert tf.faults_no_read == 0 and sum(tf.hist) == tf.faults, f"{tf} ({races})"
    assert tf.queued_ns + tf.service_ns + tf.runq_ns == tf.stall_ns, tf
