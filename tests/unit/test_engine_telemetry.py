"""Engine telemetry: per-vCPU stall accounting into QEMU's log2 buckets, and the counters dict."""

from pctop.engine.telemetry import Telemetry


def test_stalls_land_in_log2_microsecond_buckets_per_vcpu():
    t = Telemetry(vcpus=2, pages_total=10, page_size=4096)
    t.stall(0, 500)  # 0.5 us -> bucket 0
    t.stall(0, 3_000)  # 3 us -> [2, 4) = bucket 1
    t.stall(1, 1_500_000)  # 1500 us -> [1024, 2048) = bucket 10
    t.stall(7, 9_000)  # not a vCPU
    c = t.counters()
    v0, v1 = c["per_vcpu"]
    assert (v0["faults"], v0["stall_ns"], v0["max_ns"]) == (2, 3_500, 3_000)
    assert v0["hist"][0] == 1 and v0["hist"][1] == 1 and sum(v0["hist"]) == 2
    assert v1["hist"][10] == 1 and len(v1["hist"]) == 24
    assert c["faults_total"] == 3 and c["other_faults"] == 1


def test_installed_pages_split_by_path_and_count_races():
    t = Telemetry(vcpus=1, pages_total=10, page_size=4096)
    t.installed(demand=2, background=0, prefetch=0, eexist=1)
    t.installed(demand=0, background=5, prefetch=1, eexist=0)
    c = t.counters()
    assert (c["pages_demand"], c["pages_background"], c["pages_prefetch"], c["eexist"]) == (2, 6, 1, 1)
    assert c["pages_received"] == 8 and c["bytes_received"] == 8 * 4096
    assert t.stream_first is not None and t.stream_last >= t.stream_first
