"""Two network namespaces joined by a veth pair: a private link for engine tests and bench.

Everything sent on it stays between the two namespaces this module creates
(10.213.N.1 <-> 10.213.N.2, addresses that exist nowhere else). Faults on the link:
- delay and loss with `tc netem` where the kernel has it;
- where it does not (this project's machines: CONFIG_NET_SCH_NETEM is off,
  `tc qdisc add ... netem` fails "Specified qdisc kind is unknown"), loss comes
  from an nftables rule (`numgen random mod 100 < N drop`) and delay from the
  engine's own `latency` control; `netem_available()` says which applies;
- a dead link: `ip link set DEV down` or an nftables drop-all rule (silent: no
  FIN, no RST, the peer only notices by missing heartbeats).
Usage: `with VethLink() as link: link.run_in("a", argv)`; the namespaces are
deleted on exit even when the body fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess

_IP = shutil.which("ip") or "/usr/sbin/ip"
_NFT = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=20)


def can_make_netns() -> str | None:
    """None when namespaces and veth pairs can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not os.path.exists(_IP):
        return "iproute2 (`ip`) is not installed"
    name = f"pctop-probe-{os.getpid()}"
    r = _sh(_IP, "netns", "add", name, check=False)
    if r.returncode:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _sh(_IP, "netns", "del", name, check=False)
    return None


def _move_in(ns: str, dev: str, addr: str) -> None:
    """Move a veth end into a namespace, give it a /30 address and bring it (and lo) up."""
    _sh(_IP, "link", "set", dev, "netns", ns)
    _sh(_IP, "-n", ns, "addr", "add", addr + "/30", "dev", dev)
    _sh(_IP, "-n", ns, "link", "set", dev, "up")
    _sh(_IP, "-n", ns, "link", "set", "lo", "up")


class _Namespaces:
    """Made on entry, deleted on exit, also when making them fails half-way."""

    def __enter__(self):
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VethLink(_Namespaces):
    def __init__(self, tag: str = ""):
        n = os.getpid() % 250 + 1
        self.ns = {"a": f"pctop{tag}a{os.getpid()}", "b": f"pctop{tag}b{os.getpid()}"}
        self.dev = {"a": f"pt{tag}a{os.getpid() % 100000}", "b": f"pt{tag}b{os.getpid() % 100000}"}
        self.addr = {"a": f"10.213.{n}.1", "b": f"10.213.{n}.2"}
        self._nft_tables: set[str] = set()

    # --- set-up / tear-down ---
    def _make(self) -> None:
        for side in "ab":
            _sh(_IP, "netns", "add", self.ns[side])
        _sh(_IP, "link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
        for side in "ab":
            _move_in(self.ns[side], self.dev[side], self.addr[side])

    def close(self) -> None:
        for side in "ab":  # deleting a namespace deletes its end of the veth pair, and so the pair
            _sh(_IP, "netns", "del", self.ns[side], check=False)

    # --- running things inside ---
    def prefix(self, side: str) -> list[str]:
        return [_IP, "netns", "exec", self.ns[side]]

    def popen(self, side: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.prefix(side) + argv, **kw)

    # --- faults ---
    def set_link(self, up: bool) -> None:
        """Take side b's end of the veth down (both ends lose carrier) or up again."""
        _sh(_IP, "-n", self.ns["b"], "link", "set", self.dev["b"], "up" if up else "down")

    def netem_available(self) -> bool:
        r = _sh(_IP, "netns", "exec", self.ns["a"], "tc", "qdisc", "add", "dev", self.dev["a"], "root",
                "netem", "delay", "0ms", check=False)
        if r.returncode == 0:
            _sh(_IP, "netns", "exec", self.ns["a"], "tc", "qdisc", "del", "dev", self.dev["a"], "root", check=False)
        return r.returncode == 0

    @staticmethod
    def nft_available() -> bool:
        return _NFT is not None

    def _nft(self, side: str, *args: str) -> None:
        _sh(_IP, "netns", "exec", self.ns[side], _NFT, *args)

    def nft_drop(self, side: str, percent: int) -> None:
        """Drop `percent` % of the packets side sends (100 = a silent dead link); 0 removes the rule."""
        if _NFT is None:
            raise RuntimeError("nft is not installed")
        table = "pctopfault"
        if side in self._nft_tables:
            self._nft(side, "delete", "table", "inet", table)
            self._nft_tables.discard(side)
        if percent <= 0:
            return
        self._nft(side, "add", "table", "inet", table)
        self._nft_tables.add(side)
        self._nft(side, "add", "chain", "inet", table, "out", "{ type filter hook output priority 0 ; }")
        if percent >= 100:
            self._nft(side, "add", "rule", "inet", table, "out", "oifname", self.dev[side], "drop")
        else:
            self._nft(side, "add", "rule", "inet", table, "out", "oifname", self.dev[side],
                      "numgen", "random", "mod", "100", "<", str(percent), "drop")


class HostNs(_Namespaces):
    """One network namespace joined to the root namespace by a veth pair: a stand-in "host"
    that a process in the root namespace (a Prometheus) reaches at `addr`
    (10.214.N.2; the root end is 10.214.N.1, N picked per tag and test process).
    Processes inside still share the machine's pids and files (they see every QEMU)."""

    def __init__(self, tag: str, n: int):
        self.ns = f"pctop{tag}{os.getpid()}"
        self.dev = (f"ph{tag}{os.getpid() % 10000}", f"pn{tag}{os.getpid() % 10000}")
        self.root_addr, self.addr = f"10.214.{n}.1", f"10.214.{n}.2"

    def _make(self) -> None:
        _sh(_IP, "netns", "add", self.ns)
        _sh(_IP, "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        _sh(_IP, "addr", "add", self.root_addr + "/30", "dev", self.dev[0])
        _sh(_IP, "link", "set", self.dev[0], "up")
        _move_in(self.ns, self.dev[1], self.addr)

    def close(self) -> None:
        _sh(_IP, "netns", "del", self.ns, check=False)  # takes its end of the pair, and so the pair
        _sh(_IP, "link", "del", self.dev[0], check=False)  # in case the move into the namespace failed
