"""The engine run's states (pctop.engine.states): the transition table, and how the run
and the link's threads move along it. The Engine here is only constructed (no memory,
source or guest); tests/system/test_engine_*.py run it."""

from __future__ import annotations

import pytest

from pctop.engine.run import Engine, EngineConfig
from pctop.engine.states import LINK_STATES, TRANSITIONS, EngineStateError, RunState
from pctop.model import MigrationState as S

END = (S.COMPLETED, S.FAILED)


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
    run = RunState()
    for s in (S.POSTCOPY, S.STOPPING, S.COMPLETED):
        run.go(s)
    with pytest.raises(EngineStateError, match="internal error: the run cannot go from completed to postcopy"):
        run.go(S.POSTCOPY)
    assert run.now is S.COMPLETED
    run.go(S.COMPLETED)  # staying is no move
    run.fail()  # what raised after the run completed does not undo it
    assert run.now is S.COMPLETED


def test_setting_up_cannot_skip_to_the_end():
    run = RunState()
    assert run.now is S.PRECOPY
    for bad in (S.STOPPING, S.COMPLETED, S.RECOVERING, S.UNKNOWN):
        with pytest.raises(EngineStateError, match=f"from precopy to {bad}"):
            run.go(bad)
    assert run.now is S.PRECOPY
    run.fail()
    assert run.now is S.FAILED


@pytest.mark.parametrize("link, state", [("up", S.POSTCOPY), ("down", S.PAUSED), ("recovering", S.PAUSED)])
def test_the_vcpus_start_in_the_state_of_the_link(link, state):
    run = RunState()
    run.begin(lambda: link)
    assert run.now is state


def test_the_links_news_is_the_state_only_while_the_vcpus_run():
    run = RunState()
    run.follow_link("up")  # the first connection, while setting up: still precopy
    assert run.now is S.PRECOPY
    run.begin(lambda: "up")
    for news, state in (("down", S.PAUSED), ("recovering", S.RECOVERING), ("down", S.PAUSED),
                        ("recovering", S.RECOVERING), ("up", S.POSTCOPY), ("recovering", S.RECOVERING)):
        run.follow_link(news)
        assert run.now is state, news
    run.go(S.STOPPING)
    run.follow_link("down")  # the run closes the link itself as it winds down
    assert run.now is S.STOPPING
    run.go(S.FAILED)
    run.follow_link("up")
    assert run.now is S.FAILED


def test_an_engine_answers_status_before_its_run_has_set_up():
    e = Engine(EngineConfig(memory=1 << 20, vcpus=1, control="", workload="threads"))
    st = e.status()
    assert (st["state"], st["link"], st["workload"], st["pages_missing"], st["faults_waiting"]) == \
        ("precopy", "down", None, 256, 0)
    assert e.state is S.PRECOPY and e.pages_arrived() is None
    with pytest.raises(ValueError, match="not connected to the source yet"):
        e.cmd_recover(None)
