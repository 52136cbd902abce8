"""Issue 5 validation: pctop's numbers against the ground truth of real processes.

The reference engine (`pctop demo --headless --json`, a real KVM guest under
post-copy) prints its own per-vCPU counts in its summary; the probes
(EbpfSource, following every uffd/KVM user) watch the same run, one interval
around it. A plain uffd process written here is watched through `pctop monitor
--json` itself, and so is an engine that was already running when pctop started.

Races that may make a count differ are named, and a count may fall short by at
most those and by at most 0.1 %. Two are counted by the probes' debug counters
(EbpfSource.debug_counters, global over the host): `missed_wake` = a stalled
thread was switched back in before the probes saw the uffd wake-up that resolved
it (that fault is dropped); `msg_unmatched` = the stream's wake-up overtook the
tracepoint of the read() that had taken the fault's message (the fault is filed as
unread). The third is visible in the counts themselves: a vCPU-exit stall ends at
the next KVM_RUN entry, so one the engine stops between an exit and its re-entry
stays open (its EFAULT return is counted, the stall is not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from pctop.hist import bucket_index
from tests.conftest import ROOT
from tests.helpers.probes import assert_same_count, in_one_interval, need_ebpf
from tests.helpers.procs import LineReader, engine_request, killpg

pytestmark = pytest.mark.bpf

STRATEGIES = ("uffd", "sharded", "vcpu-exit")
ENGINE_ARGS = ("--workload", "kvm", "--vcpus", "2", "--memory", "16M", "--pattern", "random", "--control", "")
STREAM_BW = "16M"  # the stream takes ~1 s for 16 MiB: it races the demand faults all along


def _need_kvm() -> None:
    from pctop.engine import kvm

    why = kvm.kvm_unavailable_reason()
    if why:
        pytest.skip(f"no usable /dev/kvm: {why}")


# ---- the engine, run to completion inside one probe interval ------------------------------


@dataclass
class EngineObserved:
    summary: dict  # the engine's own --json summary line
    vcpus: list  # [(engine per_vcpu record, probes' ThreadFaults)]
    uffds: list  # probes' UffdCounters of the engine process
    races: dict  # debug-counter deltas over the run

    def missed(self) -> int:
        return self.races.get("missed_wake", 0)


@pytest.fixture(scope="module")
def engine_run(follow_all):
    """engine_run(strategy, stream, latency_us=0) -> EngineObserved; each run is made once and shared."""
    cache: dict[tuple[str, bool, int], EngineObserved] = {}

    def get(strategy: str, stream: bool, latency_us: int = 0) -> EngineObserved:
        key = (strategy, stream, latency_us)
        if key not in cache:
            cache[key] = _observe(follow_all, strategy, stream, latency_us)
        return cache[key]

    return get


def _observe(probes, strategy: str, stream: bool, latency_us: int) -> EngineObserved:
    _need_kvm()
    bg = ["--bandwidth", STREAM_BW] if stream else ["--no-background"]
    bg += ["--latency", str(latency_us)]
    p, r, races = in_one_interval(probes, lambda: subprocess.run(
        [sys.executable, "-m", "pctop", "demo", "--headless", "--json", "--strategy", strategy, *ENGINE_ARGS, *bg],
        capture_output=True, text=True, timeout=120, cwd=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    start, *_, summary = (json.loads(line) for line in p.stdout.splitlines())
    assert summary["type"] == "summary" and summary["ok"], summary.get("errors")
    pid = start["pid"]
    threads = {t.tid: t for t in r.threads if t.pid == pid}
    ids = {i.tid: i for i in r.identities if i.pid == pid}
    vcpus = []
    for v in summary["per_vcpu"]:
        assert v["tid"] in threads, f"vCPU {v['vcpu']} (thread {v['tid']}) not seen; saw {sorted(threads)}"
        assert (ids[v["tid"]].vcpu, ids[v["tid"]].how) == (v["vcpu"], "kvm_create_vcpu")
        vcpus.append((v, threads[v["tid"]]))
    return EngineObserved(summary, vcpus, [u for u in r.uffds if u.pid == pid], races)


@pytest.mark.kvm
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stream_off_stalled_faults_per_vcpu_equal_the_engines(engine_run, strategy):
    """Stream off: every first touch is a demand fault the engine itself resolves
    (read from the uffd, or a KVM_RUN EFAULT return in vcpu-exit)."""
    o = engine_run(strategy, False)
    assert o.summary["faults_total"] >= 2000 and o.summary["pages_background"] <= o.summary["pages_total"]
    for v, tf in o.vcpus:
        assert v["faults"] > 0
        assert_same_count(tf.faults, v["faults"], o.missed(), f"vCPU {v['vcpu']} faults")
        assert tf.faults_no_read == 0  # nothing else installs pages while the guest runs
        assert sum(tf.hist) == tf.faults
        if strategy == "vcpu-exit":
            assert tf.memory_fault_exits == tf.faults == tf.exits.get("efault", 0)
            assert tf.queued_ns == tf.service_ns == tf.runq_ns == 0
        else:
            assert tf.memory_fault_exits == 0
            assert tf.queued_ns + tf.service_ns + tf.runq_ns == tf.stall_ns
    msgs = sum(r["msgs"] for r in o.summary["reader_threads"])
    assert sum(u.msgs_read for u in o.uffds) == msgs == (0 if strategy == "vcpu-exit" else o.summary["faults_total"])
    # read() calls: the engine's count of those that returned messages, plus one empty
    # read per reader when it is told to stop (the engine counts no empty read)
    empty_reads = sum(u.read_calls for u in o.uffds) - sum(r["reads"] for r in o.summary["reader_threads"])
    assert 0 <= empty_reads <= len(o.summary["reader_threads"])
    installed = o.summary["pages_demand"] + o.summary["pages_background"]
    assert sum(u.pages_installed for u in o.uffds) == installed == o.summary["pages_total"]


def tails(hist) -> list[int]:
    """tails(h)[b] = stalls in bucket b or above."""
    out, acc = [0] * len(hist), 0
    for b in range(len(hist) - 1, -1, -1):
        acc += hist[b]
        out[b] = acc
    return out


def assert_nested(inner, outer, slack: int, what: str) -> None:
    """Stall for stall, each `inner` span lies inside its `outer` span, so at every log2
    bucket edge no more inner stalls than outer ones reach it. `slack`: inner stalls that
    have no outer partner (counted races). A stall cut short or stretched by a lost or
    misattributed event moves across an edge the other clock does not, and fails this;
    no host's per-fault cost enters it."""
    for b, (i, o) in enumerate(zip(tails(inner), tails(outer))):
        assert i <= o + slack, (f"{what}: {i} stalls >= {2 ** b} us inside, only {o} outside "
                                f"(slack {slack}); inner {list(inner)}, outer {list(outer)}")


def check_nesting(o: EngineObserved, strategy: str) -> None:
    """pctop's per-vCPU stalls against the engine's own clocks of the same stalls, which
    nest, per fault, with no constant of this host in between (docs/engine-control.md):
      handler (uffd / sharded): the engine's reader returned from read() -> the COPY that
        installed the page was called: inside the stall whatever the host costs;
      exit (vcpu-exit): C code reading CLOCK_MONOTONIC right after KVM_RUN returned EFAULT
        and right before the next KVM_RUN ("stall_clock": "native"): inside pctop's span
        (its syscall-exit tracepoint -> the next sys_enter_ioctl);
      guest: the guest's TSC around each first touch of a page, the whole time the vCPU
        waited, hypervisor exit and re-entry included: around pctop's span.
    So handler|exit <= pctop <= guest holds for the sums and, stall for stall, at every
    bucket edge of the three histograms (assert_nested). How far apart they are is a
    property of the host (the nested PVM hypervisor's reload, KVM_RUN's return path):
    bench/accuracy.py measures it. The guest's count of slow first touches must be the
    engine's fault count (stream off: every first touch waits), less the one a stopped
    vCPU may leave unfinished."""
    if o.summary["stall_clock"] != "native":
        pytest.skip("the engine could not build its native clock helper (no C compiler): "
                    "no TSC rate for the guest's clock, KVM_RUN timed in Python")
    for v, tf in o.vcpus:
        label, n = f"vCPU {v['vcpu']} ({v['faults']} faults)", tf.faults
        assert_same_count(n, v["faults"], o.missed(), f"{label} faults")
        guest, pctop = v["guest_stall_ns"], tf.stall_ns
        assert v["faults"] - 1 <= v["guest_stalls"] <= v["faults"], f"{label}: {v['guest_stalls']} slow first touches"
        assert 0 < pctop <= guest, f"{label}: pctop {pctop} ns outside the guest's {guest} ns"
        assert v["guest_hist"] is not None and sum(v["guest_hist"]) == v["guest_stalls"]
        assert_nested(tf.hist, v["guest_hist"], max(0, n - v["guest_stalls"]), f"{label}: pctop in guest")
        if strategy == "vcpu-exit":
            exits = v["exit_stall_ns"]
            assert v["faults"] - 1 <= v["exit_stalls"] <= v["faults"]
            assert sum(v["exit_hist"]) == v["exit_stalls"]
            assert 0 < exits <= pctop, f"{label}: the engine's exit stalls {exits} ns outside pctop's {pctop} ns"
            assert_nested(v["exit_hist"], tf.hist, max(0, v["exit_stalls"] - n), f"{label}: exit in pctop")
        else:
            assert (v["exit_stalls"], v["exit_stall_ns"]) == (0, 0)
            assert v["handler_stalls"] == v["faults"], f"{label}: every fault installed by a read"
            assert_nested(v["handler_hist"], tf.hist, max(0, v["handler_stalls"] - n), f"{label}: handler in pctop")


@pytest.mark.kvm
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stream_off_stalls_nest_between_the_engines_clocks(engine_run, strategy):
    check_nesting(engine_run(strategy, False), strategy)


# A link's round trip for the source's demand replies: stalls of ~1.2 ms, as a real
# migration link with page transfer gives, instead of loopback's 70-170 us.
LINK_LATENCY_US = 1000


@pytest.mark.kvm
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stream_off_stalls_over_a_link_with_a_round_trip(engine_run, strategy):
    """Stalls of real link length: the same nesting, and no stall shorter than the
    link's round trip (each waited for a reply sent LINK_LATENCY_US late), so none was
    cut short by an event pctop took for its end. The engine's own inner clock says which
    waited less: a vCPU that faults on a page whose reply another vCPU's fault already
    awaits waits only for the rest of it (seen twice in 2048 faults with a CPU hog); pctop
    may show no more of them than that clock. How close pctop comes to the engine's clocks
    at this length ("within 5 %") depends on the host: bench/accuracy.py."""
    o = engine_run(strategy, False, LINK_LATENCY_US)
    check_nesting(o, strategy)
    floor = bucket_index(LINK_LATENCY_US)
    for v, tf in o.vcpus:
        inner = v["exit_hist"] if strategy == "vcpu-exit" else v["handler_hist"]
        short = sum(inner) - tails(inner)[floor]  # the engine's own stalls below the link
        assert tf.faults > 0 and short <= tf.faults // 100, f"vCPU {v['vcpu']}: the engine's clock: {inner}"
        assert tf.faults - tails(tf.hist)[floor] <= short, f"vCPU {v['vcpu']}: stalls below the link: {tf.hist}"


@pytest.mark.kvm
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stream_on_reads_installs_and_stalls_equal_the_engines(engine_run, strategy):
    """Stream on: messages read and pages installed are the engine's counts, and each
    vCPU's stalled faults = the faults the engine read for it + those pctop saw woken
    by the stream before any read (faults_no_read). A fault the engine read whose page
    the stream had installed meanwhile is a read fault for both."""
    o = engine_run(strategy, True)
    s = o.summary
    assert s["pages_background"] > 0 and s["faults_total"] > 0, "setup: the stream and the guest both worked"
    msgs = sum(r["msgs"] for r in s["reader_threads"])
    assert sum(u.msgs_read for u in o.uffds) == msgs
    # The engine counts only read() calls that returned messages. pctop also counts the
    # empty ones: a fault the stream resolved between the reader's poll() and its read()
    # (that fault is then one of faults_no_read), and each reader's last read at shutdown.
    empty_reads = sum(u.read_calls for u in o.uffds) - sum(r["reads"] for r in s["reader_threads"])
    assert 0 <= empty_reads <= sum(tf.faults_no_read for _, tf in o.vcpus) + len(s["reader_threads"])
    assert sum(u.pages_installed for u in o.uffds) == s["pages_demand"] + s["pages_background"] == s["pages_total"]
    for v, tf in o.vcpus:
        label = f"vCPU {v['vcpu']}"
        if strategy == "vcpu-exit":  # a vCPU never sleeps on a page: nothing is woken
            assert tf.faults_no_read == 0
            # every KVM_RUN EFAULT return is one fault the engine resolved ...
            assert tf.memory_fault_exits == tf.exits.get("efault", 0) == v["faults"]
            # ... but a stall ends at the next KVM_RUN entry: when the stream completes the
            # run, the engine may stop a vCPU between its last exit and that entry, which
            # leaves that one fault open (not counted)
            assert v["faults"] - 1 <= tf.faults <= v["faults"], f"{label}: {tf.faults} vs {v['faults']}"
        else:
            # the stream's wake-up can overtake the tracepoint of the read() that took the
            # message: pctop then files that fault as unread (msg_unmatched counts those)
            races = o.missed() + o.races.get("msg_unmatched", 0)
            assert_same_count(tf.faults - tf.faults_no_read, v["faults"], races, f"{label} read faults")
            assert tf.faults >= v["faults"] - o.missed()
            assert tf.queued_ns + tf.service_ns + tf.runq_ns <= tf.stall_ns


# ---- a plain uffd process (no KVM), watched by `pctop monitor --json` ----------------------

PLAIN_UFFD = r"""
import ctypes, json, sys, threading, time
from pctop.engine.uffd import AnonMemory, Uffd

N, M, HOLD_S = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
PAGE = 4096
uffd = Uffd(nonblock=True, thread_id=True)
mem = AnonMemory(N * M * PAGE)
uffd.register(mem.addr, N * M * PAGE)
src = ctypes.create_string_buffer(b"\x5a" * PAGE)
go = threading.Event()
tids = [0] * N

def toucher(i):
    tids[i] = threading.get_native_id()
    go.wait()
    for p in range(M):  # a foreign call: faults without holding the GIL
        ctypes.memset(mem.addr + (i * M + p) * PAGE, 1, 1)

threads = [threading.Thread(target=toucher, args=(i,)) for i in range(N)]
for t in threads:
    t.start()
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
go.set()
time.sleep(HOLD_S)  # the deliberately slow handler: every toucher's first fault waits unread
faults = {}
msgs = reads = copies = 0
while any(t.is_alive() for t in threads) or uffd.wait(0):
    if not uffd.wait(0.05):
        continue
    batch = uffd.read_faults()
    reads += 1
    for m in batch:
        msgs += 1
        faults[m.ptid] = faults.get(m.ptid, 0) + 1
        uffd.copy(m.address & ~(PAGE - 1), ctypes.addressof(src), PAGE)
        copies += 1
print(json.dumps({"tids": tids, "faults": faults, "msgs": msgs, "reads": reads, "copies": copies,
                  "uffd": uffd.fd}), flush=True)
sys.stdin.readline()
"""


def test_plain_uffd_process_counts_and_queue_depth():
    """N threads of a process written here fault on M pages each; its handler sleeps
    HOLD_S before its first read, so the uffd queue holds exactly N faults meanwhile.
    pctop must count each thread's faults as the handler did, and show that queue."""
    need_ebpf()
    n, m, hold_s = 3, 20, 1.0
    prog = subprocess.Popen([sys.executable, "-c", PLAIN_UFFD, str(n), str(m), str(hold_s)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    mon = None
    try:
        out = LineReader(prog.stdout)
        out.wait_for(lambda ls: ls)
        mon = subprocess.Popen([sys.executable, "-m", "pctop", "monitor", "--json", "--interval", "0.2",
                                "-p", str(prog.pid)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
        samples = LineReader(mon.stdout)
        samples.wait_for(lambda ls: len(ls) >= 2, 60)  # header + a first sample: probes attached
        prog.stdin.write("go\n")
        prog.stdin.flush()
        truth = json.loads(out.wait_for(lambda ls: len(ls) >= 2)[1])
        k = len(samples.lines)
        lines = samples.wait_for(lambda ls: len(ls) >= k + 2)  # the last faults' interval is in
    finally:
        for p in (mon, prog):
            if p is not None:
                killpg(p)
    header, *rest = (json.loads(line) for line in lines)
    assert header["probe_tier"] == "ebpf"
    targets = [t for s in rest for t in s["targets"] if t["pid"] == prog.pid]
    rows = [v for t in targets for v in t["vcpus"]]
    depth = [u for t in targets for u in t["uffds"] if u["fd"] == truth["uffd"]]

    assert sum(truth["faults"].values()) == n * m == truth["msgs"] == truth["copies"]
    for tid in truth["tids"]:
        mine = [v for v in rows if v["tid"] == tid]
        assert sum(v["faults"] for v in mine) == truth["faults"][str(tid)] == m
        assert sum(v["faults_no_read"] for v in mine) == 0
        # its first fault sat unread in the queue for the hold, less the moments the
        # thread took to reach it after go.set() (a GIL hand-over; 1.5 ms was seen)
        assert sum(v["parts"]["queued_ns"] for v in mine) >= 0.9 * hold_s * 1e9
    assert sum(u["msgs_read"] for u in depth) == truth["msgs"]
    assert sum(u["read_calls"] for u in depth) == truth["reads"]
    assert sum(u["pages_installed"] for u in depth) == truth["copies"]
    # the queue depth gauges: N faults pending (unread) and in total while the handler slept
    assert max(u["pending_max"] for u in depth) == n
    assert max(u["total_max"] for u in depth) == n


# ---- attach: `pctop monitor -p` on an engine run that started before it --------------------


@pytest.mark.kvm
@pytest.mark.parametrize("strategy, how", [("uffd", "debugfs"), ("vcpu-exit", "kvm_vcpu_fd")])
def test_attach_to_a_running_engine_identifies_its_vcpus(tmp_path, strategy, how):
    """The engine's vCPUs were created before pctop started, so the probes never saw
    KVM_CREATE_VCPU. In uffd mode a vCPU stays blocked inside KVM_RUN (no entry to
    see): debugfs vcpuN/pid names it. In vcpu-exit mode each fault re-enters KVM_RUN
    on a vCPU fd whose index /proc gave: "kvm_vcpu_fd". The engine's control socket
    lives outside /run/pctop, so pctop does not learn identities from the engine."""
    need_ebpf()
    _need_kvm()
    sock = str(tmp_path / "engine.sock")
    eng = subprocess.Popen([sys.executable, "-m", "pctop", "demo", "--headless", "--json", "--strategy", strategy,
                            "--workload", "kvm", "--vcpus", "2", "--memory", "2G", "--pattern", "random",
                            "--bandwidth", "1M", "--duration", "60", "--control", sock],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        pid = json.loads(eng.stdout.readline())["pid"]
        deadline = time.monotonic() + 30
        while True:
            st = os.path.exists(sock) and engine_request(sock, "status", timeout=10)
            if st and st["faults_total"] > 0 and all(v["tid"] for v in st["per_vcpu"]):
                break
            assert time.monotonic() < deadline and eng.poll() is None, "the engine never got going"
            time.sleep(0.1)
        mon = subprocess.run([sys.executable, "-m", "pctop", "monitor", "--json", "--count", "3",
                              "--interval", "0.5", "-p", str(pid)], cwd=ROOT, capture_output=True, text=True,
                             timeout=90)
        if eng.poll() is None:
            after = engine_request(sock, "status", timeout=10)
        else:  # it finished meanwhile (a slow machine): its summary has the same counters
            after = json.loads(eng.stdout.read().splitlines()[-1])
    finally:
        killpg(eng)
    assert mon.returncode == 0, mon.stderr
    header, *samples = (json.loads(line) for line in mon.stdout.splitlines())
    assert header["probe_tier"] == "ebpf" and len(samples) == 3
    tids = {v["tid"]: v["vcpu"] for v in after["per_vcpu"]}
    during = {v["vcpu"]: v["faults"] - b["faults"] for v, b in zip(after["per_vcpu"], st["per_vcpu"])}
    (t,) = [t for t in samples[-1]["targets"] if t["pid"] == pid]
    rows = {v["tid"]: v for v in t["vcpus"] if v["tid"] in tids}
    assert {tid: (r["vcpu"], r["identity"]) for tid, r in rows.items()} == {tid: (i, how) for tid, i in tids.items()}
    for tid, vcpu in tids.items():
        seen = sum(v["faults"] for s in samples for t in s["targets"] if t["pid"] == pid
                   for v in t["vcpus"] if v["tid"] == tid)
        assert 0 < seen <= during[vcpu], f"vCPU {vcpu}: pctop saw {seen}, engine counted {during[vcpu]}"


# ---- the last interval of a vCPU thread that exits (seen by hand in monitor --json) -------


def test_a_vcpu_that_exits_keeps_its_index_in_the_row_of_its_last_faults():
    """When the engine stops its guest, the vCPU threads exit within the interval whose
    faults the probes still report; procfs no longer lists them. That row must still say
    which vCPU it was (it said vcpu None, identity unknown), and the thread is gone after."""
    from pctop.sources.readings import Reading, TargetInfo, ThreadFaults, VcpuIdentity
    from pctop.stats import Memory, build_sample, merge_readings

    def sample(readings, memory):
        return build_sample(merge_readings(readings), memory, now=1.0, interval_s=1.0, seq=1,
                            probe_tier="ebpf", sources=("ebpf", "procfs"))

    m = Memory()
    ident = VcpuIdentity(10, 11, 0, "kvm_create_vcpu")
    names = {10: "engine", 11: "CPU 0/KVM"}
    sample([Reading("ebpf", identities=(ident,)), Reading("procfs", targets=(TargetInfo(10, "engine", thread_names=names),))], m)
    last = ThreadFaults(10, 11, 5, 500_000, 0, 0, 0, 0, 200_000, (0,) * 24)
    s = sample([Reading("ebpf", threads=(last,), identities=(ident,)),
                Reading("procfs", targets=(TargetInfo(10, "engine", thread_names={10: "engine"}),))], m)
    (row,) = s.targets[0].vcpus
    assert (row.tid, row.vcpu, row.identity, row.name, row.faults) == (11, 0, "kvm_create_vcpu", "CPU 0/KVM", 5)
    s = sample([Reading("procfs", targets=(TargetInfo(10, "engine", thread_names={10: "engine"}),))], m)
    assert s.targets[0].vcpus == ()
