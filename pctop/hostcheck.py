"""Can the probes run here? The checks of privilege, bcc, how the probes are built,
tracefs/debugfs and the tracepoints, each returning a CheckResult with the exact fix.

Shared by `pctop doctor` (pctop.doctor, which adds KVM, userfaultfd and QEMU checks
and the fixes) and the eBPF collector (pctop.sources.ebpf: ebpf_unavailable_reason),
so the collector does not depend on the doctor. Checks take a HostPaths so tests can
point them at a missing tree; the capability check reads the process's effective set.
Nothing here imports bcc: `find_spec` says where bcc would come from without loading it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import NamedTuple

from pctop import probe_build
from pctop.hostpaths import DEFAULT, HostPaths

OK, MISSING, INFO = "OK", "MISSING", "INFO"

# Linux capability bits (include/uapi/linux/capability.h).
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39

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
