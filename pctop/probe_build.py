"""How bcc gets the running kernel's types to compile the probes: the one place that picks.

Three ways, best first:
- own headers: /lib/modules/$(uname -r)/build holds this kernel's headers (its
  include/generated/utsrelease.h names the running release), or the kernel
  carries them itself (/sys/kernel/kheaders.tar.xz, which bcc unpacks);
- BTF: the kernel's /sys/kernel/btf/vmlinux, dumped once by bpftool as
  vmlinux.h into a small include tree in the cache, which bcc is pointed at
  with BCC_KERNEL_SOURCE; no headers package is needed;
- stand-in headers: another release's headers linked at .../build by
  `pctop doctor --fix`. Enough for tracepoint-only probes, but struct layouts
  are another kernel's, so they come last.

What the tree must hold follows from how bcc 0.26 compiles: inside the kernel
folder it names, with -Iinclude, -Iarch/<arch>/include..., `-include
./include/linux/kconfig.h` first, then its own copy of the BPF UAPI (guarded by
_UAPI__LINUX_BPF_H__) and its helpers, which #include uapi/linux/bpf.h,
uapi/linux/if_packet.h, linux/version.h, linux/log2.h and asm/page.h and
demand CONFIG_BPF_SYSCALL. So kconfig.h here includes vmlinux.h (every kernel
type, including the BPF UAPI's, hence the guard is set) and defines the few
macros BTF cannot carry; the other headers are stubs.

vmlinux.h declares tens of thousands of kernel names; a probe that defines one
of them at file scope (a map called `config`, say) would not compile. Such
names are renamed inside vmlinux.h only (a small "hide" header included around
it), found by comparing the probe text's definitions with the tree's list of
kernel names.

The first BTF build of a probe text is tried in a child process (bcc 0.26
crashes the process it runs in after a fatal compiler error); if it fails,
the caller goes on to the next way instead of dying. load() tries the ways in
turn; it also decides, from the kernel, whether a read() is traced at its exit
only (task_pt_regs_usable).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

from pctop.hostpaths import DEFAULT, HostPaths

OWN, BTF, STAND_IN = "own headers", "BTF", "stand-in headers"
STALE_TMP_S = 600  # a generation older than this was killed half-way; its folder is swept


class BuildError(RuntimeError):
    """The probes, or the BTF include tree they need, could not be built; the message
    says why, in one line."""


class Way(NamedTuple):
    name: str  # OWN | BTF | STAND_IN
    detail: str  # where the types come from, one line
    kernel_dir: str | None = None  # BCC_KERNEL_SOURCE while compiling; None: bcc looks in /lib/modules


# --- finding headers -----------------------------------------------------------------------------


def headers_release(build: str) -> str | None:
    """The release a kernel build/headers folder was made for (UTS_RELEASE), if it says."""
    try:
        with open(os.path.join(build, "include", "generated", "utsrelease.h")) as f:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def _build_dir(paths: HostPaths) -> str:
    return os.path.join(paths.lib_modules, platform.release(), "build")


def headers_way(paths: HostPaths = DEFAULT) -> Way | None:
    """Own or stand-in headers where bcc looks by itself, or None."""
    rel = platform.release()
    build = _build_dir(paths)
    if os.path.isdir(os.path.join(build, "include")):
        target = os.path.realpath(build)
        made_for = headers_release(build)
        if made_for is None:  # no generated header to ask: trust the folder's name
            made_for = rel if rel in os.path.basename(target) else os.path.basename(target)
        if made_for == rel:
            return Way(OWN, f"{build} -> {target}")
        return Way(STAND_IN, f"{build} -> {target}, made for {made_for}, not {rel} "
                             "(fine for tracepoints; struct layouts may differ)")
    if os.path.exists(os.path.join(paths.sys, "kernel", "kheaders.tar.xz")):
        return Way(OWN, f"{paths.sys}/kernel/kheaders.tar.xz (CONFIG_IKHEADERS, unpacked by bcc)")
    return None


def headers_fallback_candidates(paths: HostPaths = DEFAULT) -> tuple[str, str] | None:
    """The newest Debian-style (build, source) header pair under /usr/src, if any.

    bcc only needs headers for tracepoint-only programs, so headers of another
    kernel release work when the exact ones do not exist (seen on the project's test VMs:
    Debian's 6.1 headers for a 6.18 kernel).
    """
    builds = sorted(glob.glob(os.path.join(paths.usr_src, "linux-headers-*-amd64")))
    for build in reversed(builds):
        common = build[: -len("-amd64")] + "-common"
        if os.path.isdir(os.path.join(build, "include")) or os.path.isdir(common):
            return build, common if os.path.isdir(common) else build
    generic = sorted(glob.glob(os.path.join(paths.usr_src, "linux-headers-*-generic")))
    if generic:
        return generic[-1], generic[-1]
    return None


# --- BTF -----------------------------------------------------------------------------------------


def btf_file(paths: HostPaths = DEFAULT) -> str:
    return os.path.join(paths.sys, "kernel", "btf", "vmlinux")


def bpftool() -> str | None:
    """Debian puts bpftool in /usr/sbin, which a user's PATH may lack."""
    return shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")


def cache_dir(paths: HostPaths = DEFAULT) -> str:
    """Where generated trees go: paths.cache ($PCTOP_CACHE, /var/cache/pctop) when this
    user may write there, else the user's own cache."""
    top = paths.cache
    probe = top if os.path.exists(top) else os.path.dirname(top.rstrip("/"))
    if os.access(probe, os.W_OK | os.X_OK):
        return top
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user, "pctop")


_keys: dict[tuple, str] = {}


def _btf_key(btf: str) -> str:
    """A digest of the BTF itself: a rebuilt kernel with the same release gets its own tree."""
    st = os.stat(btf)
    seen = (btf, st.st_ino, st.st_size, st.st_mtime_ns)
    if seen not in _keys:
        h = hashlib.sha256()
        with open(btf, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _keys[seen] = h.hexdigest()[:12]
    return _keys[seen]


def btf_tree(paths: HostPaths = DEFAULT) -> str:
    """The include tree for the running kernel's BTF (it may not exist yet), named
    <release>-<BTF digest>-<digest of the files pctop writes beside vmlinux.h>, so a pctop
    that writes other stubs gets its own tree."""
    own = hashlib.sha256((_KCONFIG_H + repr(sorted(_STUBS.items()))).encode()).hexdigest()[:8]
    return os.path.join(cache_dir(paths), "btf", f"{platform.release()}-{_btf_key(btf_file(paths))}-{own}")


def tree_made(tree: str) -> bool:
    return os.path.isfile(os.path.join(tree, "include", "vmlinux.h"))


def btf_way(paths: HostPaths = DEFAULT) -> Way | None:
    """The BTF way, if this kernel has BTF and its tree exists or bpftool can make it."""
    btf = btf_file(paths)
    if not os.path.isfile(btf):
        return None
    try:
        tree = btf_tree(paths)
    except OSError:
        return None
    if tree_made(tree):
        return Way(BTF, f"{btf} as vmlinux.h in {tree}", tree)
    if bpftool() is None:
        return None
    return Way(BTF, f"{btf} as vmlinux.h in {tree} (bpftool makes it at the first start)", tree)


def ways(paths: HostPaths = DEFAULT) -> list[Way]:
    """Every way this host offers, best first (own headers, BTF, stand-in headers)."""
    if os.environ.get("BCC_KERNEL_SOURCE"):  # the user chose for bcc
        return [Way(OWN, f"$BCC_KERNEL_SOURCE={os.environ['BCC_KERNEL_SOURCE']}")]
    headers = headers_way(paths)
    own = headers if headers and headers.name == OWN else None
    stand_in = headers if headers and headers.name == STAND_IN else None
    return [w for w in (own, btf_way(paths), stand_in) if w]


def _version_code(release: str) -> int:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return 0
    a, b, c = (int(x or 0) for x in m.groups())
    return (a << 16) + (b << 8) + min(c, 255)


# The files of the tree besides vmlinux.h. kconfig.h comes first in every
# compile; the rest are what bcc's helpers #include.
_KCONFIG_H = """\
/* Made by pctop (pctop/probe_build.py) from this kernel's BTF. */
#ifndef __PCTOP_BTF_KCONFIG_H
#define __PCTOP_BTF_KCONFIG_H
#define BPF_NO_PRESERVE_ACCESS_INDEX /* bcc applies no CO-RE relocations; these types are exact */
#ifdef PCTOP_BTF_HIDE
#include PCTOP_BTF_HIDE
#endif
#include <vmlinux.h>
#ifdef PCTOP_BTF_HIDE
#include PCTOP_BTF_HIDE
#endif
#define _UAPI__LINUX_BPF_H__ /* vmlinux.h has the BPF UAPI types: skip bcc's copy */
#define CONFIG_BPF_SYSCALL 1 /* this kernel loads BPF, or pctop would not be here */
/* The few macros of the kernel's compiler headers that probes use; BTF has no macros. */
#define __always_inline inline __attribute__((__always_inline__))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define NULL ((void *)0)
#define offsetof(type, member) __builtin_offsetof(type, member)
#endif
"""
_STUBS = {
    "linux/version.h": "#define KERNEL_VERSION(a, b, c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))\n"
                       "#define LINUX_VERSION_CODE {code}\n",
    "asm/page.h": "#define PAGE_SHIFT {shift}\n#define PAGE_SIZE (1UL << PAGE_SHIFT)\n",
    "linux/log2.h": "",
    "uapi/linux/bpf.h": "",
    "uapi/linux/if_packet.h": "",
}

_KERNEL_NAME = re.compile(
    r"^(?:typedef [^;{]*?\(\*(\w+)\)\("  # typedef ret (*name)(args);
    r"|typedef [^;{(]*?\b(\w+)(?:\[\d*\])*(?:\(.*)?;$"  # typedef type name; / name[N]; / name(args);
    r"|\} (\w+);$"  # end of typedef struct { ... } name;
    r"|(?:struct|union|enum) (\w+) \{"  # a tag with a body
    r"|\t(\w+) = )",  # an enumerator (struct members have no '=')
    re.M)


def kernel_names(vmlinux_h: str) -> set[str]:
    """The file-scope names vmlinux.h (bpftool's format) declares: typedefs, tags, enumerators."""
    return {next(g for g in m.groups() if g) for m in _KERNEL_NAME.finditer(vmlinux_h)}


_PROBE_NAME = re.compile(
    r'^BPF_TABLE\w*\(\s*"[^"]*"\s*,[^,]+,[^,]+,\s*(\w+)'  # BPF_TABLE("hash", key, leaf, name, ...)
    r"|^BPF_\w+\(\s*(\w+)"  # BPF_HASH(name, ...), BPF_ARRAY(name, ...), ...
    r"|^(?:struct|union|enum)\s+(\w+)\s*\{"
    r"|^(?!BPF_|TRACEPOINT_PROBE|RAW_TRACEPOINT_PROBE)[A-Za-z_][\w \t*]*?\b(\w+)\s*[(\[=;]",  # functions, globals
    re.M)


def probe_names(text: str) -> set[str]:
    """The names the probe text defines at file scope (maps, functions, globals, tags),
    written the probes' way: each definition starts in column 0."""
    return {next(g for g in m.groups() if g) for m in _PROBE_NAME.finditer(text)}


def _write_atomic(path: str, data: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _sweep(parent: str, keep: str = "") -> None:
    """Drop trees of other kernels' BTF (not those of another pctop version: it may be
    running) and whatever a killed pctop left half-made (.tmp-* older than STALE_TMP_S;
    younger ones may be another pctop's, being made)."""
    now = time.time()
    btf_part = os.path.basename(keep).rsplit("-", 1)[0] + "-" if keep else None
    for entry in os.scandir(parent):
        if btf_part and entry.name.startswith(btf_part):
            continue
        try:
            if entry.name.startswith(".tmp-") and now - entry.stat(follow_symlinks=False).st_mtime < STALE_TMP_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name.startswith(".tmp-"):
                os.unlink(entry.path)
        except FileNotFoundError:
            continue


def make_btf_tree(paths: HostPaths = DEFAULT) -> str:
    """The BTF include tree, made now if missing: built in a temporary folder beside it and
    renamed into place, so a reader sees all of it or nothing, and a racing pctop's copy wins
    harmlessly. Raises BuildError."""
    btf = btf_file(paths)
    try:
        tree = btf_tree(paths)
    except OSError as e:
        raise BuildError(f"cannot read {btf}: {e.strerror}") from None
    if tree_made(tree):
        return tree
    tool = bpftool()
    if tool is None:
        raise BuildError("bpftool not found (apt-get install bpftool)")
    parent = os.path.dirname(tree)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as e:
        raise BuildError(f"cannot write the cache {parent}: {e.strerror}") from None
    try:
        inc = os.path.join(tmp, "include")
        for sub in ("linux", "asm", "uapi/linux", "pctop"):
            os.makedirs(os.path.join(inc, sub))
        with open(os.path.join(inc, "vmlinux.h"), "w") as out:
            r = subprocess.run([tool, "btf", "dump", "file", btf, "format", "c"], stdout=out,
                               stderr=subprocess.PIPE, text=True, timeout=120)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise BuildError(f"bpftool could not dump {btf}: {why}")
        with open(os.path.join(inc, "vmlinux.h")) as f:
            names = kernel_names(f.read())
        with open(os.path.join(inc, "pctop", "kernel-names"), "w") as f:
            f.write("\n".join(sorted(names)) + "\n")
        with open(os.path.join(inc, "linux", "kconfig.h"), "w") as f:
            f.write(_KCONFIG_H)
        fields = {"code": _version_code(platform.release()),
                  "shift": (os.sysconf("SC_PAGE_SIZE") - 1).bit_length()}
        for name, text in _STUBS.items():
            with open(os.path.join(inc, name), "w") as f:
                f.write(text.format(**fields))
        os.chmod(tmp, 0o755)  # mkdtemp made it private; any user may read this cache
        try:
            os.rename(tmp, tree)
        except OSError:
            if not tree_made(tree):
                raise
            # another pctop renamed its identical tree into place first
    except OSError as e:
        raise BuildError(f"cannot make {tree}: {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"bpftool took over 120 s to dump {btf}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
    _sweep(parent, keep=tree)
    return tree


def btf_cflags(tree: str, text: str) -> list[str]:
    """Flags for compiling `text` against `tree`: PCTOP_BTF, and the hide header for the
    kernel names the text defines too (written once per set of names)."""
    with open(os.path.join(tree, "include", "pctop", "kernel-names")) as f:
        clash = sorted(probe_names(text) & set(f.read().split()))
    flags = ["-DPCTOP_BTF"]
    if not clash:
        return flags
    digest = hashlib.sha256(" ".join(clash).encode()).hexdigest()[:12]
    rel = f"pctop/hide-{digest}.h"
    path = os.path.join(tree, "include", rel)
    if not os.path.exists(path):
        lines = ["/* Kernel names the probes define too: renamed inside vmlinux.h only. */",
                 "#ifndef PCTOP_BTF_HIDDEN", "#define PCTOP_BTF_HIDDEN"]
        lines += [f"#define {n} pctop_kernel_{n}" for n in clash]
        lines += ["#else"] + [f"#undef {n}" for n in clash] + ["#endif", ""]
        _write_atomic(path, "\n".join(lines))
    return flags + [f'-DPCTOP_BTF_HIDE="{rel}"']


@contextmanager
def kernel_source(way: Way) -> Iterator[None]:
    """BCC_KERNEL_SOURCE names the way's folder while bcc compiles (bcc reads only that)."""
    if way.kernel_dir is None:
        yield
        return
    before = os.environ.get("BCC_KERNEL_SOURCE")
    os.environ["BCC_KERNEL_SOURCE"] = way.kernel_dir
    try:
        yield
    finally:
        if before is None:
            del os.environ["BCC_KERNEL_SOURCE"]
        else:
            os.environ["BCC_KERNEL_SOURCE"] = before


# Compiles and loads in a child: bcc 0.26 crashes its process (SIGSEGV) after a fatal
# compiler error, so a tree this kernel's vmlinux.h breaks must fail there, not in pctop.
_TRIAL = """
import sys
from bcc import BPF
BPF(text=sys.stdin.read().encode(), cflags=sys.argv[1:]).cleanup()
"""


def _trial_build(tree: str, text: str, cflags: list[str]) -> None:
    """Build `text` with `tree` once in a child process; a marker in the tree remembers
    success for this text and these flags, so later starts skip it. Raises BuildError."""
    digest = hashlib.sha256("\0".join([text, *cflags]).encode()).hexdigest()[:16]
    marker = os.path.join(tree, "include", "pctop", f"built-{digest}")
    if os.path.exists(marker):
        return
    import sys

    env = dict(os.environ, BCC_KERNEL_SOURCE=tree, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        r = subprocess.run([sys.executable, "-c", _TRIAL, *cflags], input=text, capture_output=True,
                           text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        raise BuildError("the trial build took over 300 s") from None
    if r.returncode != 0:
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        why = errors[0].strip() if errors else (r.stderr.strip().splitlines() or ["no output"])[-1]
        how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
        raise BuildError(f"trial build failed ({how}): {why}")
    try:
        _write_atomic(marker, "")
    except OSError:
        pass  # only a cache: the next start tries again


def prepare(way: Way, text: str, cflags: list[str], paths: HostPaths = DEFAULT) -> list[str]:
    """Make what `way` needs to compile `text`: the cflags to compile with. For BTF that is
    the tree, and a trial build the first time. Raises BuildError."""
    if way.name != BTF or way.kernel_dir is None:
        return cflags
    tree = make_btf_tree(paths)
    try:
        _sweep(os.path.join(tree, "include", "pctop"))  # files written after the tree
        flags = cflags + btf_cflags(tree, text)
    except OSError as e:
        raise BuildError(f"cannot use {tree}: {e.strerror}") from None
    _trial_build(tree, text, flags)
    return flags


# read()'s arguments come from the saved user registers at its exit where the kernel
# has bpf_get_current_task_btf (5.11, needs its BTF) and bpf_task_pt_regs (5.15); the
# probes then leave sys_enter_read alone (probes/pctop_handler.c, read_at_exit, which
# names x86-64's registers).
TASK_PT_REGS = "-DHAVE_TASK_PT_REGS"
TASK_PT_REGS_SINCE = (5, 15)


def kernel_version(release: str) -> tuple[int, int] | None:
    """"6.18.44-fc-v1300" -> (6, 18); None if the release does not start with two numbers."""
    parts = release.split(".", 2)
    try:
        return int(parts[0]), int("".join(itertools.takewhile(str.isdigit, parts[1])))
    except (IndexError, ValueError):
        return None


def task_pt_regs_usable(paths: HostPaths = DEFAULT, release: str | None = None,
                        machine: str | None = None) -> bool:
    """Can the probes read a syscall's saved registers (x86-64, kernel BTF, 5.15 or later)?"""
    version = kernel_version(release or platform.release())
    return ((machine or platform.machine()) == "x86_64" and version is not None
            and version >= TASK_PT_REGS_SINCE and os.path.isfile(btf_file(paths)))


class Built(NamedTuple):
    bpf: Any  # the loaded bcc.BPF
    way: Way
    reads_at_exit: bool  # built with TASK_PT_REGS
    events: tuple[str, ...]  # what the build tried and chose, one line each


def load(BPF, text: str, cflags: list[str], paths: HostPaths = DEFAULT) -> Built:
    """Compile and load the probes with bcc's BPF class the best way this host offers; a
    way that fails gives way to the next, so stand-in headers stay the last resort. A build
    with TASK_PT_REGS that fails is tried once more without it (a kernel whose verifier
    refuses those helpers). Raises BuildError when no way builds."""
    failed: list[str] = []
    for way in ways(paths):
        refused = False
        try:
            flags = prepare(way, text, cflags, paths)
            with kernel_source(way):
                try:
                    bpf = BPF(text=text.encode(), cflags=flags)
                except Exception:
                    if TASK_PT_REGS not in flags:
                        raise
                    flags = [f for f in flags if f != TASK_PT_REGS]
                    bpf = BPF(text=text.encode(), cflags=flags)
                    refused = True
        except Exception as e:  # bcc raises a bare Exception when clang fails
            failed.append(f"{way.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if way.name == BTF:  # its detail no longer says "at the first start"
            way = btf_way(paths) or way
        events = [f"probes did not build with {f}" for f in failed]
        if refused:
            events.append("probes read read()'s arguments at its entry: this kernel refused bpf_task_pt_regs")
        events.append(f"probes built with {way.name}: {way.detail}")
        return Built(bpf, way, TASK_PT_REGS in flags, tuple(events))
    raise BuildError("probes did not build: " + ("; ".join(failed) or "no kernel headers or BTF"))
