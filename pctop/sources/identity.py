"""Which thread is which vCPU, and what a running target already set up.

Trust order for a vCPU index, highest first:
  "kvm_create_vcpu"  the probes saw KVM_CREATE_VCPU return fd F for index N,
                     then KVM_RUN on F from the thread;
  "kvm_vcpu_fd"      the same, for a target already running when pctop
                     started: F's index comes from its /proc/<pid>/fd link
                     (anon_inode:kvm-vcpu:N), the thread from KVM_RUN on F;
  "kvm_exit"         (VMX/SVM) kvm:kvm_exit's vcpu_id on a followed thread;
  "debugfs"          /sys/kernel/debug/kvm/<pid>-<vmfd>/vcpuN/pid;
  "thread_name"      QEMU "CPU n/KVM", Firecracker "fc_vcpu n", Cloud
                     Hypervisor "vcpuN", crosvm "crosvm_vcpuN" / "vcpu N".
A lower source never overrides a higher one, neither for a thread nor for a
vCPU index a higher source already placed on another thread.

It also reads what the probes cannot see for a process that set up its uffd
before pctop started: its uffd fds, its vCPU fds and the address ranges
registered with a uffd (smaps VmFlags "um"/"uw"/"ui").

All paths go through a HostPaths (pctop.hostpaths) so tests can redirect them.
The debugfs and thread-name readers are the procfs source's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from pctop.fdinfo import UFFD_LINK
from pctop.hostpaths import DEFAULT, HostPaths
from pctop.sources.procfs import VCPU_LINK_PREFIX, debugfs_vcpus, read_threads, vcpu_from_name
from pctop.sources.readings import VcpuIdentity

TRUST = ("kvm_create_vcpu", "kvm_vcpu_fd", "kvm_exit", "debugfs", "thread_name")
# smaps VmFlags set on a VMA registered with a userfaultfd: missing, write-protect, minor.
UFFD_VMFLAGS = frozenset({"um", "uw", "ui"})


def _fd_links(paths: HostPaths, pid: int) -> dict[int, str]:
    fd_dir = paths.proc_path(pid, "fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[int(name)] = os.readlink(os.path.join(fd_dir, name))
        except (OSError, ValueError):
            continue  # closed meanwhile
    return out


def target_fds(paths: HostPaths, pid: int) -> tuple[list[int], dict[int, int]]:
    """(uffd fds, {vCPU fd: vCPU index}) a process holds now."""
    uffds, vcpu_fds = [], {}
    for fd, link in _fd_links(paths, pid).items():
        if link == UFFD_LINK:
            uffds.append(fd)
        elif link.startswith(VCPU_LINK_PREFIX) and link[len(VCPU_LINK_PREFIX):].isdigit():
            vcpu_fds[fd] = int(link[len(VCPU_LINK_PREFIX):])
    return sorted(uffds), vcpu_fds


def uffd_ranges(paths: HostPaths, pid: int) -> list[tuple[int, int]]:
    """[start, end) of every mapping registered with a userfaultfd, merged when adjacent."""
    try:
        with open(paths.proc_path(pid, "smaps"), encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # "start-end perms offset dev inode path"
            lo, _, hi = head.partition("-")
            try:
                current = (int(lo, 16), int(hi, 16))
            except ValueError:
                current = None
        elif line.startswith("VmFlags:") and current and UFFD_VMFLAGS & set(line.split()[1:]):
            if out and out[-1][1] == current[0]:
                out[-1] = (out[-1][0], current[1])
            else:
                out.append(current)
    return out


def fallback_vcpus(paths: HostPaths, pid: int,
                   names: Mapping[int, str] | None = None) -> dict[int, tuple[int, str]]:
    """tid -> (vCPU index, how) from debugfs, then thread names, for one process."""
    found: dict[int, tuple[int, str]] = {tid: (v, "debugfs") for tid, v in debugfs_vcpus(paths, pid).items()}
    if names is None:
        names = {tid: st.name for tid, st in read_threads(paths, pid).items()}
    for tid, name in names.items():
        v = vcpu_from_name(name)
        if v is not None and tid not in found:
            found[tid] = (v, "thread_name")
    return found


def merge_identities(pid: int, *sources: Mapping[int, tuple[int, str]],
                     alive: Iterable[int] | None = None) -> tuple[VcpuIdentity, ...]:
    """One identity per thread, the most trusted source winning (see TRUST).

    Each source maps tid -> (vCPU index, how). A vCPU index taken by a more
    trusted source is not given to another thread by a less trusted one (a
    renamed or reused thread must not create a second "vCPU 0"). `alive`, when
    given, drops threads that no longer exist.
    """
    keep = None if alive is None else set(alive)
    candidates = sorted(((TRUST.index(how) if how in TRUST else len(TRUST), tid, vcpu, how)
                         for src in sources for tid, (vcpu, how) in src.items()
                         if keep is None or tid in keep))
    by_tid: dict[int, VcpuIdentity] = {}
    taken: set[int] = set()
    for _, tid, vcpu, how in candidates:
        if tid in by_tid or vcpu in taken:
            continue
        by_tid[tid] = VcpuIdentity(pid=pid, tid=tid, vcpu=vcpu, how=how)
        taken.add(vcpu)
    return tuple(sorted(by_tid.values(), key=lambda i: (i.vcpu, i.tid)))


def identify(pid: int, kernel: Mapping[int, tuple[int, str]],
             paths: HostPaths = DEFAULT) -> tuple[VcpuIdentity, ...]:
    """A process's vCPU threads: what the probes learned, completed from debugfs and names."""
    threads = read_threads(paths, pid)
    names = {tid: st.name for tid, st in threads.items()}
    return merge_identities(pid, kernel, fallback_vcpus(paths, pid, names), alive=names)
