"""NDJSON writer and recording reader: round trips, damaged files, incremental loading."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pctop.model import (
    HIST_BUCKETS,
    SCHEMA_VERSION,
    Event,
    Header,
    Migration,
    MigrationState,
    ProbeTier,
    Sample,
    StallParts,
    Target,
    UffdSample,
    VcpuSample,
)
from pctop.sinks.ndjson import NdjsonWriter, dumps
from pctop.sources.replay import Recording, RecordingError, load_recording, parse_record
from tests.helpers.headers import DEGRADED

ints = st.integers(min_value=0, max_value=2**53)
floats = st.floats(min_value=0, max_value=1e12, allow_nan=False)
opt_floats = st.none() | floats
names = st.text(max_size=12)

vcpus = st.builds(
    VcpuSample, vcpu=st.none() | st.integers(0, 512), tid=st.integers(1, 2**22), name=names,
    identity=st.sampled_from(["unknown", "debugfs", "thread_name", "engine", "kvm_create_vcpu"]),
    faults=ints, faults_per_s=floats, stall_ns=ints, stalled_frac=st.floats(0, 1),
    p50_us=opt_floats, p90_us=opt_floats, p99_us=opt_floats, max_us=opt_floats,
    hist=st.tuples(*[ints] * HIST_BUCKETS), parts=st.builds(StallParts, ints, ints, ints),
    faults_no_read=ints, exits=st.dictionaries(st.sampled_from(["mmio", "io", "efault"]), ints),
    exits_per_s=floats, memory_fault_exits=ints)
page_runs = st.none() | st.lists(st.tuples(ints, ints), max_size=3).map(tuple)
uffds = st.builds(UffdSample, fd=st.integers(0, 65535), pending_mean=floats, pending_max=ints,
                  total_mean=floats, total_max=ints, msgs_read=ints, pages_installed=ints,
                  bytes_per_s=floats, installed_ranges=page_runs, page_map_lost=st.none() | ints)
migrations = st.builds(Migration, source=st.sampled_from(["engine", "qmp"]), state=st.sampled_from(list(MigrationState)),
                       pages_total=st.none() | ints, pages_received=st.none() | ints,
                       bandwidth_bps=opt_floats, eta_s=opt_floats,
                       extra=st.dictionaries(names, st.none() | ints | names, max_size=3))
targets = st.builds(Target, pid=st.integers(1, 2**22), comm=names,
                    vcpus=st.lists(vcpus, max_size=3).map(tuple),
                    uffds=st.lists(uffds, max_size=2).map(tuple),
                    handler_cpu_pct=opt_floats, migration=st.none() | migrations,
                    registered_ranges=page_runs)
samples = st.builds(Sample, time=floats, interval_s=floats, seq=ints,
                    probe_tier=st.sampled_from(list(ProbeTier)),
                    sources=st.lists(names, max_size=3).map(tuple),
                    targets=st.lists(targets, max_size=2).map(tuple),
                    events=st.lists(st.builds(Event, floats, names, names), max_size=2).map(tuple))


def sample(seq: int) -> Sample:
    return Sample(time=float(seq), interval_s=1.0, seq=seq, probe_tier="procfs", sources=("procfs",),
                  targets=(Target(pid=7, comm="q", uffds=(UffdSample(fd=3, pending_max=seq),)),))


@settings(max_examples=60, deadline=None)
@given(samples)
def test_sample_round_trips_through_one_json_line(s):
    line = dumps(s)
    assert "\n" not in line
    assert parse_record(line, "t") == s


def test_header_round_trip_and_required_line_fields():
    assert parse_record(dumps(DEGRADED), "t") == DEGRADED
    d = json.loads(dumps(sample(1)))
    assert d["type"] == "sample" and d["interval_s"] == 1.0
    assert set(d["targets"][0]["uffds"][0]) >= {"fd", "pending_mean", "pending_max", "total_mean",
                                                 "total_max", "msgs_read", "pages_installed"}


def test_page_ranges_are_left_out_unless_measured_and_round_trip_when_they_are():
    plain = json.loads(dumps(sample(1)))
    t, u = plain["targets"][0], plain["targets"][0]["uffds"][0]
    # without --page-ranges the lines do not grow
    assert "registered_ranges" not in t and "installed_ranges" not in u and "page_map_lost" not in u
    measured = Sample(time=1.0, interval_s=1.0, seq=1, probe_tier="ebpf", sources=("ebpf",), targets=(
        Target(pid=7, comm="q", registered_ranges=((0x7f0000000000, 4096),),
               uffds=(UffdSample(fd=3, installed_ranges=((0x7f0000001000, 2), (0x7f0000010000, 1)),
                                 page_map_lost=0),
                      UffdSample(fd=4, installed_ranges=(), page_map_lost=0))),))
    d = json.loads(dumps(measured))
    u3, u4 = d["targets"][0]["uffds"]
    assert u3["installed_ranges"] == [[0x7f0000001000, 2], [0x7f0000010000, 1]] and u3["page_map_lost"] == 0
    assert u4["installed_ranges"] == []  # measured: nothing installed (not the same as left out)
    assert d["targets"][0]["registered_ranges"] == [[0x7f0000000000, 4096]]
    assert parse_record(dumps(measured), "t") == measured


def test_writer_flushes_every_line():
    class Counting(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    out = Counting()
    w = NdjsonWriter(out)
    w.write(DEGRADED)
    w.write(sample(1))
    assert out.flushes == 2 and w.lines == 2
    assert out.getvalue().count("\n") == 2


def test_writer_refuses_nan():
    with pytest.raises(ValueError):
        dumps(Sample(time=float("nan"), interval_s=1.0, seq=1, probe_tier="procfs", sources=()))


def write_file(path, lines: list[str], newline_at_end: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))


def test_recording_loads_and_indexes(tmp_path):
    f = tmp_path / "r.ndjson"
    write_file(f, [dumps(DEGRADED), dumps(sample(1)), "", dumps(sample(2))])
    rec = load_recording(f)
    assert rec.header == DEGRADED and len(rec) == 2 and rec[1] == sample(2)


def test_truncated_last_line_names_the_line_and_keeps_what_came_before(tmp_path):
    f = tmp_path / "r.ndjson"
    write_file(f, [dumps(DEGRADED), dumps(sample(1)), dumps(sample(2))[:40]], newline_at_end=False)
    with Recording(f) as rec:
        got = []
        with pytest.raises(RecordingError, match=r"line 3.*truncated"):
            for r in rec.records():
                got.append(r)
        assert got == [DEGRADED, sample(1)] and rec.samples == [sample(1)]


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"type": "sample", "seq": 1}', "not a valid sample"),
    (dumps(DEGRADED), "a second header"),
])
def test_corrupt_middle_line_is_named(tmp_path, bad, why):
    f = tmp_path / "r.ndjson"
    write_file(f, [dumps(DEGRADED), dumps(sample(1)), bad, dumps(sample(3))])
    rec = Recording(f)
    with pytest.raises(RecordingError, match=f"line 3: {why}"):
        rec.load_more(final=True)
    assert rec.samples == [sample(1)]
    with pytest.raises(RecordingError):  # it stays broken: nothing after a bad line is trusted
        rec.load_more(final=True)


def test_newer_schema_empty_file_and_headerless_file_are_errors(tmp_path):
    f = tmp_path / "r.ndjson"
    write_file(f, [json.dumps({**DEGRADED.to_dict(), "schema": SCHEMA_VERSION + 1})])
    with pytest.raises(RecordingError, match="line 1: schema"):
        load_recording(f)
    f.write_text("")
    with pytest.raises(RecordingError, match="empty"):
        load_recording(f)
    write_file(f, [dumps(sample(1))])
    with pytest.raises(RecordingError, match="line 1: a sample before the header"):
        load_recording(f)
    with pytest.raises(RecordingError, match="cannot open"):
        Recording(tmp_path / "missing")


def test_unknown_record_types_are_skipped(tmp_path):
    f = tmp_path / "r.ndjson"
    write_file(f, [dumps(DEGRADED), '{"type": "annotation", "text": "x"}', dumps(sample(1))])
    assert load_recording(f).samples == [sample(1)]


def test_a_state_or_tier_from_a_newer_pctop_is_read_as_unknown_and_reading_goes_on(tmp_path):
    """The rule for words this pctop does not know (docs/schema.md, Versioning): the
    record stays, the word is UNKNOWN, everything else in it and after it is read."""
    newer = Sample(time=2.0, interval_s=1.0, seq=2, probe_tier=ProbeTier.EBPF, sources=("engine",), targets=(
        Target(pid=7, comm="q", migration=Migration(source="engine", state=MigrationState.POSTCOPY,
                                                    pages_total=100, pages_received=40)),))
    line = json.loads(dumps(newer))
    line["probe_tier"] = "bpf-next"
    line["targets"][0]["migration"]["state"] = "postcopy-preempt"
    f = tmp_path / "r.ndjson"
    write_file(f, [dumps(DEGRADED), dumps(sample(1)), json.dumps(line), dumps(sample(3))])
    rec = load_recording(f)
    assert rec.error is None and [s.seq for s in rec.samples] == [1, 2, 3]
    got = rec[1]
    assert got.probe_tier is ProbeTier.UNKNOWN
    m = got.targets[0].migration
    assert m.state is MigrationState.UNKNOWN and (m.pages_total, m.pages_received) == (100, 40)
    assert got == replace(newer, probe_tier=ProbeTier.UNKNOWN, targets=(
        replace(newer.targets[0], migration=replace(m, state=MigrationState.UNKNOWN)),))
    # written back (replay --json) as the word it was read as
    assert json.loads(dumps(got))["targets"][0]["migration"]["state"] == "unknown"
    # a word of the wrong type is no different
    line["targets"][0]["migration"]["state"] = 5
    assert parse_record(json.dumps(line), "t").targets[0].migration.state is MigrationState.UNKNOWN


def test_replay_json_of_a_recording_with_an_unknown_state_prints_every_line(tmp_path):
    from click.testing import CliRunner

    from pctop.cli import cli

    line = json.loads(dumps(sample(2)))
    line["targets"][0]["migration"] = {"source": "engine", "state": "postcopy-preempt"}
    f = tmp_path / "r.ndjson"
    write_file(f, [dumps(DEGRADED), dumps(sample(1)), json.dumps(line), dumps(sample(3))])
    r = CliRunner().invoke(cli, ["replay", "--json", str(f)])
    assert r.exit_code == 0, r.output
    out = [json.loads(x) for x in r.output.splitlines()]
    assert [d.get("seq") for d in out] == [None, 1, 2, 3]
    assert out[2]["targets"][0]["migration"]["state"] == "unknown"


def test_schema_words_are_the_json_strings():
    """StrEnum members write exactly the plain strings' JSON, so lines stay byte for byte."""
    m = Migration(source="qmp", state=MigrationState.PAUSED)
    plain = Migration(source="qmp", state="paused")  # type: ignore[arg-type]
    assert dumps(Sample(1.0, 1.0, 1, ProbeTier.PROCFS, (), (Target(1, "c", migration=m),))) == \
        dumps(Sample(1.0, 1.0, 1, "procfs", (), (Target(1, "c", migration=plain),)))  # type: ignore[arg-type]


def test_incremental_loading_follows_a_growing_file(tmp_path):
    f = tmp_path / "r.ndjson"
    with open(f, "w") as out:
        w = NdjsonWriter(out)
        w.write(DEGRADED)
        w.write(sample(1))
        rec = Recording(f)
        assert rec.load_more() == 1
        half = dumps(sample(2))
        out.write(half[:25])
        out.flush()
        assert rec.load_more() == 0  # a writer mid-line: wait for the rest
        out.write(half[25:] + "\n")
        out.flush()
        assert rec.load_more() == 1 and rec[1] == sample(2)
        rec.close()


def test_schema_doc_names_every_model_field():
    import dataclasses
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text()
    assert f"(version {SCHEMA_VERSION})" in doc
    for cls in (Header, Sample, Target, VcpuSample, UffdSample, Migration, Event, StallParts):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/schema.md does not document {cls.__name__}.{f.name}"
    for word in (*MigrationState, *ProbeTier):
        assert f"`{word}`" in doc, f"docs/schema.md does not name the value {word!r}"
