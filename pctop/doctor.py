"""`pctop doctor`: what pctop needs from this host, and how to fix what is missing.

Modelled on kvm_stat's check_access: each check is a small function that
looks at one thing and returns a CheckResult with the exact fix. Checks take
a HostPaths so tests can point them at a missing tree, and the capability
check reads the effective set of the process, so a test can run the doctor
with capabilities really dropped (capsh) instead of mocking them.

The checks of what the probes need (privilege, bcc, probe build, tracefs,
tracepoints) live in pctop.hostcheck, which the eBPF collector uses too; this
module adds KVM, userfaultfd, QEMU and netem, runs them all, and does the fixes.
Nothing here imports bcc or Textual.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import shutil
import subprocess
from typing import Callable, NamedTuple

from pctop import probe_build
from pctop.hostcheck import (  # noqa: F401  (part of the doctor's checks and API)
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    INFO,
    MISSING,
    OK,
    CheckResult,
    _read,
    check_bcc,
    check_debugfs,
    check_kernel,
    check_privilege,
    check_probe_build,
    check_tracefs,
    check_tracepoints,
    effective_caps,
)
from pctop.hostpaths import DEFAULT, HostPaths

# KVM ioctls and capabilities (include/uapi/linux/kvm.h, x86-64).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_SET_USER_MEMORY_REGION2 = 0x40A0AE49  # _IOW(KVMIO, 0x49, 160-byte struct)
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
# KVM_MEM_USERFAULT is proposed upstream, not merged; its flag bit in the
# proposal is 1 << 3. Mainline rejects unknown flags with EINVAL, so trying
# the flag on a scratch slot is a safe probe where a capability number is not.
KVM_MEM_USERFAULT = 1 << 3

USERFAULTFD_IOC_NEW = 0xAA00
SYS_USERFAULTFD = 323  # x86-64


def check_kprobes(paths: HostPaths = DEFAULT) -> CheckResult:
    kp = os.path.exists(os.path.join(paths.tracefs, "kprobe_events"))
    btf = os.path.exists(os.path.join(paths.sys, "kernel", "btf", "vmlinux"))
    return CheckResult("kprobes/fentry", INFO,
                       f"kprobes {'available' if kp else 'absent'}, BTF {'present' if btf else 'absent'}"
                       " (pctop attaches to tracepoints only; BTF may build them, see probe build)",
                       required=False)


def check_read_probe(paths: HostPaths = DEFAULT) -> CheckResult:
    """How the probes learn a uffd read()'s fd and buffer: one tracepoint per read() of the
    host, or two (probes/pctop_handler.c, read_at_exit)."""
    if probe_build.task_pt_regs_usable(paths):
        how = "traced at its exit only (its arguments from the saved registers, bpf_task_pt_regs)"
    else:
        how = ("traced at its entry and exit (taking its arguments at the exit needs bpf_task_pt_regs: "
               "x86-64, kernel BTF, 5.15 or later)")
    return CheckResult("read() probe", INFO, how, required=False)


def _kvm_vendor(paths: HostPaths) -> str:
    flags = set()
    for line in (_read(paths.proc_path("cpuinfo")) or "").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for mod, name in (("kvm_intel", "vmx"), ("kvm_amd", "svm"), ("kvm_pvm", "pvm")):
        if os.path.isdir(os.path.join(paths.sys, "module", mod)):
            return name
    return "vmx" if "vmx" in flags else "svm" if "svm" in flags else "none"


def _kvm_userfault_supported(kvm_fd: int) -> bool | None:
    """Try KVM_MEM_USERFAULT on a scratch slot: True accepted, False refused, None untestable."""
    if fcntl.ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2) <= 0:
        return None
    vm = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    buf = mmap.mmap(-1, 4096)
    try:
        region = (ctypes.c_uint8 * 160)()
        view = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(view)
        ctypes.memmove(region, (ctypes.c_uint32 * 2)(0, KVM_MEM_USERFAULT), 8)
        ctypes.memmove(ctypes.byref(region, 8), (ctypes.c_uint64 * 3)(0, 4096, addr), 24)
        try:
            fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION2, region)
            return True
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            return None
    finally:
        os.close(vm)  # destroys the VM and its slot before the memory goes away
        del view
        buf.close()


def check_kvm(paths: HostPaths = DEFAULT) -> list[CheckResult]:
    dev = os.path.join(paths.dev, "kvm")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        fix = ("load KVM (modprobe kvm_intel or kvm_amd; enable virtualization in firmware), "
               "run as root or join group kvm; pctop demo falls back to a thread workload "
               "(which still needs userfaultfd, below)")
        return [CheckResult("/dev/kvm", MISSING, f"{dev}: {e.strerror}", fix)]
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        vendor = _kvm_vendor(paths)
        out = [CheckResult("/dev/kvm", OK if api == 12 else MISSING, f"API version {api}, vendor {vendor}",
                           "" if api == 12 else "KVM API version 12 expected")]
        mfi = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_FAULT_INFO)
        out.append(CheckResult("KVM_CAP_MEMORY_FAULT_INFO", INFO,
                               f"{'reported' if mfi else 'absent'}; "
                               "vcpu-exit strategy uses kvm_run.memory_fault when filled, "
                               "else a guest-assisted address", required=False))
        uf = _kvm_userfault_supported(fd)
        text = {True: "KVM_MEM_USERFAULT accepted", False: "KVM_MEM_USERFAULT not supported "
                "(proposed upstream, not merged)", None: "not testable (no KVM_CAP_USER_MEMORY2)"}[uf]
        out.append(CheckResult("KVM userfault", INFO, text, required=False))
        if vendor == "pvm":
            out.append(CheckResult("KVM flavour", INFO, "PVM: kvm_exit/kvm_page_fault tracepoints do not "
                                   "fire; pctop uses page_fault_*/kvm_mmu_* and sched events instead",
                                   required=False))
        return out
    finally:
        os.close(fd)


def check_userfaultfd(paths: HostPaths = DEFAULT) -> list[CheckResult]:
    out = []
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        sys_ok = True
        out.append(CheckResult("userfaultfd syscall", OK, "usable"))
    else:
        sys_ok = False
        err = ctypes.get_errno()
        out.append(CheckResult("userfaultfd syscall", MISSING, os.strerror(err),
                               "CONFIG_USERFAULTFD=y kernel; as non-root set "
                               "sysctl vm.unprivileged_userfaultfd=1 or use /dev/userfaultfd",
                               required=False))
    dev = os.path.join(paths.dev, "userfaultfd")
    try:
        dfd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            ufd = fcntl.ioctl(dfd, USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
            os.close(ufd)
            out.append(CheckResult("/dev/userfaultfd", OK, "usable"))
        finally:
            os.close(dfd)
    except OSError as e:
        out.append(CheckResult("/dev/userfaultfd", MISSING if not sys_ok else INFO, f"{dev}: {e.strerror}",
                               "Linux >= 6.1 provides /dev/userfaultfd; chmod/ACL it for the VMM user",
                               required=not sys_ok))
    val = (_read(paths.proc_path("sys", "vm", "unprivileged_userfaultfd")) or "?").strip()
    out.append(CheckResult("vm.unprivileged_userfaultfd", INFO, val, required=False))
    return out


def check_qemu(paths: HostPaths = DEFAULT) -> CheckResult:
    exe = shutil.which("qemu-system-x86_64")
    if not exe:
        return CheckResult("QEMU", INFO, "qemu-system-x86_64 not found (only for `--vmm qemu`)",
                           "apt-get install qemu-system-x86", required=False)
    try:
        ver = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5).stdout
        ver = ver.splitlines()[0] if ver else "unknown version"
    except (OSError, subprocess.SubprocessError):
        ver = "version unknown"
    return CheckResult("QEMU", INFO, f"{exe}: {ver}", required=False)


def check_netem(paths: HostPaths = DEFAULT) -> CheckResult:
    """tc netem (link delay/loss) for the engine's network tests; only informative:
    without it the tests use the engine's `latency` control and nftables instead."""
    import gzip

    try:
        with gzip.open(paths.proc_path("config.gz"), "rt") as f:
            config = f.read()
    except OSError:
        config = None
    nft = shutil.which("nft") is not None
    nft_text = "nftables " + ("present" if nft else "absent (apt-get install nftables)")
    if config is None:
        state = "unknown (no /proc/config.gz)"
    elif "CONFIG_NET_SCH_NETEM=y" in config or "CONFIG_NET_SCH_NETEM=m" in config:
        state = "available"
    else:
        state = "absent (CONFIG_NET_SCH_NETEM off: link tests delay with the engine's latency control, drop with nftables)"
    return CheckResult("tc netem", INFO, f"{state}; {nft_text}", required=False)


CHECKS: list[Callable[[HostPaths], CheckResult | list[CheckResult]]] = [
    check_kernel, check_privilege, check_bcc, check_probe_build, check_tracefs, check_debugfs,
    check_tracepoints, check_read_probe, check_kprobes, check_kvm, check_userfaultfd, check_qemu, check_netem,
]


def run_checks(paths: HostPaths = DEFAULT) -> list[CheckResult]:
    results: list[CheckResult] = []
    for check in CHECKS:
        try:
            r = check(paths)
        except Exception as e:  # a broken check must not hide the others
            r = CheckResult(check.__name__.removeprefix("check_"), MISSING, f"check failed: {e}")
        results.extend(r if isinstance(r, list) else [r])
    return results


# --- fixes ---------------------------------------------------------------------------------------


class FixAction(NamedTuple):
    ok: bool  # False: tried and failed, or could not be tried (the text says what to do)
    text: str


def fix_host(paths: HostPaths = DEFAULT) -> list[FixAction]:
    """Do the safe, local fixes; one FixAction per fix tried."""
    done: list[FixAction] = []
    if os.geteuid() != 0:
        return [FixAction(False, "mounting tracefs/debugfs and linking kernel headers needs root: "
                                 "sudo pctop doctor --fix")]
    if not os.path.isdir(os.path.join(paths.tracefs, "events")):
        _mount("tracefs", "nodev", paths.tracefs, done)
    if check_debugfs(paths).status != OK:
        _mount("debugfs", "none", paths.debugfs, done)
    rel = platform.release()
    build = os.path.join(paths.lib_modules, rel, "build")
    found = probe_build.ways(paths)
    if found and found[0].name == probe_build.BTF and not probe_build.tree_made(found[0].kernel_dir):
        try:  # now rather than at the first start
            done.append(FixAction(True, f"BTF: made vmlinux.h for the probes in {probe_build.make_btf_tree(paths)}"))
        except probe_build.BuildError as e:
            done.append(FixAction(False, f"BTF: {e}"))
    # Stand-in headers stay linked as the last way, should a BTF build fail.
    if not os.path.isdir(os.path.join(build, "include")):
        cand = probe_build.headers_fallback_candidates(paths)
        if cand is None:
            done.append(FixAction(False, "headers: none under /usr/src to link; apt-get install "
                                         "linux-headers-amd64 (Debian) or linux-headers-generic (Ubuntu)"))
        else:
            os.makedirs(os.path.dirname(build), exist_ok=True)
            for link, target in ((build, cand[0]), (os.path.join(paths.lib_modules, rel, "source"), cand[1])):
                if os.path.islink(link):
                    os.unlink(link)
                if not os.path.exists(link):
                    os.symlink(target, link)
                    done.append(FixAction(True, f"linked {link} -> {target}"))
    return done


def _mount(fstype: str, source: str, where: str, done: list[FixAction]) -> None:
    r = subprocess.run(["mount", "-t", fstype, source, where], capture_output=True, text=True)
    if r.returncode == 0:
        done.append(FixAction(True, f"mounted {fstype} at {where}"))
    else:
        done.append(FixAction(False, f"could not mount {fstype} at {where}: {r.stderr.strip() or r.returncode}"))
