"""The engine run's states: the transition table and how the run and the link move along it.
The Engine here is only constructed (no memory, source or guest): the moves are driven by
hand, as the run and the link's threads drive them (tests/system/test_engine_*.py run it)."""

from __future__ import annotations

import pytest

from pctop.engine.run import LINK_STATES, TRANSITIONS, Engine, EngineConfig, EngineStateError
from pctop.model import MigrationState as S

END = (S.COMPLETED, S.FAILED)


def engine() -> Engine:
    return Engine(EngineConfig(memory=1 << 20, vcpus=1, control="", workload="threads"))


def reachable(start: S) -> set[S]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_table_is_closed_and_every_state_is_reachable_from_precopy():
    states = set(TRANSITIONS)
    assert all(targets <= states for targets in TRANSITIONS.values())
    assert reachable(S.PRECOPY) == states
    assert set(LINK_STATES.values()) <= states


def test_the_end_is_final_and_every_state_can_fail():
    for s in END:
        assert TRANSITIONS[s] == frozenset(), s
    for s in set(TRANSITIONS) - set(END):
        assert S.FAILED in TRANSITIONS[s], s
    # completed is reached only through stopping (every page in, then verified)
    assert [s for s, targets in TRANSITIONS.items() if S.COMPLETED in targets] == [S.STOPPING]


def test_completed_cannot_go_back_to_postcopy():
    e = engine()
    for s in (S.POSTCOPY, S.STOPPING, S.COMPLETED):
        e._go(s)
    with pytest.raises(EngineStateError, match="internal error: the run cannot go from completed to postcopy"):
        e._go(S.POSTCOPY)
    assert e.state is S.COMPLETED
    e._go(S.COMPLETED)  # staying is no change


def test_setting_up_cannot_skip_to_the_end():
    e = engine()
    assert e.state is S.PRECOPY
    for bad in (S.STOPPING, S.COMPLETED, S.RECOVERING, S.UNKNOWN):
        with pytest.raises(EngineStateError, match=f"from precopy to {bad}"):
            e._go(bad)
    assert e.state is S.PRECOPY


def test_the_links_news_is_the_state_only_while_the_vcpus_run():
    e = engine()
    e._on_link_change("up")  # the first connection, while setting up: still precopy
    assert e.state is S.PRECOPY
    e._go(S.POSTCOPY)
    for news, state in (("down", S.PAUSED), ("recovering", S.RECOVERING), ("down", S.PAUSED),
                        ("recovering", S.RECOVERING), ("up", S.POSTCOPY), ("recovering", S.RECOVERING)):
        e._on_link_change(news)
        assert e.state is state, news
    e._go(S.STOPPING)
    e._on_link_change("down")  # the run closes the link itself as it winds down
    assert e.state is S.STOPPING
    e._go(S.FAILED)
    e._on_link_change("up")
    assert e.state is S.FAILED


def test_status_before_the_run_has_set_up():
    st = engine().status()
    assert (st["state"], st["link"], st["workload"], st["pages_missing"], st["faults_waiting"]) == \
        ("precopy", "down", None, 256, 0)
    assert engine().pages_arrived() is None
