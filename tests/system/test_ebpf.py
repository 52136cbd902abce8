"""The eBPF source against real processes whose own counts are the truth.

tests/programs/uffd_toucher.c (compiled here with gcc) makes toucher threads
fault on pages of a uffd-registered region and resolves them itself, counting
per toucher. The reference engine (pctop.engine) does the same with a real
KVM guest. The probes must see exactly those faults, on those threads.
Every probe test is marked `bpf` and skips, naming the reason, where eBPF
cannot run.
"""

from __future__ import annotations

import ctypes as ct
import json
import subprocess
import sys

import pytest

from pctop.hostpaths import HostPaths
from pctop.sources.ebpf import (
    HINT_SLOTS,
    TARGET_SLOT_GONE,
    EbpfSource,
    ebpf_unavailable_reason,
    exit_name,
    probe_cflags,
)
from pctop.sources.readings import HIST_BUCKETS, Reading, ThreadFaults
from tests.helpers.probes import (
    assert_same_count,
    run_toucher,
    run_toucher_named,
    running_probes,
    threads_of,
    uffd_of,
)

PAGE = 4096


# ---- without eBPF --------------------------------------------------------------------------


def test_exit_codes_are_named_like_kvm():
    assert exit_name(6) == "mmio"
    assert exit_name(2) == "io"
    assert exit_name(39) == "memory_fault"
    assert exit_name(14 << 16) == "efault"
    assert exit_name(4 << 16 | 10) == "eintr"  # an errno wins over a stale exit_reason
    assert exit_name(200) == "exit_200"
    assert exit_name(99 << 16) == "errno_99"


def test_missing_tracefs_is_named_and_optional_probes_are_left_out(tmp_path):
    # A /sys without tracefs cannot be made real on this host: an empty tree stands in.
    paths = HostPaths(sys=str(tmp_path))
    why = ebpf_unavailable_reason(paths)
    assert why is not None and why.split(":")[0] in ("tracefs", "bcc", "privilege")
    assert probe_cflags(paths) == []


# ---- fixtures ------------------------------------------------------------------------------


def check_read_faults(truth: dict, r: Reading, delay_us: int) -> None:
    """Every fault the handler read is one stalled fault of that toucher, with sane times."""
    got = threads_of(r, truth["pid"])
    for t in truth["touchers"]:
        tf = got.get(t["tid"])
        assert tf is not None, f"toucher {t['tid']} not seen; saw {sorted(got)}"
        assert tf.faults == t["faults"]
        assert tf.faults_no_read == 0
        assert sum(tf.hist) == tf.faults
        # each stall held the handler's delay between its read and its COPY ...
        assert tf.service_ns >= tf.faults * delay_us * 1000
        assert tf.max_ns >= delay_us * 1000
        assert sum(tf.hist[: delay_us.bit_length() - 1]) == 0  # no stall shorter than the delay
        # ... and lies inside the toucher's own timing of its touches
        assert tf.stall_ns <= t["touch_ns"]
        # read faults: fault->read, read->wake and wake->run add up to the stall
        assert tf.queued_ns + tf.service_ns + tf.runq_ns == tf.stall_ns
    assert len(got) == len(truth["touchers"])  # the handler thread never stalled


# ---- probes against the C program ----------------------------------------------------------


@pytest.mark.bpf
def test_read_faults_per_thread_with_thread_id(follow_all, toucher):
    truth, r = run_toucher(follow_all, toucher, "-t", "3", "-p", "24", "-d", "200", "-i")
    assert sum(t["faults"] for t in truth["touchers"]) == 72
    check_read_faults(truth, r, 200)
    u = uffd_of(r, truth["pid"], truth["uffd"])
    assert (u.msgs_read, u.read_calls, u.copies) == (truth["msgs"], truth["reads"], truth["copies"])
    assert (u.pages_installed, u.bytes_installed, u.eexist) == (truth["copies"], truth["copies"] * PAGE, 0)
    assert truth["pid"] in r.gone
    assert follow_all.debug_counters()["msg_by_ptid"] >= 72


@pytest.mark.bpf
def test_threads_whose_slot_another_tid_holds_spill_to_the_hash_maps(toucher):
    """Per-thread state and in-flight ioctls and reads live in an array slot per tid (tid mod
    65536); a thread whose slot another live thread holds uses the hash maps instead. Two
    such tids are rare, so every slot is taken here by a tid that cannot exist: all threads
    spill, and the counts must be exactly the same."""
    with running_probes(None, follow_all=True) as src:
        for name in ("tstate_slots", "inflight_slots"):
            table = src._bpf[name]
            foreign = table.Leaf()
            foreign.owner = 1 << 40  # above any tid
            keys = (table.Key * len(table))(*range(len(table)))
            leaves = (table.Leaf * len(table))(*([foreign] * len(table)))
            table.items_update_batch(keys, leaves)
        truth, r = run_toucher(src, toucher, "-t", "2", "-p", "16", "-d", "100", "-b", "4", "-i")
        check_read_faults(truth, r, 100)
        u = uffd_of(r, truth["pid"], truth["uffd"])
        assert (u.msgs_read, u.read_calls, u.copies) == (truth["msgs"], truth["reads"], truth["copies"])
        # the threads went through the hash maps, and gave every in-flight entry back
        spilled = [v.value for v in src._bpf["spilled"].values()]  # [in-flight syscalls, thread states]
        assert spilled[0] == 0 and len(src._bpf["inflight"]) == 0
        assert spilled[1] == len(src._bpf["tstate"])  # threads still alive elsewhere, if any
        for name in ("tstate_slots", "inflight_slots"):
            assert all(v.owner == 1 << 40 for v in src._bpf[name].values())


def _fill(table, value: int) -> None:
    """Every slot of an array map of u64 set to `value`."""
    keys = (table.Key * len(table))(*range(len(table)))
    leaves = (table.Leaf * len(table))(*([table.Leaf(value)] * len(table)))
    table.items_update_batch(keys, leaves)


@pytest.mark.parametrize("held_by", ["another", "gone"])
@pytest.mark.bpf
def test_processes_and_uffds_whose_cache_slot_another_holds_are_found_in_the_hash_maps(toucher, held_by):
    """Followed processes and known uffds are cached in arrays by slot (target_slots by
    tgid, uffd_fd_slots by (tgid, fd)); the hashes stay the truth. Two pids 65536 apart
    share a target slot (and their uffds an fd slot), which no pid_max here allows, so
    every slot is taken here by a value no process has: a slot another pid holds, or one a
    forgotten pid left (TARGET_SLOT_GONE). Every question then goes to the hash maps, and
    the counts must be exactly the same. When the process is gone, its slot is GONE if it
    had taken it, and left alone if another pid holds it."""
    with running_probes(None, follow_all=True) as src:
        foreign = TARGET_SLOT_GONE if held_by == "gone" else (1 << 40) | 7  # no tgid or (tgid, fd) key
        _fill(src._bpf["target_slots"], foreign)
        _fill(src._bpf["uffd_fd_slots"], 1 << 40)
        truth, r = run_toucher(src, toucher, "-t", "2", "-p", "16", "-d", "100", "-b", "4", "-i")
        check_read_faults(truth, r, 100)
        u = uffd_of(r, truth["pid"], truth["uffd"])
        assert (u.msgs_read, u.read_calls, u.copies) == (truth["msgs"], truth["reads"], truth["copies"])
        assert truth["pid"] in r.gone
        assert src._bpf["target_slots"][ct.c_int(truth["pid"] & (HINT_SLOTS - 1))].value == foreign


@pytest.mark.bpf
def test_a_followed_pids_target_slot_is_never_empty(by_pid, toucher):
    """The rule that lets the probes answer "not followed" from an empty slot without the
    hash: a pid named by user space takes its slot before it is a target, and a forgotten
    pid leaves TARGET_SLOT_GONE behind (another followed pid may share the slot), not 0."""
    truth, r = run_toucher_named(by_pid, toucher, "-t", "1", "-p", "8", "-i")
    assert sum(t["faults"] for t in truth["touchers"]) == 8
    assert sum(t.faults for t in threads_of(r, truth["pid"]).values()) == 8
    slots = by_pid._bpf["target_slots"]
    key = ct.c_int(truth["pid"] & (HINT_SLOTS - 1))
    if truth["pid"] not in r.gone:  # exited after this interval's look at /proc
        by_pid.collect()
    assert slots[key].value == TARGET_SLOT_GONE


@pytest.mark.bpf
def test_minor_faults_resolved_with_continue(follow_all, toucher):
    # Shared memory (a memfd) registered for minor faults: the pages are in the page cache,
    # the handler maps each with UFFDIO_CONTINUE, as a VMM with shared guest memory does.
    truth, r = run_toucher(follow_all, toucher, "-t", "2", "-p", "16", "-d", "100", "-b", "4", "-i", "-M")
    assert sum(t["faults"] for t in truth["touchers"]) == 32
    check_read_faults(truth, r, 100)
    u = uffd_of(r, truth["pid"], truth["uffd"])
    assert (u.msgs_read, u.read_calls) == (truth["msgs"], truth["reads"])
    assert (u.continues, u.copies, u.pages_installed, u.bytes_installed) == (32, 0, 32, 32 * PAGE)


@pytest.mark.bpf
def test_read_faults_matched_by_address_on_a_dev_userfaultfd_uffd(follow_all, toucher):
    # No UFFD_FEATURE_THREAD_ID (messages carry no thread), uffd from USERFAULTFD_IOC_NEW.
    before = follow_all.debug_counters()["msg_by_addr"]
    truth, r = run_toucher(follow_all, toucher, "-t", "2", "-p", "16", "-d", "100", "-D")
    check_read_faults(truth, r, 100)
    assert uffd_of(r, truth["pid"], truth["uffd"]).msgs_read == 32
    assert follow_all.debug_counters()["msg_by_addr"] - before >= 32


@pytest.mark.bpf
def test_batched_reads_match_every_message(follow_all, toucher):
    truth, r = run_toucher(follow_all, toucher, "-t", "4", "-p", "12", "-d", "300", "-b", "8", "-i")
    assert truth["reads"] < truth["msgs"], "setup: the handler should have read several messages at once"
    check_read_faults(truth, r, 300)
    assert uffd_of(r, truth["pid"], truth["uffd"]).msgs_read == truth["msgs"] == 48


@pytest.mark.bpf
def test_pages_the_stream_installs_before_any_read(follow_all, toucher):
    # The first 4 pages of each slice are copied before the touchers start (no fault);
    # every other page is copied while its toucher sleeps, and nobody reads the uffd.
    truth, r = run_toucher(follow_all, toucher, "-t", "2", "-p", "16", "-m", "stream", "-P", "4")
    got = threads_of(r, truth["pid"])
    for t in truth["touchers"]:
        tf = got[t["tid"]]
        assert tf.faults == tf.faults_no_read == t["faults"] == 12
        assert tf.queued_ns == tf.service_ns == 0
        assert 0 < tf.runq_ns <= tf.stall_ns <= t["touch_ns"]
    u = uffd_of(r, truth["pid"], truth["uffd"])
    assert (u.msgs_read, u.read_calls, u.copies) == (0, 0, 24 + 8)  # 8 prefill copies


@pytest.mark.bpf
def test_a_process_followed_after_it_registered(by_pid, toucher):
    """pid mode: the target set its uffd up before pctop followed it (seeded from /proc);
    a process nobody named is not reported."""
    truth_other, r_other = run_toucher(by_pid, toucher, "-t", "1", "-p", "8", "-d", "50")
    assert threads_of(r_other, truth_other["pid"]) == {}
    assert not [u for u in r_other.uffds if u.pid == truth_other["pid"]]

    truth, r = run_toucher_named(by_pid, toucher, "-t", "2", "-p", "16", "-d", "100")
    pid = truth["pid"]
    check_read_faults(truth, r, 100)
    assert uffd_of(r, pid, truth["uffd"]).msgs_read == 32  # the seeded uffd fd
    assert pid in r.gone


@pytest.mark.bpf
def test_a_separate_handler_process_is_adopted(by_pid, toucher):
    """Firecracker-style: the uffd is served by another process (here a forked child).
    Only the faulting process is named; the handler is followed from the first
    time it wakes one of its threads. Its first read() comes before any uffd ioctl
    of its own, so that one message cannot be parsed (a known limit): at most one
    fault may count as resolved without a read."""
    truth, r = run_toucher_named(by_pid, toucher, "-t", "2", "-p", "16", "-d", "100", "-f")
    pid, handler = truth["pid"], truth["handler_pid"]
    assert handler != pid
    got = threads_of(r, pid)
    assert {tid: tf.faults for tid, tf in got.items()} == {t["tid"]: t["faults"] for t in truth["touchers"]}
    assert sum(tf.faults_no_read for tf in got.values()) <= 1
    assert threads_of(r, handler) == {}
    u = uffd_of(r, handler, truth["uffd"])
    assert u.copies == truth["copies"] == 32
    assert truth["msgs"] - 1 <= u.msgs_read <= truth["msgs"]
    assert any(f"following pid {handler}" in e and "handler" in e for e in r.events)


# ---- probes against the reference engine (real KVM guest) ------------------------------------

ENGINE_RUN = """
import json, sys
from pctop.engine.run import Engine, EngineConfig
cfg = EngineConfig(memory=8 << 20, vcpus=2, strategy=sys.argv[1], background=False, control="",
                   workload="kvm", pattern="seq", passes=1)
s = Engine(cfg).run()
print(json.dumps({k: s[k] for k in ("ok", "per_vcpu", "reader_threads", "errors")}))
"""


def run_engine(src: EbpfSource, strategy: str) -> tuple[dict, Reading]:
    try:
        from pctop.engine import kvm
        from pctop.engine.run import Engine  # noqa: F401  (is the engine there?)
    except ImportError as e:
        pytest.skip(f"the reference engine is not importable: {e}")
    why = kvm.kvm_unavailable_reason()
    if why:
        pytest.skip(f"no usable /dev/kvm: {why}")
    src.collect()
    p = subprocess.run([sys.executable, "-c", ENGINE_RUN, strategy], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    truth = json.loads(p.stdout)
    assert truth["ok"], truth["errors"]
    return truth, src.collect()


def engine_vcpus(truth: dict, r: Reading) -> tuple[int, list[tuple[dict, ThreadFaults]]]:
    """(engine pid, [(engine's vCPU record, probes' ThreadFaults)]); identities checked on the way."""
    tids = {v["tid"] for v in truth["per_vcpu"]}
    pids = {t.pid for t in r.threads if t.tid in tids}
    assert len(pids) == 1, f"vCPU threads {tids} not seen"
    pid = pids.pop()
    got = threads_of(r, pid)
    ids = {i.tid: i for i in r.identities if i.pid == pid}
    for v in truth["per_vcpu"]:
        assert (ids[v["tid"]].vcpu, ids[v["tid"]].how) == (v["vcpu"], "kvm_create_vcpu")
    return pid, [(v, got[v["tid"]]) for v in truth["per_vcpu"]]


@pytest.mark.bpf
@pytest.mark.kvm
def test_engine_uffd_strategy_faults_per_vcpu(follow_all):
    before = follow_all.debug_counters()["missed_wake"]
    truth, r = run_engine(follow_all, "uffd")
    # a stalled thread switched back in before its uffd wake-up was seen: that fault is dropped
    missed = follow_all.debug_counters()["missed_wake"] - before
    pid, vcpus = engine_vcpus(truth, r)
    assert sum(v["faults"] for v in truth["per_vcpu"]) > 0
    for v, tf in vcpus:
        # background off: the engine read every fault
        assert_same_count(tf.faults, v["faults"], missed, f"vCPU {v['vcpu']} faults")
        assert tf.faults_no_read == 0 and tf.memory_fault_exits == 0
        assert tf.queued_ns + tf.service_ns + tf.runq_ns == tf.stall_ns
    reader_tids = {t["tid"] for t in truth["reader_threads"]}
    assert not reader_tids & set(threads_of(r, pid)), "the uffd reader never stalls on a fault"
    assert sum(u.msgs_read for u in r.uffds if u.pid == pid) == sum(v["faults"] for v in truth["per_vcpu"])


@pytest.mark.bpf
@pytest.mark.kvm
def test_engine_vcpu_exit_strategy_counts_memory_fault_exits(follow_all):
    truth, r = run_engine(follow_all, "vcpu-exit")
    _, vcpus = engine_vcpus(truth, r)
    for v, tf in vcpus:
        # every fault is one KVM_RUN return with EFAULT and one re-entry
        assert tf.memory_fault_exits == tf.faults == tf.exits.get("efault", 0) == v["faults"]
        assert tf.faults_no_read == 0 and tf.queued_ns == tf.service_ns == 0  # not uffd stalls
        assert sum(tf.hist) == tf.faults and len(tf.hist) == HIST_BUCKETS


@pytest.mark.bpf
def test_every_tracepoint_tracefs_has_is_attached(by_pid):
    """Optional KVM probes are compiled in when tracefs has their tracepoint. kvm:kvm_exit
    and kvm:kvm_page_fault never fire under PVM (KVM without VMX/SVM, as here), so on this machine only their
    compiling and attaching can be checked, not what they do on a VMX/SVM host."""
    from pctop.sources.ebpf import tracepoint_exists
    from pctop.sources.tracepoints import OPTIONAL, READ_ENTRY, REQUIRED

    attached = {tp.decode() if isinstance(tp, bytes) else tp for tp in by_pid._bpf.tracepoint_fds}
    expected = set(REQUIRED) | {tp for tp in OPTIONAL if tracepoint_exists(tp)}
    if by_pid.reads_at_exit:  # read()'s arguments come from its exit: one tracepoint per read
        expected.discard(READ_ENTRY)
        assert READ_ENTRY not in attached
    assert expected <= attached, sorted(expected - attached)
