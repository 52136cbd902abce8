"""The probes built from the running kernel's BTF, with no kernel headers (pctop/probe_build.py).

The real test hides every header this host has: a private mount namespace
(unshare -m) puts empty tmpfs over /lib/modules and /usr/src, and a child
pctop there builds the probes from /sys/kernel/btf/vmlinux into a fresh cache,
then counts the faults of tests/programs/uffd_toucher.c exactly, like
tests/system/test_ebpf.py. Another reads struct task_struct through vmlinux.h and
gets this kernel's answers. The choice between ways is checked on folder trees made
here (a host with its own headers cannot be made real otherwise); the BTF
they name is this kernel's own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pctop import probe_build as pb
from pctop.hostpaths import HostPaths
from tests.conftest import ROOT, need_root
from tests.helpers.probes import need_ebpf, need_task_pt_regs

REAL_BTF = "/sys/kernel/btf/vmlinux"


def need_btf_and_bpftool() -> None:
    if not os.path.isfile(REAL_BTF):
        pytest.skip(f"this kernel has no BTF ({REAL_BTF})")
    if pb.bpftool() is None:
        pytest.skip("bpftool not installed (apt-get install bpftool)")


def need_ebpf_and_btf() -> None:
    need_root()
    need_btf_and_bpftool()
    need_ebpf()


def run_without_headers(*cmd: str, cache: Path) -> subprocess.CompletedProcess:
    """Run cmd where /lib/modules and /usr/src are empty, with its own pctop cache."""
    hide = ('mount -t tmpfs none /lib/modules && mount -t tmpfs none /usr/src && '
            'if [ -n "$(ls -A /lib/modules)$(ls -A /usr/src)" ]; then echo "headers still visible"; exit 99; fi; '
            'exec "$@"')
    env = dict(os.environ, PCTOP_CACHE=str(cache))
    env.pop("BCC_KERNEL_SOURCE", None)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh", *cmd],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def litter(cache: Path) -> list[str]:
    return [str(p) for p in cache.rglob(".tmp-*")]


# Runs in the namespace: start the probes, run the toucher inside one interval, report.
CHILD = """
import json, subprocess, sys
from pctop.sources.ebpf import EbpfSource
src = EbpfSource(None, follow_all=True)
src.start()
try:
    started = src.collect()  # its events say how the probes were built
    p = subprocess.run([sys.argv[1], "-t", "2", "-p", "16", "-d", "100", "-i"],
                       capture_output=True, text=True, timeout=60, check=True)
    r = src.collect()
finally:
    src.close()
truth = json.loads(p.stdout)
print(json.dumps({"built_with": src.built_with.name, "truth": truth, "events": list(started.events),
                  "faults": {t.tid: t.faults for t in r.threads if t.pid == truth["pid"]}}))
"""


@pytest.mark.bpf
def test_probes_build_from_btf_and_count_faults_with_headers_hidden(toucher, tmp_path):
    need_ebpf_and_btf()
    cache = tmp_path / "cache"
    r = run_without_headers(sys.executable, "-c", CHILD, str(toucher), cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["built_with"] == pb.BTF
    assert any(e.startswith("probes built with BTF") for e in got["events"]), got["events"]
    truth = got["truth"]
    assert sum(t["faults"] for t in truth["touchers"]) == 32
    assert got["faults"] == {str(t["tid"]): t["faults"] for t in truth["touchers"]}
    # one tree, made from this kernel's BTF, and nothing half-made left behind
    (tree,) = (cache / "btf").iterdir()
    assert tree.name.startswith(platform.release() + "-") and (tree / "include/vmlinux.h").stat().st_size > 0
    assert litter(cache) == []


def test_doctor_names_btf_when_headers_are_hidden(tmp_path):
    need_root()
    need_btf_and_bpftool()
    r = run_without_headers(sys.executable, "-m", "pctop", "doctor", "--json", cache=tmp_path / "cache")
    doc = json.loads(r.stdout)
    (build,) = [c for c in doc["checks"] if c["name"] == "probe build"]
    assert build["status"] == "OK" and build["detail"].startswith("BTF: "), build
    assert "stand-in" not in build["detail"]  # /usr/src is hidden: nothing to fall back to


# Reads the calling task's tgid and its parent's through struct task_struct, as vmlinux.h lays
# it out, and says what getpid()/getppid() say. (With Debian's 6.1 headers standing in for 6.18,
# the same program read 4294936705 and 0 here: another kernel's layout.)
LAYOUT_CHILD = '''
import json, os
from pctop import probe_build as pb
text = """
BPF_ARRAY(out, u32, 2);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if (bpf_get_current_pid_tgid() >> 32 != WANT)
        return 0;
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    u32 k0 = 0, k1 = 1, tgid = t->tgid, parent = t->real_parent->tgid;
    out.update(&k0, &tgid);
    out.update(&k1, &parent);
    return 0;
}
"""
way = pb.btf_way()
flags = pb.prepare(way, text, [f"-DWANT={os.getpid()}"])
from bcc import BPF
with pb.kernel_source(way):
    b = BPF(text=text.encode(), cflags=flags)
ppid = os.getppid()
print(json.dumps({"read": [b["out"][0].value, b["out"][1].value], "truth": [os.getpid(), ppid]}))
'''


@pytest.mark.bpf
def test_struct_layouts_are_the_running_kernels(tmp_path):
    """What BTF gives that stand-in headers cannot: kernel structs as this kernel lays them out."""
    need_ebpf_and_btf()
    env = dict(os.environ, PCTOP_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", LAYOUT_CHILD], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["read"] == got["truth"]


# ---- the tree in the cache --------------------------------------------------------------


def test_racing_pctops_make_one_tree_and_leave_no_litter(tmp_path):
    need_btf_and_bpftool()
    code = "from pctop.probe_build import make_btf_tree; print(make_btf_tree())"
    env = dict(os.environ, PCTOP_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert [str(p) for p in (tmp_path / "btf").iterdir()] == outs[:1]
    assert litter(tmp_path) == []


def test_stale_trees_and_killed_generations_are_swept(tmp_path):
    need_btf_and_bpftool()
    btf_dir = tmp_path / "btf"
    paths = HostPaths(cache=str(tmp_path))
    old_kernel = btf_dir / "5.10.0-old-0123456789ab-01234567"
    other_pctop = btf_dir / (os.path.basename(pb.btf_tree(paths)).rsplit("-", 1)[0] + "-76543210")
    killed = btf_dir / ".tmp-killed"
    running = btf_dir / ".tmp-running"
    for d in (old_kernel, other_pctop, killed, running):
        (d / "include").mkdir(parents=True)
    killed_file = btf_dir / ".tmp-file"
    killed_file.write_text("half")
    an_hour_ago = time.time() - 3600
    for p in (killed, killed_file):
        os.utime(p, (an_hour_ago, an_hour_ago))
    tree = pb.make_btf_tree(paths)
    kept = [os.path.basename(tree), other_pctop.name, running.name]
    assert sorted(p.name for p in btf_dir.iterdir()) == sorted(kept)


def test_unreadable_btf_is_one_line_and_leaves_nothing(tmp_path):
    if pb.bpftool() is None:
        pytest.skip("bpftool not installed (apt-get install bpftool)")
    sys_dir = tmp_path / "sys"
    (sys_dir / "kernel/btf").mkdir(parents=True)
    (sys_dir / "kernel/btf/vmlinux").write_bytes(b"not BTF" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(pb.BuildError) as e:
        pb.make_btf_tree(HostPaths(sys=str(sys_dir), cache=str(cache)))
    assert "bpftool could not dump" in str(e.value) and "\n" not in str(e.value)
    assert list((cache / "btf").iterdir()) == []


def test_kernel_names_the_probes_define_are_hidden_from_vmlinux_h(tmp_path):
    tree = tmp_path / "tree"
    (tree / "include/pctop").mkdir(parents=True)
    (tree / "include/pctop/kernel-names").write_text("config\nu64\ntask_struct\n")
    text = "BPF_ARRAY(config, u64, 3);\nstatic __always_inline u64 cfg(u32 slot)\n{\n    return 0;\n}\n"
    flags = pb.btf_cflags(str(tree), text)
    assert flags[0] == "-DPCTOP_BTF"
    rel = flags[1].split("=", 1)[1].strip('"')
    hide = (tree / "include" / rel).read_text()
    assert "#define config pctop_kernel_config" in hide and "#undef config" in hide
    assert "u64" not in hide and "cfg" not in hide
    assert pb.btf_cflags(str(tree), "BPF_ARRAY(settings, u64, 3);\n") == ["-DPCTOP_BTF"]


# ---- names on each side -----------------------------------------------------------------


def test_probe_names_are_definitions_not_uses():
    text = """#define X 1
struct tkey {
    u32 tid;
};
BPF_HASH(stats, struct tkey, u64, 1024);
BPF_TABLE("percpu_array", u32, u64, scratch, 1);
BPF_PROG_ARRAY(parsers, 1);
static u64 seen = 0;
static __always_inline struct tstate *get_tstate(u32 tid, u32 tgid)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    return lookup(tid);
}
int parse_msgs(void *ctx)
TRACEPOINT_PROBE(sched, sched_switch)
"""
    assert pb.probe_names(text) == {"tkey", "stats", "scratch", "parsers", "seen", "get_tstate", "parse_msgs"}


def test_kernel_names_of_a_bpftool_dump():
    dump = """typedef unsigned int __u32;

typedef __u32 u32;

typedef int (*initcall_t)(void);

typedef struct {
\tint counter;
} atomic_t;

typedef char buf_t[16];

struct task_struct {
\tint pid;
\tstruct {
\t\tint a;
\t} inner;
};

struct forward_only;

enum bpf_map_type {
\tBPF_MAP_TYPE_UNSPEC = 0,
\tBPF_MAP_TYPE_HASH = 1,
};
"""
    assert pb.kernel_names(dump) == {"__u32", "u32", "initcall_t", "atomic_t", "buf_t", "task_struct",
                                     "bpf_map_type", "BPF_MAP_TYPE_UNSPEC", "BPF_MAP_TYPE_HASH"}


def test_kernel_names_of_this_kernel(tmp_path):
    need_btf_and_bpftool()
    tree = pb.make_btf_tree(HostPaths(cache=str(tmp_path)))
    names = set((Path(tree) / "include/pctop/kernel-names").read_text().split())
    assert {"u32", "u64", "task_struct", "pt_regs", "BPF_ANY", "bpf_map_type"} <= names
    assert "tgid" not in names and "prev" not in names  # struct members are not file-scope names


# ---- which way --------------------------------------------------------------------------


def fake_host(tmp_path: Path, headers_for: str | None, btf: bool) -> HostPaths:
    """/lib/modules/$(uname -r)/build made for `headers_for` (None: no headers), and this
    kernel's real BTF linked in, or not."""
    paths = HostPaths(proc=str(tmp_path / "proc"), sys=str(tmp_path / "sys"),
                      lib_modules=str(tmp_path / "lib/modules"), usr_src=str(tmp_path / "usr/src"),
                      cache=str(tmp_path / "cache"))
    (tmp_path / "sys/kernel/btf").mkdir(parents=True)
    if btf:
        os.symlink(REAL_BTF, tmp_path / "sys/kernel/btf/vmlinux")
    if headers_for:
        gen = tmp_path / f"usr/src/linux-headers-{headers_for}/include/generated"
        gen.mkdir(parents=True)
        (gen / "utsrelease.h").write_text(f'#define UTS_RELEASE "{headers_for}"\n')
        (tmp_path / "lib/modules" / platform.release()).mkdir(parents=True)
        os.symlink(gen.parent.parent, tmp_path / "lib/modules" / platform.release() / "build")
    return paths


@pytest.mark.parametrize("headers_for, btf, expected", [
    ("own", True, [pb.OWN, pb.BTF]),
    ("6.1.0-99-amd64", True, [pb.BTF, pb.STAND_IN]),
    ("6.1.0-99-amd64", False, [pb.STAND_IN]),
    (None, True, [pb.BTF]),
    (None, False, []),
])
def test_own_headers_then_btf_then_stand_in(tmp_path, headers_for, btf, expected):
    if btf:
        need_btf_and_bpftool()
    paths = fake_host(tmp_path, platform.release() if headers_for == "own" else headers_for, btf)
    assert [w.name for w in pb.ways(paths)] == expected
    from pctop import doctor

    r = doctor.check_probe_build(paths)
    assert r.status == ("OK" if expected else "MISSING")
    if expected:
        assert r.detail.startswith(f"{expected[0]}: ")


@pytest.mark.bpf
def test_a_btf_build_that_fails_gives_way_to_stand_in_headers(tmp_path):
    need_ebpf_and_btf()
    from pctop.hostpaths import DEFAULT
    from pctop.sources.ebpf import EbpfSource

    paths = HostPaths(proc=DEFAULT.proc, cache=str(tmp_path))
    if [w.name for w in pb.ways(paths)] != [pb.BTF, pb.STAND_IN]:
        pytest.skip("needs a host whose own headers are missing and stand-in ones linked (pctop doctor --fix)")
    tree = Path(pb.make_btf_tree(paths))
    (tree / "include/linux/kconfig.h").write_text('#error "a BTF tree this kernel cannot use"\n')
    src = EbpfSource([], paths=paths)
    src.start()
    try:
        events = src.collect().events
    finally:
        src.close()
    assert src.built_with.name == pb.STAND_IN
    assert events[0].startswith("probes did not build with BTF: "), events
    assert events[1].startswith("probes built with stand-in headers: "), events


@pytest.mark.bpf
def test_a_kernel_that_refuses_the_register_helpers_gets_the_read_entry_probe(monkeypatch):
    """Where the verifier refuses bpf_task_pt_regs (a kernel that has BTF but not the
    helper, as before 5.15), start() builds again without it and reads read()'s arguments
    at its entry. Such a kernel cannot exist here; a compile error when the probes ask for
    the helpers stands in for the verifier's refusal."""
    need_ebpf()
    from pctop.sources import ebpf
    from pctop.sources.tracepoints import READ_ENTRY

    need_task_pt_regs()
    text = ebpf.probe_text()
    monkeypatch.setattr(ebpf, "probe_text",
                        lambda: '#ifdef HAVE_TASK_PT_REGS\n#error "refused"\n#endif\n' + text)
    src = ebpf.EbpfSource([])
    src.start()
    try:
        attached = {tp.decode() if isinstance(tp, bytes) else tp for tp in src._bpf.tracepoint_fds}
        events = src.collect().events
    finally:
        src.close()
    assert src.reads_at_exit is False
    assert READ_ENTRY in attached
    assert any(e.startswith("probes read read()'s arguments at its entry") for e in events), events


@pytest.mark.parametrize("release, version", [("6.18.44-fc-v1300", (6, 18)), ("5.15.0-91-generic", (5, 15)),
                                              ("6.1rc7", (6, 1)), ("4.19.0", (4, 19)), ("weird", None), ("6", None)])
def test_kernel_version_reads_the_first_two_numbers_of_a_release(release, version):
    assert pb.kernel_version(release) == version


def test_registers_at_exit_need_the_kernels_btf_and_5_15(tmp_path):
    """bpf_task_pt_regs came in 5.15, and bpf_get_current_task_btf needs the kernel's BTF."""
    paths = HostPaths(sys=str(tmp_path))
    btf = tmp_path / "kernel" / "btf" / "vmlinux"
    assert not pb.task_pt_regs_usable(paths, "6.18.44")  # no BTF
    btf.parent.mkdir(parents=True)
    btf.write_bytes(b"\x9f\xeb")
    assert pb.task_pt_regs_usable(paths, "6.18.44", "x86_64") and pb.task_pt_regs_usable(paths, "5.15.0", "x86_64")
    assert not pb.task_pt_regs_usable(paths, "5.14.21") and not pb.task_pt_regs_usable(paths, "weird")
    assert not pb.task_pt_regs_usable(paths, "6.18.44", machine="aarch64")  # the probes name x86-64's registers
