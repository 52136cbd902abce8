"""The eBPF source: per-thread uffd stalls and KVM_RUN exits, per-uffd handler
activity, from the tracepoint-only probes in probes/pctop.bpf.c.

The probes aggregate in the kernel, keyed by an epoch number that user space
flips once per interval: `collect()` flips it, then reads and deletes every
entry of the previous epoch, so each Reading holds exactly one interval's
deltas and no event is lost between the read and the clear (an event that
races the flip lands in the next interval instead).

Which processes are followed is a kernel map: the pids given (and add_pid),
plus, in follow_all mode, any process that calls userfaultfd(),
USERFAULTFD_IOC_NEW or a uffd/KVM ioctl, adopted in the kernel from that very
call; and any process whose uffd ioctl woke a followed thread (a separate
handler, Firecracker-style), so its per-uffd counters are shown too.
For a process that set things up before pctop started, its uffd fds, vCPU fds
and uffd-registered ranges are read from /proc and written into the maps.

What the numbers mean (ThreadFaults, one interval, one thread):
- faults: uffd stalls (the thread left its CPU inside a fault and a uffd ioctl
  woke it), plus vCPU-exit faults (KVM_RUN returned EFAULT with exit_reason
  39, or 0 where the kernel fills no memory_fault data, and was re-entered).
- stall_ns: fault start (or the sleep, when no fault event is visible) to
  running again; vCPU-exit faults: KVM_RUN return to re-entry.
- queued_ns / service_ns: fault to handler read / read to wake-up, for faults
  whose message was read; runq_ns: wake-up to running, for every uffd stall.
  So stall - queued - service - runq is the wait of faults never read
  (faults_no_read: the background stream installed the page first).
- exits: KVM_RUN returns by name ("io", "mmio", "shutdown", ...; an errno
  wins: "efault", "eintr"); memory_fault_exits is the subset above.
With page_map=True (`--page-ranges`) the probes also OR one bit per installed
page into per-uffd bitmask words (probes/pctop_state.c page_map_mark), drained
here each interval into UffdCounters.installed_ranges (pctop.sources.pagemap),
with TargetInfo.registered_ranges from the probes' range map. Measured cost
here (bpf_stats, 2026-11-25): about 85 ns more per 4 KiB install (425 -> 510 ns),
about 2 us more per 2 MiB install (1.0 -> 3.0 us; the COPY itself takes ~500 us).
Identities (how): "kvm_create_vcpu", "kvm_vcpu_fd" (vCPU fd seeded from /proc,
thread from its KVM_RUN), "debugfs", "thread_name" (see identity.py). Every
reading lists all known identities of the followed processes.

Known limits: a handler process's reads before its first uffd ioctl are not
parsed when it got the uffd from another process (fork, SCM_RIGHTS) and was
not followed yet; without UFFD_FEATURE_THREAD_ID a read is matched to its
fault by page address, and for vCPU faults with no host address (VMX,
PVM native guests) by the first page of the COPY that resolves it.

How bcc gets the kernel's types (own headers, BTF, stand-in headers) is
picked, and the probes loaded, in pctop/probe_build.py; start() keeps the way in
built_with and says it in the first reading's events.

Importing this module does not import bcc; start() does.
Smoke tool: `python -m pctop.sources.ebpf --help`.
"""

from __future__ import annotations

import ctypes as ct
import os
import time
from pathlib import Path

from pctop import hostcheck, probe_build
from pctop.fdinfo import UFFD_LINK
from pctop.hostpaths import DEFAULT, HostPaths
from pctop.sources import identity, pagemap
from pctop.sources.probe_defs import DEFS, PROBE_DIR, slots_named
from pctop.sources.procfs import read_comm
from pctop.sources.readings import HIST_BUCKETS, Reading, TargetInfo, ThreadFaults, UffdCounters, VcpuIdentity
from pctop.sources.tracepoints import OPTIONAL_MACROS

# Joined in this order into one program text (bcc rewrites map calls only in its main file).
PROBE_PARTS = ("pctop_defs.h", "pctop_state.c", "pctop.bpf.c", "pctop_handler.c", "pctop_fds.c",
               "pctop_kvm.c")

# From probes/pctop_defs.h, the one place they are written (pctop.sources.probe_defs);
# -1 where the header is missing (ebpf_unavailable_reason then says so).
CFG_FOLLOW_ALL, CFG_EPOCH, CFG_PAGE_MAP, CFG_FOLLOW_COMM = (DEFS.get(f"CFG_{n}", -1) for n in (
    "FOLLOW_ALL", "EPOCH", "PAGE_MAP", "FOLLOW_COMM"))
TARGET_GIVEN, TARGET_HANDLER = DEFS.get("TARGET_GIVEN", -1), DEFS.get("TARGET_HANDLER", -1)
HOW_VCPU_FD = DEFS.get("HOW_VCPU_FD", -1)
HOW_NAMES = {DEFS.get("HOW_CREATE_VCPU", -1): "kvm_create_vcpu", HOW_VCPU_FD: "kvm_vcpu_fd",
             DEFS.get("HOW_KVM_EXIT", -1): "kvm_exit"}
MAX_RANGES, HINT_SLOTS = DEFS.get("MAX_RANGES", -1), DEFS.get("HINT_SLOTS", -1)
UFFD_FD_SLOTS, UFFD_FD_SLOT_SHIFT = DEFS.get("UFFD_FD_SLOTS", -1), DEFS.get("UFFD_FD_SLOT_SHIFT", -1)
TARGET_SLOT_GONE = DEFS.get("TARGET_SLOT_GONE", -1)
COMM_LEN = 16  # TASK_COMM_LEN: the kernel keeps 15 bytes of a name
DEBUG_COUNTERS = slots_named("DBG_")  # dbg array slots, by name
FALLBACK_IDENTITY_TTL_S = 5.0
# A program that read the old epoch just before the flip may still be adding to one of
# its entries, or making one, when collect() takes them: a stall then comes two intervals
# late (its entry is taken when that epoch comes round again) or not at all (added to an
# entry already deleted). Programs run for microseconds; this wait before the take lets
# them finish.
EPOCH_GRACE_S = 0.002

# include/uapi/linux/kvm.h KVM_EXIT_*; index = exit_reason.
KVM_EXIT_NAMES = (
    "unknown", "exception", "io", "hypercall", "debug", "hlt", "mmio", "irq_window_open",
    "shutdown", "fail_entry", "intr", "set_tpr", "tpr_access", "s390_sieic", "s390_reset", "dcr",
    "nmi", "internal_error", "osi", "papr_hcall", "s390_ucontrol", "watchdog", "s390_tsch", "epr",
    "system_event", "s390_stsi", "ioapic_eoi", "hyperv", "arm_nisv", "x86_rdmsr", "x86_wrmsr",
    "dirty_ring_full", "ap_reset_hold", "x86_bus_lock", "xen", "riscv_sbi", "riscv_csr", "notify",
    "loongarch_iocsr", "memory_fault", "tdx", "arm_sea",
)
ERRNO_NAMES = {4: "eintr", 11: "eagain", 14: "efault", 7: "e2big", 22: "einval", 5: "eio"}


def _u64(v) -> int:
    """A u64 map value: batch reads give ints, single reads c_ulonglong."""
    return v if isinstance(v, int) else v.value


class EbpfUnavailable(RuntimeError):
    """The probes cannot run here; the message says why, in one line."""


def exit_name(code: int) -> str:
    """A KVM_RUN return as the probes encode it (errno << 16 | exit_reason) -> "mmio", "efault", ..."""
    err, reason = code >> 16, code & 0xFFFF
    if err:
        return ERRNO_NAMES.get(err, f"errno_{err}")
    return KVM_EXIT_NAMES[reason] if reason < len(KVM_EXIT_NAMES) else f"exit_{reason}"


def tracepoint_exists(tp: str, paths: HostPaths = DEFAULT) -> bool:
    cat, name = tp.split(":", 1)
    return os.path.exists(os.path.join(paths.tracefs, "events", cat, name, "id"))


def ebpf_unavailable_reason(paths: HostPaths = DEFAULT) -> str | None:
    """Why the probes cannot run here (one line with the fix), or None. Cheap: no bcc import."""
    checks = (hostcheck.check_privilege, hostcheck.check_bcc, hostcheck.check_tracefs, hostcheck.check_probe_build)
    for check in checks:
        r = check(paths)
        if r.failed:
            return f"{r.name}: {r.detail}" + (f" (fix: {r.fix})" if r.fix else "")
    for r in hostcheck.check_tracepoints(paths):
        if r.failed:
            return f"{r.name}: {r.detail}"
    missing = [p for p in PROBE_PARTS if not (PROBE_DIR / p).is_file()]
    if missing:
        return f"probe source {PROBE_DIR / missing[0]} is missing (set PCTOP_PROBES to its folder)"
    return None


def probe_text() -> str:
    """The probe program as one text; #line keeps compiler messages pointing at the real files."""
    return "".join(f'#line 1 "{PROBE_DIR / p}"\n' + (PROBE_DIR / p).read_text() for p in PROBE_PARTS)


def probe_cflags(paths: HostPaths = DEFAULT) -> list[str]:
    """-D flags enabling the optional probes whose tracepoints exist on this kernel."""
    return [f"-D{macro}" for tp, macro in OPTIONAL_MACROS.items() if tracepoint_exists(tp, paths)]


class EbpfSource:
    """Source protocol (pctop.sources.readings.Source) over the eBPF probes."""

    name = "ebpf"

    def __init__(self, pids: list[int] | None = None, follow_all: bool = False, *,
                 page_map: bool = False, comm: str | None = None, reads_at_exit: bool | None = None,
                 paths: HostPaths = DEFAULT) -> None:
        """comm: also follow every process that execs with this name, from its exec.
        reads_at_exit: read read()'s arguments from its exit's saved registers (None: where
        the kernel can, probe_build.task_pt_regs_usable); False keeps the sys_enter_read probe."""
        self.paths = paths
        self.follow_all = follow_all
        self.comm = comm
        # Record which pages every install covered (one map update per install): opt-in.
        self.page_map = page_map
        self._initial = list(pids or ())
        self._bpf = None
        self._epoch = 0
        self._known: dict[int, int] = {}  # followed pid -> flags, as of the last collect
        self._vcpus_seen: set[tuple[int, int]] = set()
        self._fallback: dict[int, tuple[float, dict[int, tuple[int, str]]]] = {}
        self._events: list[str] = []
        self.startup_s: float | None = None  # compile + load + attach, measured by start()
        self.built_with: probe_build.Way | None = None  # how start() got the kernel's types
        self.reads_at_exit = reads_at_exit  # start() sets what it used
        self.attached: tuple[str, ...] = ()

    # ---- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        reason = ebpf_unavailable_reason(self.paths)
        if reason:
            raise EbpfUnavailable(reason)
        from bcc import BPF  # the one place bcc is imported

        t0 = time.monotonic()
        cflags = probe_cflags(self.paths)
        if self.reads_at_exit is None:
            self.reads_at_exit = probe_build.task_pt_regs_usable(self.paths)
        try:
            built = probe_build.load(BPF, probe_text(), cflags + [probe_build.TASK_PT_REGS]
                                     if self.reads_at_exit else cflags, self.paths)
        except probe_build.BuildError as e:
            raise EbpfUnavailable(str(e)) from None
        self._bpf, self.built_with, self.reads_at_exit = built.bpf, built.way, built.reads_at_exit
        self._events.extend(built.events)
        parser = self._bpf.load_func(b"parse_uffd_msgs", BPF.TRACEPOINT)
        self._bpf[b"msg_parser"][ct.c_int(0)] = ct.c_int(parser.fd)
        self.startup_s = time.monotonic() - t0
        self.attached = tuple(sorted(f.decode() if isinstance(f, bytes) else f
                                     for f in self._bpf.tracepoint_fds))
        self._set_config(CFG_FOLLOW_ALL, int(self.follow_all))
        self._set_config(CFG_EPOCH, self._epoch)
        self._set_config(CFG_PAGE_MAP, int(self.page_map))
        if self.comm:
            t = self._table("comm_filter")
            leaf = t.Leaf()
            leaf.c = self.comm.encode()[:COMM_LEN - 1]  # a c_char array takes bytes, NUL-padded
            t[t.Key(0)] = leaf
            self._set_config(CFG_FOLLOW_COMM, 1)
        for pid in self._initial:
            self.add_pid(pid)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def add_pid(self, pid: int) -> None:
        """Follow one more process; what it set up already is read from /proc."""
        slots = self._table("target_slots")  # before `targets`: a followed pid's slot is never 0
        s = slots.Key(pid & (HINT_SLOTS - 1))
        if slots[s].value == 0:
            slots[s] = slots.Leaf(pid)
        targets = self._table("targets")
        k = targets.Key(pid)
        flags = (targets[k].value if k in targets else 0) | TARGET_GIVEN
        targets[k] = targets.Leaf(flags)
        if pid not in self._known:
            self._seed(pid)
            self._known[pid] = flags

    # ---- one interval -----------------------------------------------------------------------

    def collect(self) -> Reading:
        old = self._epoch
        self._epoch ^= 1
        self._set_config(CFG_EPOCH, self._epoch)
        time.sleep(EPOCH_GRACE_S)
        stats = self._take("stats", old)
        exits = self._take("exits", old)
        ufs = self._take("ufstats", old)
        installed = self._take_page_map(old) if self.page_map else {}

        exit_counts: dict[tuple[int, int], dict[str, int]] = {}
        for k, v in exits:
            per = exit_counts.setdefault((k.tgid, k.tid), {})
            name = exit_name(k.code)
            per[name] = per.get(name, 0) + v.value
        threads = []
        for k, s in stats:
            threads.append(ThreadFaults(
                pid=s.tgid, tid=k.tid, faults=s.faults, stall_ns=s.stall_ns, queued_ns=s.queued_ns,
                service_ns=s.service_ns, runq_ns=s.runq_ns, faults_no_read=s.faults_no_read,
                max_ns=s.max_ns, hist=tuple(s.hist[i] for i in range(HIST_BUCKETS)),
                exits=exit_counts.pop((s.tgid, k.tid), {}), memory_fault_exits=s.memory_fault_exits))
        for (pid, tid), ex in exit_counts.items():  # exits but no stall this interval
            threads.append(ThreadFaults(pid, tid, 0, 0, 0, 0, 0, 0, 0, (0,) * HIST_BUCKETS, exits=ex))
        pm = (lambda key: installed.pop(key, ())) if self.page_map else (lambda key: None)
        serves = self._serves()  # before a gone pid's entries are dropped
        uffds = [UffdCounters(pid=k.tgid, fd=k.fd, msgs_read=v.msgs_read, read_calls=v.read_calls,
                              copies=v.copies, zeropages=v.zeropages, continues=v.continues,
                              wakes=v.wakes, pages_installed=v.pages_installed,
                              bytes_installed=v.bytes_installed, eexist=v.eexist,
                              installed_ranges=pm((k.tgid, k.fd)), page_map_lost=v.page_map_lost,
                              serves_pid=serves.get((k.tgid, k.fd)))
                 for k, v in ufs]
        # pages whose install raced the epoch flip: counted last interval, mapped in this one
        uffds += [UffdCounters(pid=pid, fd=fd, installed_ranges=runs) for (pid, fd), runs in installed.items()]

        kernel_ids = self._kernel_identities()  # before a gone pid's entries are dropped
        comms = self._kernel_comms()
        served: dict[int, set[int]] = {}
        for (pid, _fd), to in serves.items():
            served.setdefault(pid, set()).add(to)
        gone = self._refresh_targets()
        self._prune_uffd_fds()
        targets = tuple(TargetInfo(pid=pid, comm=read_comm(self.paths, pid) or comms.get(pid, ""),
                                   registered_ranges=self._registered(pid) if self.page_map else None,
                                   serves=tuple(sorted(served.get(pid, ()))))
                        for pid in sorted(set(self._known) | set(gone)))
        idents = self._identities(kernel_ids, gone)
        events, self._events = tuple(self._events), []
        return Reading(source=self.name, threads=tuple(sorted(threads, key=lambda t: (t.pid, t.tid))),
                       uffds=tuple(uffds), identities=idents, targets=targets, gone=tuple(gone),
                       events=events)

    # ---- diagnostics ------------------------------------------------------------------------

    def debug_counters(self) -> dict[str, int]:
        """Cumulative counts of the probes' own judgement calls (see DBG_* in the C)."""
        t = self._table("dbg")  # per CPU
        return {name: t.sum(t.Key(i)).value for i, name in enumerate(DEBUG_COUNTERS)}

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """program name -> (run_cnt, run_time_ns), from /proc/self/fdinfo of each program fd.
        The kernel counts only while sysctl kernel.bpf_stats_enabled=1."""
        out = {}
        for name, fn in self._bpf.funcs.items():
            info = {}
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        key, _, val = line.partition(":")
                        info[key.strip()] = val.strip()
            except OSError:
                continue
            label = name.decode() if isinstance(name, bytes) else name
            out[label] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
        return out

    # ---- internals --------------------------------------------------------------------------

    def _table(self, name: str):
        if self._bpf is None:
            raise EbpfUnavailable("EbpfSource used before start()")
        return self._bpf[name.encode()]

    def _set_config(self, slot: int, value: int) -> None:
        t = self._table("config")
        t[t.Key(slot)] = t.Leaf(value)

    def _take(self, name: str, epoch: int) -> list:
        """Read and delete every entry of `epoch` (the other epoch is being written)."""
        t = self._table(name)
        out = []
        for k, v in t.items():
            if k.epoch == epoch:
                out.append((k, v))
                try:
                    del t[k]
                except KeyError:
                    pass
        return out

    def _take_batch(self, name: str, epoch: int) -> list:
        """_take with the kernel's batch map operations: one syscall to read the map, one to
        delete the old epoch's keys, instead of two per entry (the page map can hold
        thousands of words per interval: 165 ms per 4096 entries one by one here)."""
        t = self._table(name)
        try:
            out = [(k, v) for k, v in t.items_lookup_batch() if k.epoch == epoch]
        except Exception:  # no batch operations in this kernel (< 5.6) or in this bcc
            return self._take(name, epoch)
        try:
            if out:
                t.items_delete_batch((t.Key * len(out))(*(k for k, _ in out)))
        except Exception:  # what was read is kept; delete what is left one by one
            for k, _ in out:
                try:
                    del t[k]
                except KeyError:
                    pass
        return out

    def _take_page_map(self, epoch: int) -> dict[tuple[int, int], pagemap.Runs]:
        """(pid, uffd fd) -> the pages installed in `epoch`, as coalesced runs."""
        words: dict[tuple[int, int], dict[int, int]] = {}
        spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for k, v in self._take_batch("page_map", epoch):
            per = words.setdefault((k.tgid, k.fd), {})
            per[k.word] = per.get(k.word, 0) | _u64(v)
        for k, v in self._take("page_spans", epoch):
            spans.setdefault((k.tgid, k.fd), []).append((k.start, _u64(v)))
        return {key: pagemap.coalesce(words.get(key, {}), spans.get(key, ()))
                for key in set(words) | set(spans)}

    def _registered(self, pid: int) -> tuple[tuple[int, int], ...]:
        """The pid's uffd-registered ranges as the probes keep them: each UFFDIO_REGISTER
        exactly as called (ranges registered before pctop came from /proc, merged when adjacent)."""
        t = self._table("ranges")
        k = t.Key(pid)
        if k not in t:
            return ()
        rs = t[k]
        return tuple(sorted((rs.r[i].start, (rs.r[i].end - rs.r[i].start) >> pagemap.PAGE_SHIFT)
                            for i in range(min(rs.n, MAX_RANGES)) if rs.r[i].end > rs.r[i].start))

    def _seed(self, pid: int) -> None:
        """Write what a running process set up before we watched into the maps."""
        uffds, vcpu_fds = identity.target_fds(self.paths, pid)
        t = self._table("uffd_fds")
        for fd in uffds:
            t[t.Key(pid, fd)] = t.Leaf(1)
        if uffds:
            hint = self._table("uffd_tgid_hint")
            hint[hint.Key(pid & (HINT_SLOTS - 1))] = hint.Leaf(1)
        t = self._table("vcpu_fds")
        for fd, vcpu in vcpu_fds.items():
            k = t.Key(pid, fd)
            if k not in t:  # a KVM_CREATE_VCPU the probes saw is worth more
                t[k] = t.Leaf(vcpu, HOW_VCPU_FD)
        spans = identity.uffd_ranges(self.paths, pid)
        if spans:
            self._merge_ranges(pid, spans)

    def _merge_ranges(self, pid: int, spans: list[tuple[int, int]]) -> None:
        t = self._table("ranges")
        k = t.Key(pid)
        have: list[tuple[int, int]] = []
        overflow = event_fork = 0
        if k in t:
            cur = t[k]
            overflow, event_fork = cur.overflow, cur.event_fork
            have = [(cur.r[i].start, cur.r[i].end) for i in range(min(cur.n, MAX_RANGES))
                    if cur.r[i].start != cur.r[i].end]
        merged = sorted(set(have) | set(spans))
        leaf = t.Leaf()
        if len(merged) > MAX_RANGES:
            overflow = 1
        for i, (lo, hi) in enumerate(merged[:MAX_RANGES]):
            leaf.r[i].start, leaf.r[i].end = lo, hi
        leaf.n = min(len(merged), MAX_RANGES)
        leaf.overflow = overflow
        leaf.event_fork = event_fork
        t[k] = leaf

    def _refresh_targets(self) -> list[int]:
        """Learn pids the kernel adopted; forget (and report) those that exited."""
        now_known = {k.value: v.value for k, v in self._table("targets").items()}
        for pid, flags in now_known.items():
            if pid not in self._known:
                why = ("resolved a followed thread's fault (a uffd handler)" if flags & TARGET_HANDLER
                       else "uses userfaultfd or KVM")
                self._events.append(f"following pid {pid} ({read_comm(self.paths, pid) or '?'}): {why}")
                self._seed(pid)
        self._known = now_known
        gone = [pid for pid in self._known if not os.path.exists(self.paths.proc_path(pid))]
        for pid in gone:
            self._forget(pid)
        return gone

    def _prune_uffd_fds(self) -> None:
        """Drop fds that are no longer a uffd (closed, or the number reused): reads on a
        reused number would otherwise be parsed as uffd messages."""
        t = self._table("uffd_fds")
        for k, _ in t.items():
            try:
                link = os.readlink(self.paths.proc_path(k.tgid, "fd", k.fd))
            except OSError:
                link = None
            if link != UFFD_LINK:
                try:
                    del t[k]
                except KeyError:
                    pass
                self._uncache_uffd(k.tgid, k.fd)

    def _uncache_uffd(self, tgid: int, fd: int) -> None:
        """Clear the probes' cached copy of a forgotten uffd (uffd_fd_slots, pctop_state.c)."""
        slots = self._table("uffd_fd_slots")
        k = slots.Key(((tgid << UFFD_FD_SLOT_SHIFT) + fd) & (UFFD_FD_SLOTS - 1))
        if slots[k].value == (tgid << 32) | (fd & 0xFFFFFFFF):
            slots[k] = slots.Leaf(0)

    def _forget(self, pid: int) -> None:
        self._known.pop(pid, None)
        self._fallback.pop(pid, None)
        for name in ("targets", "ranges", "comms"):
            t = self._table(name)
            try:
                del t[t.Key(pid)]
            except KeyError:
                pass
        slots = self._table("target_slots")  # the probes' cache of `targets` (pctop_state.c)
        k = slots.Key(pid & (HINT_SLOTS - 1))
        if slots[k].value == pid:
            slots[k] = slots.Leaf(TARGET_SLOT_GONE)  # never 0: another followed pid may share it
        for name in ("vcpu_fds", "vcpus", "serves"):  # uffd_fds: _prune_uffd_fds
            t = self._table(name)
            for k, v in t.items():
                if (getattr(k, "tgid", None) if name != "vcpus" else v.tgid) == pid:
                    try:
                        del t[k]
                    except KeyError:
                        pass
        self._vcpus_seen = {x for x in self._vcpus_seen if x[0] != pid}

    def _serves(self) -> dict[tuple[int, int], int]:
        """(handler pid, uffd fd) -> the pid whose faults that uffd resolves (another process)."""
        return {(k.tgid, k.fd): v.value for k, v in self._table("serves").items()}

    def _kernel_comms(self) -> dict[int, str]:
        """Names the probes took when they adopted a process (they outlive its /proc entry)."""
        return {k.value: bytes(v.c).split(b"\0", 1)[0].decode(errors="replace")
                for k, v in self._table("comms").items()}

    def _kernel_identities(self) -> dict[int, dict[int, tuple[int, str]]]:
        """pid -> {tid: (vCPU index, how)} as the probes learned them (KVM_CREATE_VCPU/fd + KVM_RUN)."""
        kernel: dict[int, dict[int, tuple[int, str]]] = {}
        t = self._table("vcpus")
        for k, v in t.items():
            how = HOW_NAMES.get(v.how, "kvm_create_vcpu")
            kernel.setdefault(v.tgid, {})[k.value] = (v.vcpu, how)
            if (v.tgid, k.value) not in self._vcpus_seen:
                self._vcpus_seen.add((v.tgid, k.value))
                self._events.append(f"pid {v.tgid}: vCPU {v.vcpu} is thread {k.value} ({how})")
            if not os.path.exists(self.paths.proc_path(v.tgid, "task", k.value)):
                # reported this once more for its last faults; now free its vCPU
                # index for a new thread (vCPU re-creation, pid reuse)
                self._vcpus_seen.discard((v.tgid, k.value))
                try:
                    del t[k]
                except KeyError:
                    pass
        return kernel

    def _identities(self, kernel: dict[int, dict[int, tuple[int, str]]],
                    gone: list[int]) -> tuple[VcpuIdentity, ...]:
        """Every followed process's vCPU threads; debugfs/names complete what the probes
        did not see (re-read every FALLBACK_IDENTITY_TTL_S). A pid that exited this
        interval keeps what the probes knew, for its last faults."""
        out: list[VcpuIdentity] = []
        now = time.monotonic()
        for pid in sorted(self._known):
            cached = self._fallback.get(pid)
            if cached is None or now - cached[0] > FALLBACK_IDENTITY_TTL_S:
                cached = (now, identity.fallback_vcpus(self.paths, pid))
                self._fallback[pid] = cached
            out.extend(identity.merge_identities(pid, kernel.get(pid, {}), cached[1]))
        for pid in gone:
            out.extend(identity.merge_identities(pid, kernel.get(pid, {})))
        return tuple(out)


# ---- a smoke tool for the probes (the public command is `pctop monitor --json`) -------------

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def _reading_json(r: Reading, debug: dict[str, int]) -> dict:
    return {"threads": [t._asdict() for t in r.threads], "uffds": [u._asdict() for u in r.uffds],
            "identities": [i._asdict() for i in r.identities], "gone": list(r.gone),
            "events": list(r.events), "debug": debug}


def main(argv: list[str] | None = None) -> int:
    """python -m pctop.sources.ebpf [-p PID]... [-i S] [-n N] [--prog-stats] [--page-map] [-- COMMAND...]

    One JSON line per interval with what the probes saw. With a COMMAND, runs
    it and stops after the interval in which it exits. --prog-stats turns on
    kernel.bpf_stats_enabled meanwhile and prints each probe's runs and ns/run.
    """
    import argparse
    import json
    import subprocess
    import sys

    ap = argparse.ArgumentParser(prog="python -m pctop.sources.ebpf", description=main.__doc__.split("\n")[2])
    ap.add_argument("-p", "--pid", type=int, action="append", default=[], help="follow this pid (default: all)")
    ap.add_argument("-i", "--interval", type=float, default=1.0, help="seconds per reading")
    ap.add_argument("-n", "--count", type=int, default=0, help="stop after N readings (0: never)")
    ap.add_argument("--prog-stats", action="store_true", help="measure each probe's cost")
    ap.add_argument("--page-map", action="store_true", help="record which pages were installed")
    ap.add_argument("command", nargs="*", help="run this (after --) and stop when it exits")
    a = ap.parse_args(argv)
    if a.interval <= 0 or a.count < 0:
        ap.error("--interval must be > 0 and --count >= 0")
    why = ebpf_unavailable_reason()
    if why:
        print(f"ebpf: {why}", file=sys.stderr)
        return 1
    src = EbpfSource(a.pid or None, follow_all=not a.pid, page_map=a.page_map)
    child = None
    stats_before = None
    try:
        src.start()
        print(json.dumps({"startup_s": round(src.startup_s or 0, 3), "attached": src.attached,
                          "built_with": src.built_with.name if src.built_with else None}), flush=True)
        if a.prog_stats:
            stats_before = Path(BPF_STATS_SYSCTL).read_text().strip()
            Path(BPF_STATS_SYSCTL).write_text("1")
        base = src.prog_stats()
        child = subprocess.Popen(a.command) if a.command else None
        n = 0
        while True:
            try:
                done = child is not None and child.wait(timeout=a.interval) is not None
            except subprocess.TimeoutExpired:
                done = False
            if child is None:
                time.sleep(a.interval)
            print(json.dumps(_reading_json(src.collect(), src.debug_counters())), flush=True)
            n += 1
            if done or (a.count and n >= a.count):
                break
        if a.prog_stats:
            for name, (runs, ns) in sorted(src.prog_stats().items()):
                runs -= base.get(name, (0, 0))[0]
                ns -= base.get(name, (0, 0))[1]
                if runs:
                    print(json.dumps({"prog": name, "runs": runs, "ns_per_run": round(ns / runs)}))
    except KeyboardInterrupt:
        pass
    except Exception as e:  # compile/attach failure: one line, not a traceback
        print(f"ebpf: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        if stats_before is not None:
            Path(BPF_STATS_SYSCTL).write_text(stats_before)
        src.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
