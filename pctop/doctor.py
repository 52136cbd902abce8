"""`pctop doctor`: what pctop needs from this host, and how to fix what is missing.

Modelled on kvm_stat's check_access: each check is a small function that
looks at one thing and returns a CheckResult with the exact fix. Checks take
a HostPaths so tests can point them at a missing tree, and the capability
check reads the effective set of the process, so a test can run the doctor
with capabilities really dropped (capsh) instead of mocking them.

Nothing here imports bcc or Textual: `find_spec` says where bcc would come
from without loading it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.util
import mmap
import os
import platform
import shutil
import subprocess
from typing import Callable, NamedTuple

from pctop import probe_build
from pctop.hostpaths import DEFAULT, HostPaths

OK, MISSING, INFO = "OK", "MISSING", "INFO"

# Linux capability bits (include/uapi/linux/capability.h).
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39

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


class CheckResult(NamedTuple):
    name: str
    status: str  # OK | MISSING | INFO
    detail: str
    fix: str = ""
    required: bool = True  # counts towards the exit code

    @property
    def failed(self) -> bool:
        return self.required and self.status == MISSING


# --- helpers -------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def effective_caps(paths: HostPaths = DEFAULT) -> int | None:
    status = _read(paths.proc_path("self", "status")) or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def _mounted(paths: HostPaths, fstype: str, mountpoint: str) -> bool:
    for line in (_read(paths.proc_path("mounts")) or "").splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == fstype and f[1] == mountpoint:
            return True
    return False


# --- checks --------------------------------------------------------------------------------------


def check_kernel(paths: HostPaths = DEFAULT) -> CheckResult:
    rel = platform.release()
    try:
        major, minor = (int(x) for x in rel.split(".")[:2])
    except ValueError:
        return CheckResult("kernel", INFO, f"release {rel} (could not parse)", required=False)
    if (major, minor) < (5, 8):
        return CheckResult("kernel", MISSING, f"{rel}: older than 5.8",
                           "use Linux >= 5.8 (CAP_BPF, UFFD_FEATURE_THREAD_ID, raw tracepoints)")
    return CheckResult("kernel", OK, rel)


def check_privilege(paths: HostPaths = DEFAULT) -> CheckResult:
    caps = effective_caps(paths)
    if caps is None:
        return CheckResult("privilege", MISSING, "cannot read CapEff from /proc/self/status",
                           f"mount procfs at {paths.proc}")
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return CheckResult("privilege", OK, f"{who}, may load BPF programs and attach tracepoints")
    lacking = [n for n, b in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON)) if not has(b)]
    # Not "setcap ... python3": capabilities on the interpreter would go to every
    # Python script on the host.
    return CheckResult("privilege", MISSING, f"lacking {', '.join(lacking)} (and CAP_SYS_ADMIN)",
                       "run as root: sudo pctop ...  (without eBPF, pctop runs on /proc alone and says so)")


def check_bcc(paths: HostPaths = DEFAULT) -> CheckResult:
    spec = importlib.util.find_spec("bcc")
    if spec is not None and spec.origin:
        return CheckResult("bcc", OK, f"importable from {os.path.dirname(spec.origin)}")
    debian = "/usr/lib/python3/dist-packages/bcc"
    if os.path.isdir(debian):
        return CheckResult("bcc", MISSING, f"installed at {debian} but not on this Python's path",
                           "use `make demo` / `make test` (their venv sees Debian's packages), or "
                           "PYTHONPATH=/usr/lib/python3/dist-packages pctop ...")
    return CheckResult("bcc", MISSING, "python bcc not installed",
                       "apt-get install python3-bpfcc   (PyPI's package named 'bcc' is unrelated)")


def check_probe_build(paths: HostPaths = DEFAULT) -> CheckResult:
    """Which way bcc will get the kernel's types (pctop.probe_build): own headers, BTF, stand-in."""
    found = probe_build.ways(paths)
    if found:
        best = found[0]
        later = f"; then {', '.join(w.name for w in found[1:])}" if found[1:] else ""
        hint = ""
        if best.name == probe_build.STAND_IN and os.path.isfile(probe_build.btf_file(paths)):
            hint = "; apt-get install bpftool to build from this kernel's BTF instead"
        return CheckResult("probe build", OK, f"{best.name}: {best.detail}{later}{hint}")
    rel = platform.release()
    build = os.path.join(paths.lib_modules, rel, "build")
    if os.path.isfile(probe_build.btf_file(paths)):
        return CheckResult("probe build", MISSING, f"no headers for {rel}, and no bpftool to read its BTF",
                           "apt-get install bpftool   (the probes then build from /sys/kernel/btf/vmlinux)")
    cand = probe_build.headers_fallback_candidates(paths)
    if cand:
        return CheckResult("probe build", MISSING,
                           f"no headers or BTF for {rel}; {os.path.basename(cand[0])} can stand in",
                           "pctop doctor --fix   (links them under /lib/modules/$(uname -r))")
    return CheckResult("probe build", MISSING, f"no headers for {rel} under {build}, no BTF",
                       f"apt-get install linux-headers-{rel} || apt-get install linux-headers-amd64; "
                       "then pctop doctor --fix")


def check_tracefs(paths: HostPaths = DEFAULT) -> CheckResult:
    if os.path.isdir(os.path.join(paths.tracefs, "events")):
        return CheckResult("tracefs", OK, f"mounted at {paths.tracefs}")
    if _mounted(paths, "tracefs", paths.tracefs):
        return CheckResult("tracefs", MISSING, f"mounted at {paths.tracefs} but not readable by uid {os.geteuid()}",
                           "run as root: sudo pctop ...  (tracefs is root-only on most systems)")
    return CheckResult("tracefs", MISSING, f"{paths.tracefs} not mounted",
                       f"mount -t tracefs nodev {paths.tracefs}   (or pctop doctor --fix)")


def check_debugfs(paths: HostPaths = DEFAULT) -> CheckResult:
    # Needed to map vCPU index -> thread id for VMMs pctop did not see start.
    if _mounted(paths, "debugfs", paths.debugfs) or os.path.isdir(os.path.join(paths.debugfs, "kvm")):
        return CheckResult("debugfs", OK, f"mounted at {paths.debugfs}")
    return CheckResult("debugfs", MISSING, f"{paths.debugfs} not mounted",
                       f"mount -t debugfs none {paths.debugfs}   (or pctop doctor --fix)")


def check_tracepoints(paths: HostPaths = DEFAULT) -> list[CheckResult]:
    from pctop.sources.tracepoints import OPTIONAL, REQUIRED

    events = os.path.join(paths.tracefs, "events")
    if not os.path.isdir(events):
        if _mounted(paths, "tracefs", paths.tracefs):
            return [CheckResult("tracepoints", MISSING, f"tracefs not readable by uid {os.geteuid()}, "
                                "cannot list them", "run as root: sudo pctop ...")]
        return [CheckResult("tracepoints", MISSING, "tracefs not mounted, cannot list them",
                            "mount tracefs first (pctop doctor --fix)")]

    def exists(tp: str) -> bool:
        cat, name = tp.split(":", 1)
        return os.path.exists(os.path.join(events, cat, name, "id"))

    missing = [tp for tp in REQUIRED if not exists(tp)]
    out = []
    if missing:
        out.append(CheckResult("tracepoints", MISSING, "absent: " + ", ".join(missing),
                               "a kernel with CONFIG_FTRACE_SYSCALLS and KVM tracepoints "
                               "(modprobe kvm; kvm_intel/kvm_amd), or use the procfs tier"))
    else:
        out.append(CheckResult("tracepoints", OK, f"all {len(REQUIRED)} present: " + ", ".join(REQUIRED)))
    opt = [tp for tp in OPTIONAL if exists(tp)]
    absent = [tp for tp in OPTIONAL if not exists(tp)]
    out.append(CheckResult("optional tracepoints", INFO,
                           f"present: {', '.join(opt) or 'none'}; absent: {', '.join(absent) or 'none'}",
                           required=False))
    return out


def check_kprobes(paths: HostPaths = DEFAULT) -> CheckResult:
    kp = os.path.exists(os.path.join(paths.tracefs, "kprobe_events"))
    btf = os.path.exists(os.path.join(paths.sys, "kernel", "btf", "vmlinux"))
    return CheckResult("kprobes/fentry", INFO,
                       f"kprobes {'available' if kp else 'absent'}, BTF {'present' if btf else 'absent'}"
                       " (pctop attaches to tracepoints only; BTF may build them, see probe build)",
                       required=False)


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
    check_tracepoints, check_kprobes, check_kvm, check_userfaultfd, check_qemu, check_netem,
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
