"""Where pctop looks for the host's pseudo-filesystems and system folders.

Every /proc, /sys, /dev, /lib/modules and /usr/src path pctop reads, and the
cache it writes (pctop/probe_build.py), goes through one HostPaths object
(psutil's PROCFS_PATH idea), so tests can point a check at a missing or fake
tree without mocking anything that exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Where a reference engine puts its control socket (engine-<pid>.sock) unless told
# otherwise, and where pctop looks for one: the engine, `pctop ctl` and the collector.
RUN_DIR = "/run/pctop"


@dataclass(frozen=True)
class HostPaths:
    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"
    lib_modules: str = "/lib/modules"
    usr_src: str = "/usr/src"
    cache: str = "/var/cache/pctop"

    @property
    def tracefs(self) -> str:
        return os.path.join(self.sys, "kernel", "tracing")

    @property
    def debugfs(self) -> str:
        return os.path.join(self.sys, "kernel", "debug")

    def proc_path(self, *parts: object) -> str:
        return os.path.join(self.proc, *map(str, parts))


DEFAULT = HostPaths(proc=os.environ.get("PCTOP_PROC", "/proc"),
                    cache=os.environ.get("PCTOP_CACHE", "/var/cache/pctop"))
