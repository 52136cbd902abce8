"""`pctop demo`: run the reference engine, a real post-copy migration of a real KVM guest.

`pctop demo` opens the dashboard on the run (the engine then runs as a
`--headless` child process). `--headless`: a progress line on stderr (only on
a terminal), then a summary; with --json, JSON Lines on stdout: a "start"
line, a "progress" line per second and a final "summary" line.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import click

from pctop import exits
from pctop.cli.common import HELP, SIZE, Command, UsageError
from pctop.sizes import format_size

DEFAULTS = dict(memory="1G", vcpus=2, bandwidth="16M", pattern="hotset")
# The options `demo --vmm qemu` takes (the others shape the reference engine's run).
QEMU_OPTIONS = ("vmm", "headless", "as_json", "bandwidth", "accel")


@click.command("demo", cls=Command, context_settings=HELP)
@click.option("--headless", is_flag=True, help="No TUI: a progress line, then the summary.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout: start, progress each second, summary last.")
@click.option("--memory", type=SIZE, default=DEFAULTS["memory"], show_default=True,
              help="Guest memory to migrate (K/M/G = powers of 1024).")
@click.option("--vcpus", type=click.IntRange(1, 64), default=DEFAULTS["vcpus"], show_default=True)
@click.option("--strategy", type=click.Choice(["uffd", "sharded", "vcpu-exit"]), default="uffd",
              show_default=True, help="uffd: one uffd, --readers threads; sharded: a uffd and reader per "
              "vCPU shard; vcpu-exit: the vCPU fetches its own page when KVM_RUN returns.")
@click.option("--readers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Reader threads on the shared uffd (strategy uffd only).")
@click.option("--pattern", type=click.Choice(["seq", "random", "hotset"]), default=DEFAULTS["pattern"],
              show_default=True)
@click.option("--write-ratio", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Share of guest accesses that write.")
@click.option("--bandwidth", type=SIZE, default=DEFAULTS["bandwidth"], show_default=True,
              help="Background stream bytes/s; 0 = unlimited.")
@click.option("--no-background", is_flag=True, help="No background stream: every first touch is a demand fault.")
@click.option("--latency", "latency_us", type=click.IntRange(0, 10_000_000), default=0, show_default=True,
              metavar="US", help="Microseconds the source adds to every demand reply: a real link's round "
                                 "trip (the demo's link is loopback).")
@click.option("--prefetch", type=click.IntRange(0, 512), default=0, show_default=True,
              help="Pages after each demand fault the stream sends first.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Stop the guest after S seconds, pull the remaining pages, verify.")
@click.option("--pin", is_flag=True, help="Pin each vCPU and the threads serving its faults to one CPU "
              "(faster on a quiet machine; much slower if another busy process shares that CPU).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=1, show_default=True)
@click.option("--control", metavar="PATH", help="Control socket (JSON Lines). Default /run/pctop/engine-<pid>.sock.")
@click.option("--workload", type=click.Choice(["auto", "kvm", "threads"]), default="auto", show_default=True,
              help="auto: the KVM guest when /dev/kvm exists, else threads.")
@click.option("--corrupt-page", type=click.IntRange(min=0), hidden=True)
@click.option("--vmm", type=click.Choice(["engine", "qemu"]), default="engine", show_default=True,
              help="qemu: migrate a tiny guest between two real QEMUs instead (docs/qemu.md); of the "
                   "options above only --headless, --json and --bandwidth (post-copy cap) apply.")
@click.option("--accel", type=click.Choice(["kvm", "tcg"]), help="--vmm qemu: accelerator (default kvm "
              "when /dev/kvm exists, else tcg).")
def demo(headless, as_json, memory, vcpus, strategy, readers, pattern, write_ratio, bandwidth,
         no_background, latency_us, prefetch, duration, pin, seed, control, workload, corrupt_page, vmm, accel):
    """Run a real post-copy migration of a KVM guest between two processes and verify every page.

    The defaults (1G, 2 vCPUs, a 16M/s background stream, a hot set taking most accesses,
    10 % writes) make a run of about 20-30 s on a 2-CPU machine: long enough to watch the
    fault storm, the stream catching up and the stalls fading. Exit status: 0 verified, 1 failed
    (integrity or engine error), 2 bad usage, 130 quit (q) or interrupted (Ctrl+C) before the end,
    143/129 ended by SIGTERM/SIGHUP.
    """
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if vmm == "qemu":
        ignored = [p.opts[0] for p in given if p.name not in QEMU_OPTIONS]
        if ignored:
            raise UsageError("demo", f"{', '.join(ignored)}: not for --vmm qemu, whose guest is fixed (2 vCPUs, "
                                      f"16 MiB written); it takes --headless, --json, --bandwidth, --accel")
        _run_qemu(ctx, headless, as_json, accel, bandwidth)
    if accel is not None:
        raise UsageError("demo", "--accel is for --vmm qemu "
                                  "(the engine's guest runs on KVM, else threads: --workload)")
    _check_engine_options("demo", memory, vcpus, workload, control=control)
    if not headless and not as_json and not (sys.stdout.isatty() and sys.stdin.isatty()):
        # No terminal to draw on (a pipe, CI, a script): the headless run says the same.
        click.echo("pctop demo: no terminal, running --headless", err=True)
        headless = True
    if not headless and not as_json:
        _run_with_tui(click.get_current_context(), control)
    run_engine("demo", as_json, memory=memory, vcpus=vcpus, strategy=strategy, readers=readers, pattern=pattern,
               write_ratio=write_ratio, bandwidth=bandwidth, no_background=no_background, prefetch=prefetch,
               duration=duration, pin=pin, seed=seed, control=control, workload=workload,
               corrupt_page=corrupt_page, latency_us=latency_us)


def _check_engine_options(command: str, memory: int, vcpus: int, workload: str, copies: int = 2,
                          control: str | None = None) -> None:
    """copies: how many times `memory` this host holds (the demo: the source's image and the guest)."""
    folder = os.path.dirname(control or "")
    if folder and not os.path.isdir(folder):
        raise UsageError(command, f"--control {control}: the folder {folder} does not exist")
    if memory < 4096 * vcpus or memory % 4096:
        raise UsageError(command, f"--memory must be a multiple of 4K with at least 4K per vCPU, got {memory}")
    room = available_memory()
    if room is not None and memory * copies > room:
        held = "the source's image and the guest's memory, both on this host" if copies == 2 else "the guest"
        raise UsageError(command, f"--memory {format_size(memory)} needs {format_size(memory * copies)} ({held}); "
                                   f"this machine has {format_size(room)} available (MemAvailable + SwapFree)")
    if workload == "kvm" and not os.path.exists("/dev/kvm"):
        raise UsageError(command, "--workload kvm needs /dev/kvm, which is missing")


def run_engine(command: str, as_json: bool, *, memory, vcpus, strategy, readers, pattern, write_ratio,
               bandwidth, no_background, duration, pin, seed, control, workload, prefetch=0,
               corrupt_page=None, latency_us: int = 0, link: dict | None = None) -> None:
    """Run the engine headless (progress on a terminal, or JSON Lines) and exit with its
    status. `link`: EngineConfig fields of the link (pctop engine dest)."""
    import socket
    import time

    from pctop import __version__
    from pctop.engine.control import default_path
    from pctop.engine.run import Engine, EngineConfig, EngineError
    from pctop.model import Header, ProbeTier

    _check_engine_options(command, memory, vcpus, workload, copies=1 if link else 2, control=control)
    cfg = EngineConfig(memory=memory, vcpus=vcpus, strategy=strategy, readers=readers, pattern=pattern,
                       write_ratio=write_ratio, bandwidth=bandwidth, background=not no_background,
                       prefetch=prefetch, duration=duration, seed=seed, control=control, workload=workload,
                       corrupt_page=corrupt_page, pin=pin, **{"latency_us": latency_us, **(link or {})})
    if control is None and not _can_create_in(os.path.dirname(default_path())):
        # Degrade, and say so: the run goes on without a control socket.
        click.echo(f"pctop {command}: no control socket: {os.path.dirname(default_path())} is not writable by "
                   f"uid {os.geteuid()} (--control PATH puts one elsewhere)", err=True)
        cfg.control = ""
    log = (lambda m: click.echo(f"pctop {command}: {m}", err=True)) if link else None
    engine = Engine(cfg, log=log)
    kind = "kvm" if engine.workload_cls.__name__ == "KvmWorkload" else "threads"
    if kind == "threads":
        why = "as asked" if workload == "threads" else "/dev/kvm not available"
        click.echo(f"pctop {command}: {why}, running the thread workload (workload: threads)", err=True)
    exits.raise_on_termination()
    tty = sys.stderr.isatty()

    def emit(obj: dict) -> None:
        click.echo(json.dumps(obj))

    if as_json:
        # The header every pctop JSON Lines stream starts with (docs/schema.md); no
        # probes here: the engine's own counters follow.
        # "pid" (the engine's) as on the start line: readers take it from the first line.
        emit({**Header(host=socket.gethostname(), kernel=os.uname().release, probe_tier=ProbeTier.NONE,
                       sources=("engine",), started=time.time(), pctop_version=__version__).to_dict(),
              "pid": os.getpid()})
        emit({"type": "start", "pid": os.getpid(), "strategy": strategy, "vcpus": vcpus, "readers": readers,
              "memory": memory, "pages_total": memory // 4096, "pattern": pattern, "write_ratio": write_ratio,
              "bandwidth_limit_bps": bandwidth, "background": not no_background, "workload": kind,
              # vcpu-exit: memory_fault once a kernel fills it; the progress lines say what was used
              "address_source": "guest-assisted" if strategy == "vcpu-exit" else "uffd",
              "control": control or "default", "seed": seed,
              **({"connect": link["connect"], "auto_recover": link["auto_recover"]} if link else {})})

    def tick(e) -> None:
        st = e.status()
        if as_json:
            st["type"] = "progress"
            st.pop("ok", None)
            emit(st)
        if tty:
            pct = 100 * st["pages_received"] / st["pages_total"]
            sys.stderr.write(f"\r{st['state']:9} {pct:5.1f}% {st['pages_received']}/{st['pages_total']} pages "
                             f"demand {st['pages_demand']} faults {st['faults_total']} "
                             f"({st['fault_rate']:.0f}/s) bg {format_size(st['bandwidth_bps'])}/s \x1b[K")
            sys.stderr.flush()

    try:
        s = engine.run(on_tick=tick, tick_s=1.0)
    except KeyboardInterrupt as e:  # Ctrl+C, SIGTERM, SIGHUP: the engine has torn down
        if tty:
            sys.stderr.write("\n")
        arrived = engine.pages_arrived()
        got = f"{arrived}/{engine.npages} pages had arrived" if arrived is not None else "nothing had started"
        click.echo(f"pctop {command}: {exits.what(e)} before the migration finished ({got}); not verified",
                   err=True)
        sys.exit(exits.status_of(e))
    except (EngineError, OSError, RuntimeError, ValueError) as e:
        if tty:
            sys.stderr.write("\n")
        click.echo(f"pctop {command}: error: {_explain(e)}", err=True)
        sys.exit(1)
    if tty:
        sys.stderr.write("\n")
    if as_json:
        emit(s)
    else:
        _print_summary(s)
    sys.exit(0 if s["ok"] else 1)


def _can_create_in(folder: str) -> bool:
    """Could this process create a file in `folder` (or create `folder` itself)?"""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder.rstrip("/"))
    return os.access(folder or "/", os.W_OK | os.X_OK)


def _explain(e: BaseException) -> str:
    """An error in words a user can act on (which path, what to do)."""
    from pctop.engine.uffd import UffdError

    if isinstance(e, UffdError) and e.errno in (errno.EPERM, errno.EACCES):
        return (f"userfaultfd is not allowed for uid {os.geteuid()} ({os.strerror(e.errno)}); run as root, or "
                "sysctl vm.unprivileged_userfaultfd=1, or give this user /dev/userfaultfd (pctop doctor)")
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.strerror or ""):
        return f"{e.filename}: {e.strerror}"
    return str(e)


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes this host can still give a process (MemAvailable + SwapFree), None if unknown."""
    try:
        with open(meminfo) as f:
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return (kib["MemAvailable"] + kib.get("SwapFree", 0)) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _run_with_tui(ctx: click.Context, control: str | None) -> None:
    """The dashboard (pctop.ui) on this run: the engine is this same command,
    --headless, in a child process, so it never shares a GIL with the UI."""
    import tempfile

    from pctop import root
    from pctop.sources.engine import EngineUnreachable

    argv = [sys.executable, "-m", "pctop", "demo", "--headless"]
    for p in ctx.command.params:  # the options given, passed on as given
        v = ctx.params.get(p.name)
        if isinstance(p, click.Option) and p.name not in ("headless", "as_json", "control") \
                and v is not None and v != p.default and not (p.is_flag and not v):
            argv += [p.opts[0]] if p.is_flag else [p.opts[0], str(v)]
    with tempfile.TemporaryDirectory(prefix="pctop-demo-") as tmp:
        path = control or os.path.join(tmp, "engine.sock")
        try:
            # The engine's own temporary folders go inside ours (TMPDIR), so they go with it
            # even if the engine is killed before it can remove them.
            rc = root.run_engine_demo(argv + ["--control", path], path, env={**os.environ, "TMPDIR": tmp})
        except EngineUnreachable as e:
            click.echo(f"pctop demo: error: {e}", err=True)
            sys.exit(1)
    if rc is None:
        click.echo("pctop demo: quit before the migration finished; not verified", err=True)
        sys.exit(exits.INTERRUPTED)
    if rc < 0:  # the engine died of a signal (a crash, a kill): a failed run
        import signal
        click.echo(f"pctop demo: error: the engine was ended by {signal.Signals(-rc).name}; not verified", err=True)
        sys.exit(exits.FAILED)
    sys.exit(rc)


def _run_qemu(ctx: click.Context, headless: bool, as_json: bool, accel: str | None, bandwidth: int) -> None:
    from pctop import root
    from pctop.qemu.launch import default_accel, qemu_unavailable_reason

    accel = accel or default_accel()
    why = qemu_unavailable_reason(accel)
    if why:
        click.echo(f"pctop demo: error: {why}", err=True)
        sys.exit(1)
    given = ctx.get_parameter_source("bandwidth") == click.core.ParameterSource.COMMANDLINE
    mode = "json" if as_json else "headless" if headless else "tui"
    sys.exit(root.run_qemu_demo(mode, accel, bandwidth if given and bandwidth else None))


def _print_summary(s: dict) -> None:
    ok = "verified" if s["ok"] else "FAILED"
    click.echo(f"{ok}: {s['pages_verified']}/{s['pages_total']} pages, {s['mismatches']} mismatches "
               f"({s['strategy']}, {s['vcpus']} vCPUs, workload {s['workload']}, "
               f"address source {s['address_source']})")
    click.echo(f"faults {s['faults_total']} ({s['fault_rate']:.0f}/s while vCPUs ran), per vCPU {s['faults_per_vcpu']}")
    p50, p99 = s.get("stall_us_p50"), s.get("stall_us_p99")
    pct = f", p50 {p50:.0f} us, p99 {p99:.0f} us" if p50 is not None and p99 is not None else ""
    # Two definitions of a stall meet here: say which one this is (docs/engine-control.md).
    click.echo(f"engine stall (fault seen by the engine -> page installed) ms per vCPU "
               f"{[round(n / 1e6, 1) for n in s['stall_ns_per_vcpu']]}{pct}; the dashboard's stall "
               f"(eBPF: fault -> vCPU running again) is longer: it adds the wait for a reader and the run queue")
    click.echo(f"pages demand {s['pages_demand']}, background {s['pages_background']}, "
               f"EEXIST races {s['eexist']}, elapsed {s['elapsed_s']:.1f} s")
    for m in s["mismatch_list"]:
        click.echo(f"mismatch: page {m[0]}: {m[1]}")
    for err in s["errors"]:
        click.echo(f"error: {err}")
