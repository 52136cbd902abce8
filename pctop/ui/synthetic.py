"""Synthetic Samples of a given shape, for widget unit tests and the render
benchmark (256 vCPUs, 8 uffds). Deterministic (seeded). Not used for the
snapshot tests, which render recordings of real runs."""

from __future__ import annotations

import random

from pctop.hist import bucket_index
from pctop.model import (
    HIST_BUCKETS,
    Event,
    Migration,
    MigrationState,
    ProbeTier,
    Sample,
    StallParts,
    Target,
    UffdSample,
    VcpuSample,
)


def synthetic_sample(seq: int = 1, vcpus: int = 4, uffds: int = 1, pid: int = 4242,
                     t0: float = 1_700_000_000.0, seed: int = 7, events: tuple[Event, ...] = (),
                     tier: ProbeTier = ProbeTier.EBPF, vmm: bool = False) -> Sample:
    """vmm: give each vCPU a VMM blocktime (QEMU's, which under-reports: 70% of the stall)."""
    rnd = random.Random(seed * 1000 + seq)
    vs = []
    for i in range(vcpus):
        faults = rnd.randint(0, 4000) if i % 5 else 0
        hist = [0] * HIST_BUCKETS
        stall_ns = 0
        worst = 0.0
        for _ in range(min(faults, 200)):  # a sampled shape is enough for drawing
            us = rnd.lognormvariate(4.0 + i % 3, 0.8)
            hist[bucket_index(us)] += max(1, faults // 200)
            stall_ns += int(us * 1000) * max(1, faults // 200)
            worst = max(worst, us)
        frac = min(1.0, stall_ns / 1e9)
        vs.append(VcpuSample(
            vcpu=i, tid=pid + 1 + i, name=f"CPU {i}/KVM", identity="kvm_create_vcpu",
            faults=faults, faults_per_s=float(faults), stall_ns=stall_ns, stalled_frac=frac,
            p50_us=60.0 * (1 + i % 3) if faults else None, p90_us=200.0 if faults else None,
            p99_us=400.0 * (1 + i % 4) if faults else None, max_us=worst or None,
            hist=tuple(hist), parts=StallParts(stall_ns // 2, stall_ns // 3, stall_ns - stall_ns // 2 - stall_ns // 3),
            exits={"efault": faults // 10} if faults else {}, exits_per_s=float(faults // 10),
            vmm_blocktime_ms=stall_ns * 0.7 / 1e6 if vmm else None))
    us = tuple(UffdSample(fd=10 + k, pending_mean=rnd.random() * 3, pending_max=rnd.randint(0, 6),
                          total_mean=rnd.random() * 5, total_max=rnd.randint(0, 8),
                          msgs_read=1000, reads_per_s=1000.0 + k, installs_per_s=2000.0 + k)
               for k in range(uffds))
    mig = Migration(source="engine", state=MigrationState.POSTCOPY, pages_total=65536,
                    pages_received=min(65536, 4000 * seq), pages_demand=100 * seq,
                    pages_background=3900 * seq, bandwidth_bps=2.0e8, eta_s=max(0.0, 16.0 - seq),
                    extra={"background": "running", "bandwidth_limit_bps": 0})
    target = Target(pid=pid, comm="pctop-engine", vcpus=tuple(vs), uffds=us, handler_cpu_pct=35.0,
                    migration=mig)
    return Sample(time=t0 + seq, interval_s=1.0, seq=seq, probe_tier=tier, sources=("engine",),
                  targets=(target,), events=events)
