"""Fault-resolution strategies: which uffds, which threads, which channels.

- `uffd`: one uffd over all guest memory, N reader threads on it, each with its
  own demand channel and receiver (the "one uffd, reader per vCPU" set-up of the
  kernel's demand-paging selftest when N = vCPUs).
- `sharded`: guest memory cut into one contiguous shard per vCPU, one uffd and
  one reader per shard, and one demand channel + receiver per shard, so shards
  share nothing on the destination (the workload's "sharded" layout gives vCPU
  i shard i).
- `vcpu-exit`: one uffd with UFFD_FEATURE_SIGBUS over all memory: a missing
  page makes KVM_RUN return instead of sleeping; the vCPU thread itself
  requests the page on its own channel, installs it and re-enters the guest.
  No reader threads. The background stream installs through the same uffd.
All strategies share one background channel whose receiver installs streamed pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from pctop.engine.uffd import Uffd

STRATEGIES = ("uffd", "sharded", "vcpu-exit")


@dataclass
class Layout:
    """What a strategy needs set up; run.py builds the threads from it."""

    shards: list[tuple[Uffd, int, int]]  # (uffd, first page, end page), covering all pages in order
    demand_channels: int  # uffd/sharded: one per reader group; vcpu-exit: one per vCPU
    readers: list[tuple[int, int]]  # (shard index, demand channel index) per reader thread
    vcpu_exit: bool


def shard_bounds(npages: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) page ranges, as equal as possible (the workload shards the same way)."""
    return [(npages * i // parts, npages * (i + 1) // parts) for i in range(parts)]


def build(strategy: str, base: int, npages: int, page_size: int, vcpus: int, readers: int) -> Layout:
    """Create and register the uffds for a strategy. The caller closes them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    made: list[Uffd] = []
    try:
        if strategy == "sharded":
            shards = []
            for lo, hi in shard_bounds(npages, vcpus):
                uf = Uffd(thread_id=True)
                made.append(uf)
                uf.register(base + lo * page_size, (hi - lo) * page_size)
                shards.append((uf, lo, hi))
            return Layout(shards, vcpus, [(i, i) for i in range(vcpus)], False)
        uf = Uffd(thread_id=True, sigbus=strategy == "vcpu-exit")
        made.append(uf)
        uf.register(base, npages * page_size)
        if strategy == "vcpu-exit":
            return Layout([(uf, 0, npages)], vcpus, [], True)
        # Each reader gets its own demand channel and receiver (pinned with it), so a
        # fault read on one CPU is fetched and installed on that CPU.
        return Layout([(uf, 0, npages)], readers, [(0, i) for i in range(readers)], False)
    except BaseException:
        for uf in made:
            uf.close()
        raise
