"""The (state, event) table of daemon/policy.py, walked cell by cell (no master is booted)."""
from __future__ import annotations

import inspect

import pytest

from cadenza.daemon import policy
from cadenza.daemon.generation import Generation
from cadenza.daemon.policy import Event, Ignore, Refuse, State, decide, refusal

CELLS = [(state, event) for state in State for event in Event]


@pytest.mark.parametrize("state,event", CELLS, ids=[f"{s.name}-{e.name}" for s, e in CELLS])
def test_every_cell_has_one_defined_outcome(state, event):
    cell = decide(state, event)
    if isinstance(cell, str):
        # An action: a method of the generation that accepts the keywords events carry.
        action = getattr(Generation, f"on_{cell}", None)
        assert action is not None, f"({state.name}, {event.name}) names on_{cell}, which does not exist"
        assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(action).parameters.values())
    else:
        assert isinstance(cell, (Refuse, Ignore)) and cell.why.strip()
    if isinstance(cell, Refuse):
        text = refusal(7, state, event, cell)
        assert text.startswith(f"{event.value} refused: generation 7 is ") and cell.why in text


def test_only_requests_are_refused():
    for event, row in policy.TABLE.items():
        for state, cell in row.items():
            if isinstance(cell, Refuse):
                assert event in policy.REQUESTS, (state, event)


def test_a_stop_is_never_refused_and_always_ends_somewhere():
    for state in State:
        for event in (Event.STOP, Event.STOP_NOW):
            assert not isinstance(decide(state, event), Refuse)
        if state is not State.LEAVING and state is not State.STOPPING:
            assert isinstance(decide(state, Event.STOP), str)


def test_upgrades_start_only_from_serving_and_wait_for_a_draining_predecessor():
    starts = [s for s in State if decide(s, Event.UPGRADE) == "start_upgrade"]
    assert starts == [State.SERVING]
    assert decide(State.TAKING_OVER, Event.UPGRADE) == "defer_upgrade"
    assert decide(State.UPGRADING, Event.UPGRADE) == "join_upgrade"


def test_a_leaving_or_committed_generation_starts_no_worker():
    for state in (State.LEAVING, State.COMMITTED, State.STOPPING):
        for event in (Event.GROW, Event.RESTART):
            assert isinstance(decide(state, event), Refuse), (state, event)
        assert isinstance(decide(state, Event.RESPAWN), Ignore)
        assert isinstance(decide(state, Event.APP_FAILED), Ignore)


def test_an_app_that_cannot_be_loaded_fails_only_a_generation_still_starting():
    # Exit 3 before any worker was ready: the first start (or the upgrade) fails at once; in
    # every other state it is a crash like any other, respawned where a crash is respawned.
    assert decide(State.STARTING, Event.APP_FAILED) == "app_failed"
    for state in State:
        if state is not State.STARTING:
            assert decide(state, Event.APP_FAILED) == decide(state, Event.RESPAWN), state


def test_after_mainpid_nothing_stops_the_successor():
    # COMMITTED: a stop is forwarded, a failure of the successor is systemd's to judge.
    assert decide(State.COMMITTED, Event.STOP) == "forward_stop"
    assert decide(State.COMMITTED, Event.STOP_NOW) == "forward_stop_now"
    # A stop reaching N after the hand-over was meant for the service (systemd had not taken
    # MAINPID= yet when it sent it): N passes it on, it does not swallow it.
    assert decide(State.LEAVING, Event.STOP) == "pass_stop_on"
    assert isinstance(decide(State.COMMITTED, Event.SUCCESSOR_FAILED), Ignore)
    # A next generation named in MAINPID= treats its predecessor's death as the end of the hand-over.
    assert decide(State.APPOINTED, Event.PREDECESSOR_GONE) == "made_main"
    assert decide(State.STANDBY, Event.PREDECESSOR_GONE) == "orphaned"


def test_only_serving_states_are_main():
    assert {s for s in State if s.main} == {State.SERVING, State.TAKING_OVER, State.UPGRADING, State.CANARY,
                                            State.PROMOTING, State.ROLLING_BACK}


def test_only_a_serving_generation_recycles_its_workers():
    obeys = {s for s in State if decide(s, Event.RECYCLE) == "recycle"}
    assert obeys == {State.SERVING, State.TAKING_OVER}
    # An upgrading generation is about to be replaced whole; a leaving one only drains.
    assert isinstance(decide(State.UPGRADING, Event.RECYCLE), Ignore)


def test_a_preloader_is_replaced_only_where_workers_may_still_be_started():
    assert decide(State.STARTING, Event.PRELOADER_GONE) == "preloader_lost_at_start"
    for state in (State.SERVING, State.TAKING_OVER, State.UPGRADING, State.STANDBY, State.APPOINTED):
        assert decide(state, Event.PRELOADER_GONE) == "restart_preloader", state
    for state in (State.COMMITTED, State.LEAVING, State.STOPPING):
        assert isinstance(decide(state, Event.PRELOADER_GONE), Ignore)
        assert isinstance(decide(state, Event.PRELOADER_READY), Ignore)
    # Workers forked from a replaced preloader are rolled onto the new one only while serving.
    assert {s for s in State if decide(s, Event.PRELOADER_READY) == "preloader_replaced"} == \
        {State.SERVING, State.TAKING_OVER}


CANARY_STATES = (State.CANARY, State.PROMOTING, State.ROLLING_BACK)


def test_during_a_canary_counts_are_the_gate_s_a_second_upgrade_joins_a_stop_ends_both():
    for state in CANARY_STATES:
        assert state.main, state
        for event in (Event.GROW, Event.SHRINK, Event.RESTART, Event.ROLLBACK):
            cell = decide(state, event)
            assert isinstance(cell, Refuse) and "running a canary" in cell.why, (state, event)
        assert decide(state, Event.UPGRADE) == "join_upgrade"
        assert decide(state, Event.STOP) == "stop"                       # the succession is told to stop
        assert decide(state, Event.STOP_NOW) == "stop_now"
        assert decide(state, Event.SUCCESSOR_GONE) == "canary_gone"      # the canary's master crashed
        assert decide(state, Event.RESPAWN) == "respawn"                 # N stays whole at count - K
        assert isinstance(decide(state, Event.RECYCLE), Ignore)
    assert decide(State.UPGRADING, Event.SUCCESSOR_READY) == "successor_ready"   # commit, or the canary
    assert decide(State.CANARY, Event.CANARY_DUE) == "judge_canary"
    assert decide(State.CANARY, Event.CANARY_FIGURES) == "canary_figures"
    assert decide(State.PROMOTING, Event.SUCCESSOR_READY) == "promoted_ready"
    assert {s for s in State if isinstance(decide(s, Event.CANARY_GREW), str)} == {State.PROMOTING}
    assert decide(State.ROLLING_BACK, Event.WORKERS_READY) == "canary_restored"
    assert isinstance(decide(State.CANARY, Event.SUCCESSOR_READY), Ignore)
    # The canary's side: it grows only when told, in STANDBY.
    assert decide(State.STANDBY, Event.PROMOTE_NOTICE) == "grow_to_count"
    assert {s for s in State if isinstance(decide(s, Event.PROMOTE_NOTICE), str)} == {State.STANDBY}


def test_a_warm_generation_takes_no_request_and_leaves_on_a_stop_a_crash_or_its_window():
    assert not State.WARM.main
    for event in (Event.GROW, Event.SHRINK, Event.RESTART, Event.UPGRADE, Event.ROLLBACK):
        cell = decide(State.WARM, event)
        assert isinstance(cell, Refuse) and "kept for a rollback" in cell.why, event
    for event in (Event.STOP, Event.STOP_NOTICE, Event.WARM_EXPIRED, Event.PREDECESSOR_GONE):
        assert decide(State.WARM, event) == "warm_expired", event
    assert decide(State.WARM, Event.STOP_NOW) == "stop_now"
    assert decide(State.WARM, Event.ROLLBACK_NOTICE) == "roll_back"
    assert isinstance(decide(State.WARM, Event.RESPAWN), Ignore)
    assert decide(State.WARM, Event.PRELOADER_GONE) == "restart_warm_preloader"   # its metrics directory first
    # The main generation's side: a rollback only from SERVING (its predecessor drained, then warm).
    assert {s for s in State if decide(s, Event.ROLLBACK) == "start_rollback"} == {State.SERVING}
    assert decide(State.TAKING_OVER, Event.WARM_NOTICE) == "predecessor_warm"
    assert decide(State.SERVING, Event.PREDECESSOR_GONE) == "predecessor_gone"       # the warm one left
    # A second upgrade during the window starts (and tells the warm one to leave first).
    assert decide(State.SERVING, Event.UPGRADE) == "start_upgrade"
    for state in (State.UPGRADING, State.COMMITTED, State.LEAVING):
        assert decide(state, Event.PREDECESSOR_GONE) == "predecessor_gone", state
