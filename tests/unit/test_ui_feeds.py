"""The feeds the TUI's worker pulls from: replay playback (pause, step, seek,
speed) and live pacing. No Textual involved; nothing here asserts timing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from pctop.root import open_replay
from pctop.sources.replay import RecordingError
from pctop.ui.feeds import INTERVAL_STEPS, SPEED_STEPS, LiveFeed, ReplayFeed, step_in
from pctop.ui.synthetic import synthetic_sample
from tests.helpers.headers import LIVE


def samples(n: int = 30):
    return [synthetic_sample(seq=i) for i in range(1, n + 1)]  # 1 s apart


def test_first_sample_comes_at_once_even_paused_then_nothing_until_step():
    f = ReplayFeed(LIVE, samples(), paused=True, position=5)
    assert f.next_sample(0.01).seq == 6
    assert f.next_sample(0.01) is None  # paused
    f.step()
    assert f.next_sample(0.01).seq == 7
    assert f.next_sample(0.01) is None
    assert f.position == 6


def test_seek_by_recording_time_both_ways_and_clamped():
    f = ReplayFeed(LIVE, samples(), paused=True, position=10)
    f.next_sample(0.01)
    assert f.seek_seconds(5) == 15
    assert f.next_sample(0.01).seq == 16
    assert f.seek_seconds(-8) == 7
    assert f.next_sample(0.01).seq == 8
    assert f.seek_seconds(-1000) == 0
    assert f.next_sample(0.01).seq == 1
    assert f.seek_seconds(1000) == 29
    assert f.next_sample(0.01).seq == 30
    assert [s.seq for s in f.window(3)] == [28, 29, 30]


def test_playback_hands_out_in_order_and_finishes():
    f = ReplayFeed(LIVE, samples(5), speed=1000.0)
    got = []
    while not f.finished:
        s = f.next_sample(0.5)
        if s is not None:
            got.append(s.seq)
    assert got == [1, 2, 3, 4, 5]
    assert f.next_sample(0.01) is None


def test_pause_from_another_thread_stops_playback():
    f = ReplayFeed(LIVE, samples(), speed=0.01)  # 100 s per sample: it waits
    assert f.next_sample(0.01).seq == 1
    t = threading.Timer(0.05, f.toggle_pause)
    t.start()
    assert f.next_sample(0.3) is None
    t.join()
    assert f.paused
    f.set_speed(1000.0)
    f.toggle_pause()
    assert f.next_sample(0.5).seq == 2


def test_step_ladders_clamp():
    assert step_in(SPEED_STEPS, 1.0, up=True) == 2.0
    assert step_in(SPEED_STEPS, SPEED_STEPS[-1], up=True) == SPEED_STEPS[-1]
    assert step_in(INTERVAL_STEPS, 1.0, up=False) == 0.5
    assert step_in(INTERVAL_STEPS, INTERVAL_STEPS[0], up=False) == INTERVAL_STEPS[0]
    assert step_in(INTERVAL_STEPS, 0.7, up=True) == 1.0


def test_live_feed_collects_once_per_due_interval_and_close_wakes_it():
    calls = []

    def collect():
        calls.append(1)
        return synthetic_sample(seq=len(calls))

    f = LiveFeed(LIVE, collect, interval=0.01)
    got = [f.next_sample() for _ in range(5)]
    assert [s.seq for s in got if s] == list(range(1, len(calls) + 1))
    assert len(calls) >= 1
    f.set_interval(60.0)
    done = threading.Event()
    result = []

    def blocked():
        result.append(f.next_sample())
        done.set()

    th = threading.Thread(target=blocked)
    th.start()
    f.close()
    assert done.wait(5), "close() must wake a waiting next_sample"
    th.join()
    assert result == [None]


def test_open_recording_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.ndjson"
    empty.write_text(json.dumps(LIVE.to_dict()) + "\n")
    with pytest.raises(RecordingError, match="no samples"):
        open_replay(empty)
    with pytest.raises(RecordingError, match="cannot open"):
        open_replay(tmp_path / "missing.ndjson")


def test_importing_the_ui_package_does_not_import_textual():
    code = "import sys, pctop.ui, pctop.ui.feeds; sys.exit('textual' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
