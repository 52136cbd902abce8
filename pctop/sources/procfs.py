"""The procfs source: finds targets and measures what /proc shows without eBPF.

- Targets: processes holding a userfaultfd (`/proc/<pid>/fd/*` links to
  `anon_inode:[userfaultfd]`) or KVM vCPU fds (`anon_inode:kvm-vcpu:N`), or
  the pids / command name the user asked for. Re-checked every interval: a
  QEMU destination opens its uffd only when post-copy starts.
- Queue depth: `pending`/`total` of each uffd's fdinfo are gauges, exact only
  at the instant read, so a background thread samples them at `sample_hz`
  (>= 20 Hz) and each interval reports their mean and max (UffdDepth).
- vCPU identity: debugfs `kvm/<pid>-<vmfd>/vcpuN/pid`, else thread names.
- Handler CPU%: CPU time of the target's threads that are not vCPUs (without
  eBPF nobody can tell which threads read the uffd). When the process has
  fds of more vCPUs than there are identified vCPU threads it is unknown
  (None), because a busy vCPU would be counted as the handler.

Every path goes through one HostPaths (pctop.hostpaths) so tests can point
the source at a fake /proc. Thread CPU times are read from
/proc/<pid>/task/<tid>/stat directly rather than through psutil, whose
/proc root is a process-wide global (the same numbers psutil reads).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

from pctop import rates
from pctop.fdinfo import UFFD_LINK, UffdFdinfo, parse_fdinfo
from pctop.hostpaths import DEFAULT, HostPaths
from pctop.sources.readings import Reading, TargetInfo, UffdDepth, VcpuIdentity

VCPU_LINK_PREFIX = "anon_inode:kvm-vcpu:"
# QEMU "CPU 3/KVM", Firecracker "fc_vcpu 3", Cloud Hypervisor "vcpu3", crosvm "crosvm_vcpu3".
_VCPU_NAMES = (re.compile(r"^CPU (\d+)/KVM$"), re.compile(r"^fc_vcpu ?(\d+)$"),
               re.compile(r"^(?:crosvm_)?vcpu[ _]?(\d+)$", re.IGNORECASE))
# The floor. Each sample wakes a thread on the host being watched, so no faster by
# default: mean and max over 20 samples a second already show a queue building up.
DEFAULT_SAMPLE_HZ = 20.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class TargetNotFound(LookupError):
    """A pid the user named does not exist (message is one line)."""


class ProcFds(NamedTuple):
    uffds: tuple[int, ...]  # fd numbers of userfaultfds
    vcpu_ids: tuple[int, ...]  # vCPU indexes of the kvm-vcpu fds (one fd may be dup'ed, e.g. by mmap)


class ThreadStat(NamedTuple):
    name: str
    cpu_ticks: int  # utime + stime


class _Target(NamedTuple):
    pid: int
    start_ticks: int  # /proc/<pid>/stat starttime: tells a reused pid apart


# ---- reading /proc (all through HostPaths) --------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
        return None


def parse_stat(text: str) -> tuple[str, list[str]]:
    """(comm, fields after comm) of a /proc stat line; comm may hold ') '."""
    head, _, rest = text.rpartition(")")
    return head.partition("(")[2], rest.split()


def read_start_ticks(paths: HostPaths, pid: int) -> int | None:
    text = _read(paths.proc_path(pid, "stat"))
    if text is None:
        return None
    _, f = parse_stat(text)
    return int(f[19]) if len(f) > 19 else None  # field 22, starttime


def read_comm(paths: HostPaths, pid: int) -> str | None:
    text = _read(paths.proc_path(pid, "comm"))
    return None if text is None else text.rstrip("\n")


def qemu_guest_name(argv: list[str]) -> str | None:
    """The guest name of a QEMU command line: `-name guest=NAME,...` or `-name NAME,...`
    (QEMU's own syntax, where `,,` is a literal comma); None without -name."""
    for flag, value in zip(argv, argv[1:]):
        if flag not in ("-name", "--name"):
            continue
        for part in re.split(r"(?<!,),(?!,)", value):
            key, eq, rest = part.partition("=")
            if not eq:
                return part.replace(",,", ",") or None
            if key == "guest":
                return rest.replace(",,", ",") or None
        return None
    return None


def read_vm_name(paths: HostPaths, pid: int) -> str | None:
    """The guest name a VMM was started with, from /proc/PID/cmdline (QEMU's -name)."""
    text = _read(paths.proc_path(pid, "cmdline"))
    return qemu_guest_name(text.split("\0")) if text else None


def scan_fds(paths: HostPaths, pid: int) -> ProcFds | None:
    """The uffds and vCPU fds a process holds; None if it is gone or unreadable."""
    fd_dir = paths.proc_path(pid, "fd")
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    uffds, vcpus = [], set()
    for name in names:
        try:
            link = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue  # closed meanwhile
        if link == UFFD_LINK:
            uffds.append(int(name))
        elif link.startswith(VCPU_LINK_PREFIX) and link[len(VCPU_LINK_PREFIX):].isdigit():
            vcpus.add(int(link[len(VCPU_LINK_PREFIX):]))
    return ProcFds(tuple(sorted(uffds)), tuple(sorted(vcpus)))


def read_threads(paths: HostPaths, pid: int) -> dict[int, ThreadStat]:
    out = {}
    try:
        tids = os.listdir(paths.proc_path(pid, "task"))
    except OSError:
        return out
    for tid in tids:
        text = _read(paths.proc_path(pid, "task", tid, "stat"))
        if text is None:
            continue
        name, f = parse_stat(text)
        if len(f) > 12:
            out[int(tid)] = ThreadStat(name, int(f[11]) + int(f[12]))  # utime, stime
    return out


def vcpu_from_name(name: str) -> int | None:
    for pattern in _VCPU_NAMES:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def debugfs_vcpus(paths: HostPaths, pid: int) -> dict[int, int]:
    """tid -> vCPU index from debugfs `kvm/<pid>-<vmfd>/vcpuN/pid` (empty if not mounted)."""
    root = os.path.join(paths.debugfs, "kvm")
    out = {}
    try:
        vms = [d for d in os.listdir(root) if d.split("-", 1)[0] == str(pid)]
    except OSError:
        return out
    for vm in vms:
        try:
            entries = os.listdir(os.path.join(root, vm))
        except OSError:
            continue
        for e in entries:
            if e.startswith("vcpu") and e[4:].isdigit():
                text = _read(os.path.join(root, vm, e, "pid"))
                if text and text.strip().isdigit() and int(text) > 0:
                    out[int(text)] = int(e[4:])
    return out


def all_pids(paths: HostPaths) -> list[int]:
    try:
        return [int(n) for n in os.listdir(paths.proc) if n.isdigit()]
    except OSError:
        return []


def find_uffd_holders(paths: HostPaths, exclude: Iterable[int] = ()) -> list[int]:
    """Every process holding a userfaultfd or a KVM vCPU fd."""
    skip = set(exclude)
    out = []
    for pid in all_pids(paths):
        if pid in skip:
            continue
        fds = scan_fds(paths, pid)
        if fds and (fds.uffds or fds.vcpu_ids):
            out.append(pid)
    return sorted(out)


def find_by_comm(paths: HostPaths, comm: str, exclude: Iterable[int] = ()) -> list[int]:
    skip = set(exclude)
    return sorted(p for p in all_pids(paths) if p not in skip and read_comm(paths, p) == comm)


# ---- queue-depth sampler ---------------------------------------------------

class DepthSampler:
    """Samples fdinfo pending/total of the watched uffds in its own thread.

    Each fdinfo file stays open and is re-read with pread: a sample is one syscall per uffd,
    not a path walk through /proc plus open and close. The kernel looks the fd number up again
    on every read, so a re-read sees what a fresh open would (a closed fd fails, a reused
    number shows the new file)."""

    # Files held open at most: a host with thousands of uffds (sharded, many VMs) must not run
    # pctop out of fds; past this many, the rest are opened for each sample.
    max_held = 256

    def __init__(self, paths: HostPaths, hz: float = DEFAULT_SAMPLE_HZ) -> None:
        if hz < 20:
            raise ValueError(f"queue depth must be sampled at >= 20 Hz, got {hz}")
        self.paths = paths
        self.period = 1.0 / hz
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()  # the open files: the thread and take() both sample
        self._watch: tuple[tuple[int, int], ...] = ()
        self._files: dict[tuple[int, int], int] = {}  # (pid, fd) -> our fd of its fdinfo
        self._acc: dict[tuple[int, int], list[int]] = {}  # n, sum_p, max_p, sum_t, max_t, max(t - p)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, keys: Iterable[tuple[int, int]]) -> None:
        keys = tuple(sorted(keys))
        with self._lock:
            self._watch = keys
        with self._io_lock:  # an unwatched uffd's file is let go now, not at every sample
            for key in set(self._files) - set(keys):
                self._drop(key)

    def _read(self, key: tuple[int, int]) -> UffdFdinfo | None:
        fd = self._files.get(key)
        held = fd is not None
        try:
            if fd is None:
                fd = os.open(self.paths.proc_path(key[0], "fdinfo", key[1]), os.O_RDONLY | os.O_CLOEXEC)
                held = len(self._files) < self.max_held
                if held:
                    self._files[key] = fd
            try:
                return parse_fdinfo(os.pread(fd, 4096, 0).decode("ascii", "replace"))
            finally:
                if not held:
                    os.close(fd)
        except OSError:  # closed, or the process exited: open afresh next time
            self._drop(key)
        except ValueError:  # a garbled line
            pass
        return None

    def _drop(self, key: tuple[int, int]) -> None:
        fd = self._files.pop(key, None)
        if fd is not None:
            os.close(fd)

    def sample_once(self) -> None:
        got = []
        with self._io_lock:  # first, so watch() cannot drop files between the list and the reads
            with self._lock:
                keys = self._watch
            for key in keys:
                info = self._read(key)
                if info is not None:  # None: gone, or the number now holds something else
                    got.append((key, info.pending, info.total))
        with self._lock:
            for key, pending, total in got:
                a = self._acc.setdefault(key, [0, 0, 0, 0, 0, 0])
                a[0] += 1
                a[1] += pending
                a[2] = max(a[2], pending)
                a[3] += total
                a[4] = max(a[4], total)
                a[5] = max(a[5], total - pending)  # in service: both read at the same instant

    def take(self) -> list[UffdDepth]:
        """Mean/max since the last take; a watched uffd with no sample yet is
        read once now so it is never reported empty."""
        with self._lock:
            missing = [k for k in self._watch if k not in self._acc]
        if missing:
            self.sample_once()
        with self._lock:
            acc, self._acc = self._acc, {}
            watched = set(self._watch)
        return [UffdDepth(pid, fd, rates.mean(a[1], a[0]), a[2], rates.mean(a[3], a[0]), a[4], a[0], a[5])
                for (pid, fd), a in sorted(acc.items()) if (pid, fd) in watched]

    def _run(self) -> None:
        next_due = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_due += self.period
            delay = next_due - time.monotonic()
            if delay < 0:  # fell behind (CPU starved): do not burst to catch up
                next_due = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pctop-uffd-depth", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._io_lock:
            for key in list(self._files):
                self._drop(key)


# ---- the source --------------------------------------------------------------

class ProcfsSource:
    """Target discovery, uffd queue depth, vCPU identity and handler CPU% from /proc."""

    name = "procfs"

    def __init__(self, pids: Iterable[int] = (), comm: str | None = None, *,
                 paths: HostPaths = DEFAULT, sample_hz: float = DEFAULT_SAMPLE_HZ,
                 monotonic=time.monotonic) -> None:
        self.paths = paths
        self.pids = tuple(pids)
        self.comm = comm
        self.follow_all = not self.pids and comm is None
        self._mono = monotonic
        self._targets: dict[int, _Target] = {}
        self._dead: set[int] = set()  # named pids that exited: a reused pid is someone else
        self._hinted: set[int] = set()  # named pids already said to hold nothing to measure
        self._early_notes: list[str] = []
        self._uffds: dict[int, tuple[int, ...]] = {}
        self._vcpus: dict[int, int] = {}  # pid -> how many vCPUs it has fds of, at the last refresh
        self._ticks: dict[int, dict[int, int]] = {}  # pid -> tid -> cpu ticks at last collect
        self._vm_names: dict[int, str | None] = {}  # pid -> guest name, read once (argv does not change)
        self._last = monotonic()
        self._sampler = DepthSampler(paths, sample_hz)

    # -- discovery --
    def _wanted(self) -> list[int]:
        me = (os.getpid(),)
        if self.follow_all:
            return find_uffd_holders(self.paths, exclude=me)
        found = list(self.pids)
        if self.comm is not None:
            found += find_by_comm(self.paths, self.comm, exclude=me)
        return sorted(set(found))

    def check_pids(self) -> None:
        """Raise TargetNotFound for a pid the user named that does not exist."""
        for pid in self.pids:
            if read_start_ticks(self.paths, pid) is None:
                raise TargetNotFound(f"no process with pid {pid}")

    def _refresh(self) -> tuple[list[int], list[str]]:
        """Update the target set; returns (gone pids, event texts)."""
        gone, notes = [], []
        for pid, t in list(self._targets.items()):
            if read_start_ticks(self.paths, pid) != t.start_ticks:
                gone.append(pid)
                if pid in self.pids:
                    self._dead.add(pid)
                del self._targets[pid]
                self._uffds.pop(pid, None)
                self._vcpus.pop(pid, None)
                self._ticks.pop(pid, None)
                self._vm_names.pop(pid, None)
        for pid in self._wanted():
            if pid in self._targets:
                continue
            if pid in self._dead:
                continue
            start = read_start_ticks(self.paths, pid)
            if start is None:
                continue
            self._targets[pid] = _Target(pid, start)
        for pid in list(self._targets):
            fds = scan_fds(self.paths, pid)
            now = fds.uffds if fds else ()
            before = self._uffds.get(pid)
            if before is not None and now != before:
                opened, closed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
                if opened:
                    notes.append(f"pid {pid} opened userfaultfd fd {', '.join(map(str, opened))}")
                if closed:
                    notes.append(f"pid {pid} closed userfaultfd fd {', '.join(map(str, closed))}")
            self._uffds[pid] = now
            self._vcpus[pid] = len(fds.vcpu_ids) if fds else 0
            if pid in self.pids and fds and not now and not fds.vcpu_ids and pid not in self._hinted:
                # Named with -p but nothing to measure: say so once (a wrong pid, or too early).
                self._hinted.add(pid)
                notes.append(f"pid {pid} holds no userfaultfd and no KVM vCPU fd: nothing to measure until "
                             "it opens one (is it the VMM, or its uffd handler?)")
        self._sampler.watch((pid, fd) for pid, fds in self._uffds.items() for fd in fds)
        return gone, notes

    # -- Source protocol --
    def start(self) -> None:
        self.check_pids()
        _, self._early_notes = self._refresh()  # said with the first collect
        for pid in self._targets:
            self._ticks[pid] = {tid: ts.cpu_ticks for tid, ts in read_threads(self.paths, pid).items()}
        self._last = self._mono()
        self._sampler.start()

    def collect(self) -> Reading:
        gone, notes = self._refresh()
        notes, self._early_notes = self._early_notes + notes, []
        mono = self._mono()
        interval = mono - self._last
        self._last = mono
        identities, infos = [], []
        for pid in sorted(self._targets):
            comm = read_comm(self.paths, pid)
            if comm is None:
                continue  # exited this instant; the next refresh reports it gone
            threads = read_threads(self.paths, pid)
            vcpus = self._identify(pid, threads, identities)
            cpu = self._handler_cpu(pid, threads, vcpus, self._vcpus.get(pid, 0), interval)
            if pid not in self._vm_names:
                self._vm_names[pid] = read_vm_name(self.paths, pid)
            infos.append(TargetInfo(pid, comm, cpu, {tid: ts.name for tid, ts in threads.items()},
                                    vm_name=self._vm_names[pid]))
        return Reading(source=self.name, depths=tuple(self._sampler.take()),
                       identities=tuple(identities), targets=tuple(infos), gone=tuple(gone),
                       events=tuple(notes))

    def close(self) -> None:
        self._sampler.close()

    def add_pid(self, pid: int) -> None:
        """Watch one more pid (no-op when discovery already follows everything)."""
        if not self.follow_all and pid not in self.pids:
            self.pids += (pid,)

    # -- helpers --
    def _identify(self, pid: int, threads: dict[int, ThreadStat], out: list[VcpuIdentity]) -> set[int]:
        by_debugfs = debugfs_vcpus(self.paths, pid)
        vcpu_tids = set()
        for tid, ts in threads.items():
            if tid in by_debugfs:
                out.append(VcpuIdentity(pid, tid, by_debugfs[tid], "debugfs"))
            elif (idx := vcpu_from_name(ts.name)) is not None:
                out.append(VcpuIdentity(pid, tid, idx, "thread_name"))
            else:
                continue
            vcpu_tids.add(tid)
        return vcpu_tids

    def _handler_cpu(self, pid: int, threads: dict[int, ThreadStat], vcpu_tids: set[int],
                     n_vcpus: int, interval_s: float) -> float | None:
        prev = self._ticks.get(pid)
        self._ticks[pid] = {tid: ts.cpu_ticks for tid, ts in threads.items()}
        if prev is None or len(vcpu_tids) < n_vcpus:
            return None  # no baseline yet, or vCPU threads we cannot tell apart
        ticks = sum(rates.counter_delta(ts.cpu_ticks, prev.get(tid, 0))
                    for tid, ts in threads.items() if tid not in vcpu_tids)
        return rates.cpu_percent(ticks / _CLK_TCK, interval_s)
