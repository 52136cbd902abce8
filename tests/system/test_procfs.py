"""The procfs source: discovery, queue depth, vCPU identity, handler CPU%, gone targets.

Real processes holding real userfaultfds (tests/helpers/uffd_holder.py) for what the
kernel shows; a fake /proc tree in a temp dir (the HostPaths redirect) for the
not-found, gone and reused-pid paths and for exact CPU accounting.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pctop.engine.uffd import Uffd
from pctop.hostpaths import HostPaths
from pctop.sources.procfs import (
    DepthSampler,
    ProcfsSource,
    TargetNotFound,
    find_uffd_holders,
    parse_stat,
    scan_fds,
    vcpu_from_name,
)
from tests.helpers.uffd_holder import holder

CLK = os.sysconf("SC_CLK_TCK")


# ---- against the real kernel --------------------------------------------------

def test_discovery_finds_a_real_uffd_holder_and_reads_its_fdinfo():
    with holder(1) as (_, pid, fd):
        assert pid in find_uffd_holders(HostPaths())
        assert scan_fds(HostPaths(), pid).uffds == (fd,)
        src = ProcfsSource()  # follow everything
        src.start()
        try:
            r = src.collect()
        finally:
            src.close()
        assert pid in [t.pid for t in r.targets]
        (d,) = [d for d in r.depths if d.pid == pid]
        assert d.fd == fd and d.samples >= 1


def test_queue_depth_shows_the_faults_a_slow_handler_holds_back():
    n = 4
    with holder(n, hold_s=2.0) as (_, pid, fd):
        src = ProcfsSource([pid], sample_hz=50)
        src.start()
        try:
            deadline = time.monotonic() + 10
            held = None
            while time.monotonic() < deadline and held is None:
                time.sleep(0.2)
                (d,) = src.collect().depths
                if d.pending_max >= n:
                    held = d
            assert held is not None, "the blocked faults never showed in fdinfo"
            assert held.total_max >= n and held.samples >= 2
            # Then the handler wakes up and drains the queue: depth falls to zero.
            while time.monotonic() < deadline:
                time.sleep(0.2)
                (d,) = src.collect().depths
                if d.pending_max == 0 and d.total_max == 0:
                    break
            assert (d.pending_max, d.total_max) == (0, 0)
        finally:
            src.close()


def test_comm_selects_processes_by_command_name():
    with holder(1) as (_, pid, fd), holder(1) as (_, other, _fd):
        src = ProcfsSource(comm=f"uffdhold{pid}")
        assert not src.follow_all
        src.start()
        try:
            r = src.collect()
        finally:
            src.close()
    assert [t.pid for t in r.targets] == [pid] and other != pid
    assert r.targets[0].comm == f"uffdhold{pid}" and [d.fd for d in r.depths] == [fd]


def test_a_real_target_that_exits_is_reported_gone():
    with holder(1) as (proc, pid, _):
        src = ProcfsSource([pid])
        src.start()
        try:
            assert [t.pid for t in src.collect().targets] == [pid]
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
            r = src.collect()
            assert r.gone == (pid,) and r.targets == () and r.depths == ()
            assert src.collect().gone == ()  # reported once
        finally:
            src.close()


@pytest.mark.kvm
def test_a_real_kvm_process_is_discovered_by_its_vcpu_fds_and_its_vcpus_identified():
    from tests.conftest import need_kvm

    need_kvm()
    with holder(2, kvm=True) as (_, pid, _vmfd):
        paths = HostPaths()
        assert pid in find_uffd_holders(paths)  # no uffd: found by its vCPU fds
        assert scan_fds(paths, pid).vcpu_ids == (0, 1)  # fds dup'ed by mmap count once
        src = ProcfsSource()
        src.start()
        try:
            time.sleep(0.05)
            r = src.collect()
        finally:
            src.close()
    idents = sorted((i.vcpu, i.how) for i in r.identities if i.pid == pid)
    names = {t.pid: t.thread_names for t in r.targets}[pid]
    if os.path.isdir(os.path.join(paths.debugfs, "kvm")):
        assert idents == [(0, "debugfs"), (1, "debugfs")]
    else:
        assert idents == [(0, "thread_name"), (1, "thread_name")]
    assert sorted(n for n in names.values() if n.endswith("/KVM")) == ["CPU 0/KVM", "CPU 1/KVM"]
    # Both vCPU threads are known, so the rest of the process is the handler side.
    assert {t.pid: t.handler_cpu_pct for t in r.targets}[pid] is not None


def test_unknown_pid_is_target_not_found():
    with pytest.raises(TargetNotFound, match="999999999"):
        ProcfsSource([999999999]).check_pids()


def _fdinfo_files_open(pid: int) -> int:
    """How many of this process's fds are open on /proc/<pid>/fdinfo/* files."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/proc/{pid}/fdinfo/")
        except OSError:
            pass
    return n


def test_sampler_rereads_its_open_fdinfo_and_follows_what_the_fd_number_holds():
    me = os.getpid()
    s = DepthSampler(HostPaths())
    with Uffd() as u:
        s.watch([(me, u.fd)])
        s.sample_once()
        s.sample_once()
        assert _fdinfo_files_open(me) == 1  # opened once, re-read in place
        number = u.fd
        # The number now holds something that is not a uffd: no samples from it ...
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, number)
        s.sample_once()
        with Uffd() as again:  # ... and then a uffd again: sampled again
            os.dup2(again.fd, number)
            s.sample_once()
            os.close(number)
        os.close(null)
        u.fd = os.open(os.devnull, os.O_RDONLY)  # its own close() closes this instead
    (d,) = s.take()
    assert (d.pid, d.fd, d.samples) == (me, number, 3)
    assert (d.pending_max, d.total_max) == (0, 0)
    s.watch([])
    s.sample_once()
    assert _fdinfo_files_open(me) == 0  # an unwatched uffd's file is closed
    s.close()


def test_sampler_drops_the_file_of_a_closed_fd_and_reopens_it_later():
    me = os.getpid()
    s = DepthSampler(HostPaths())
    u = Uffd()
    s.watch([(me, u.fd)])
    s.sample_once()
    number = u.fd
    u.close()
    s.sample_once()  # the fd is closed: the read fails and the file is let go
    assert _fdinfo_files_open(me) == 0
    with Uffd() as again:
        if again.fd != number:  # put a uffd under the old number again
            os.dup2(again.fd, number)
        s.sample_once()
        assert _fdinfo_files_open(me) == 1
        if again.fd != number:
            os.close(number)
    assert [d.samples for d in s.take()] == [2]
    s.close()
    assert _fdinfo_files_open(me) == 0


def test_sampler_past_its_open_file_limit_opens_for_each_sample():
    me = os.getpid()
    s = DepthSampler(HostPaths())
    s.max_held = 1
    with Uffd() as a, Uffd() as b:
        s.watch([(me, a.fd), (me, b.fd)])
        s.sample_once()
        s.sample_once()
        assert _fdinfo_files_open(me) == 1  # one held, the other opened and closed again
        assert [(d.fd, d.samples) for d in s.take()] == sorted([(a.fd, 2), (b.fd, 2)])
    s.close()
    assert _fdinfo_files_open(me) == 0


def test_sampler_refuses_slow_rates():
    with pytest.raises(ValueError):
        DepthSampler(HostPaths(), hz=5)


# ---- against a fake /proc tree -------------------------------------------------

def _stat(pid: int, comm: str, utime: int = 0, stime: int = 0, start: int = 1000) -> str:
    # fields 3.. after "(comm)": state is field 3, utime 14, stime 15, starttime 22
    rest = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 6 + [str(start)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


class FakeProc:
    """A /proc with processes made of plain files and symlinks."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = root / "proc"
        self.proc.mkdir()
        self.paths = HostPaths(proc=str(self.proc), sys=str(root / "sys"))

    def add(self, pid: int, comm: str, threads: dict[int, tuple[str, int]], fds: dict[int, str],
            fdinfo: dict[int, str] = {}, start: int = 1000) -> None:
        d = self.proc / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "fdinfo").mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "stat").write_text(_stat(pid, comm, start=start))
        for fd, link in fds.items():
            os.symlink(link, d / "fd" / str(fd))
        for fd, text in fdinfo.items():
            (d / "fdinfo" / str(fd)).write_text(text)
        for tid, (name, ticks) in threads.items():
            self.set_thread(pid, tid, name, ticks)

    def set_thread(self, pid: int, tid: int, name: str, ticks: int) -> None:
        t = self.proc / str(pid) / "task" / str(tid)
        t.mkdir(parents=True, exist_ok=True)
        (t / "stat").write_text(_stat(tid, name, utime=ticks))


UFFD = "anon_inode:[userfaultfd]"
FDINFO = "pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t1\npending:\t2\ntotal:\t5\nAPI:\taa:100:1ff\n"


class Mono:
    t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def fake(tmp_path):
    f = FakeProc(tmp_path)
    f.add(4242, "qemu-system-x86", {4242: ("qemu-system-x86", 0), 4243: ("CPU 0/KVM", 0),
                                    4244: ("fault-default", 0)},
          {3: UFFD, 4: "anon_inode:kvm-vcpu:0", 5: "/dev/null"}, {3: FDINFO})
    f.add(5000, "bash", {5000: ("bash", 0)}, {0: "/dev/pts/0"})
    return f


def test_fake_discovery_depth_identity_and_handler_cpu(fake):
    mono = Mono()
    src = ProcfsSource(paths=fake.paths, monotonic=mono)
    src.start()
    try:
        mono.t = 2.0
        fake.set_thread(4242, 4244, "fault-default", 1 * CLK)  # handler: 1 s of CPU
        fake.set_thread(4242, 4243, "CPU 0/KVM", 2 * CLK)  # the vCPU's time is not the handler's
        r = src.collect()
    finally:
        src.close()
    assert [t.pid for t in r.targets] == [4242]  # bash holds no uffd
    (t,) = r.targets
    assert t.comm == "qemu-system-x86" and t.thread_names[4244] == "fault-default"
    assert t.handler_cpu_pct == pytest.approx(50.0)
    (d,) = r.depths
    assert (d.fd, d.pending_mean, d.pending_max, d.total_mean, d.total_max) == (3, 2.0, 2, 5.0, 5)
    assert d.in_service_max == 3  # total - pending of the same read
    assert [(i.tid, i.vcpu, i.how) for i in r.identities] == [(4243, 0, "thread_name")]


def test_fake_debugfs_identity_wins_and_unidentified_vcpus_hide_handler_cpu(fake):
    vm = Path(fake.paths.debugfs) / "kvm" / "4242-11" / "vcpu1"
    vm.mkdir(parents=True)
    (vm / "pid").write_text("4244\n")
    fake.add(6000, "fc", {6000: ("fc", 0), 6001: ("worker", 0)},
             {3: "anon_inode:kvm-vcpu:0"})  # a vCPU fd, but no thread says which
    mono = Mono()
    src = ProcfsSource(paths=fake.paths, monotonic=mono)
    src.start()
    try:
        mono.t = 1.0
        r = src.collect()
    finally:
        src.close()
    idents = {(i.pid, i.tid): (i.vcpu, i.how) for i in r.identities}
    assert idents[(4242, 4244)] == (1, "debugfs")
    assert {t.pid: t.handler_cpu_pct for t in r.targets}[6000] is None


def test_fake_named_pid_that_vanishes_or_is_reused_is_gone(fake):
    src = ProcfsSource([4242, 5000], paths=fake.paths)
    src.check_pids()
    src.start()
    try:
        assert sorted(t.pid for t in src.collect().targets) == [4242, 5000]
        for p in (fake.proc / "4242").rglob("*"):
            if p.is_symlink() or p.is_file():
                p.unlink()
        for p in sorted((fake.proc / "4242").rglob("*"), reverse=True):
            p.rmdir()
        (fake.proc / "4242").rmdir()
        # pid 5000 now belongs to another process (a different start time)
        (fake.proc / "5000" / "stat").write_text(_stat(5000, "bash", start=99999))
        r = src.collect()
        assert sorted(r.gone) == [4242, 5000] and r.targets == ()
        assert src.collect().gone == ()
    finally:
        src.close()
    with pytest.raises(TargetNotFound):
        ProcfsSource([4242], paths=fake.paths).check_pids()


def test_fake_uffd_open_and_close_are_events(fake):
    src = ProcfsSource([4242], paths=fake.paths)
    src.start()
    try:
        os.symlink(UFFD, fake.proc / "4242" / "fd" / "9")
        (fake.proc / "4242" / "fdinfo" / "9").write_text(FDINFO)
        r = src.collect()
        assert "opened userfaultfd fd 9" in " ".join(r.events)
        assert sorted(d.fd for d in r.depths) == [3, 9]
        os.unlink(fake.proc / "4242" / "fd" / "3")
        assert "closed userfaultfd fd 3" in " ".join(src.collect().events)
    finally:
        src.close()


def test_empty_proc_root_finds_nothing(tmp_path):
    src = ProcfsSource(paths=HostPaths(proc=str(tmp_path / "none")))
    src.start()
    try:
        assert src.collect().targets == ()
    finally:
        src.close()


def test_parse_stat_with_parentheses_in_comm():
    comm, fields = parse_stat("12 (a) b (c)) S 1 2 3\n")
    assert comm == "a) b (c)" and fields[:2] == ["S", "1"]


@pytest.mark.parametrize("name, idx", [("CPU 3/KVM", 3), ("fc_vcpu 2", 2), ("vcpu7", 7),
                                        ("crosvm_vcpu1", 1), ("fault-default", None), ("CPU 3", None)])
def test_vcpu_from_name(name, idx):
    assert vcpu_from_name(name) == idx


@pytest.mark.parametrize("argv, name", [
    (["qemu-system-x86_64", "-m", "64", "-name", "pctop-source,debug-threads=on"], "pctop-source"),
    (["qemu", "-name", "guest=web-7,process=qemu-web-7,debug-threads=on"], "web-7"),
    (["qemu", "-name", "debug-threads=on,guest=db"], "db"),
    (["qemu", "-name", "a,,b,debug-threads=on"], "a,b"),  # QEMU's escaped comma
    (["qemu", "-name", "process=p"], None),
    (["qemu", "-m", "64"], None),
    (["fc_vmm", "--api-sock", "/x"], None),
    (["qemu", "-name"], None),
])
def test_qemu_guest_name_reads_the_name_option(argv, name):
    from pctop.sources.procfs import qemu_guest_name
    assert qemu_guest_name(argv) == name
