"""The one table of policy: what every event does in every state of a generation (DESIGN §4.1).

A master runs one generation. Its state is named from the domain, and the cell
(state, event) says what happens: an action of the generation, or a refusal with its reason.
Signals, control commands, timers and the hand-off channel all come through `decide`, so no
guard elsewhere can forget a state (s6-supervise's `actions[state][event]`).

    first generation:   STARTING ─────────────────────────────► SERVING
    next generation:    STARTING ─► STANDBY ─► APPOINTED ─► TAKING_OVER ─► SERVING
    an upgrade (N):     SERVING ─► UPGRADING ─► COMMITTED ─► LEAVING ─► (gone)
                                      └─(fails)─► SERVING
    with a canary (N):  UPGRADING ─► CANARY ─► PROMOTING ─► COMMITTED ...
                                        └─(gate)─► ROLLING_BACK ─► SERVING   (canary.py)
    with a rollback window (N): LEAVING ─► WARM ─► (gone)    or, rolled back, WARM ─► STARTING ─► ...
    any state ──stop──► STOPPING ─► (gone)           (LEAVING keeps draining)

- STANDBY: our workers are ready and the predecessor knows it; it has not named us in MAINPID=.
- APPOINTED: the predecessor sent MAINPID=us; systemd may not have taken it yet (the barrier).
- TAKING_OVER: we are main, the predecessor still drains. A stop waits for it; an upgrade waits.
- CANARY: N+1 serves with K workers, we with count − K; judged after canary_duration.
- PROMOTING: the canary passed; N+1 grows to its count a slot at a time, one of ours stopping
  for each of its new workers ready, then we commit as in any upgrade.
- ROLLING_BACK: the canary failed; we grow back, then N+1 is stopped.
- WARM: we handed over and drained; kept for `supervisorctl rollback` for upgrade.rollback_window
  (warm.py), with no worker, no MainPID, no control socket.
- COMMITTED: we sent MAINPID= for the successor. From here the hand-over cannot be undone:
  nothing we do may stop, kill or disown the successor; a stop is forwarded to it.
"""

from __future__ import annotations

import enum
from ..records import record


class State(enum.Enum):
    STARTING = "starting"
    STANDBY = "standby"
    APPOINTED = "appointed"
    SERVING = "serving"
    TAKING_OVER = "taking over"
    UPGRADING = "upgrading"
    CANARY = "running a canary"
    PROMOTING = "promoting its canary"
    ROLLING_BACK = "rolling back its canary"
    COMMITTED = "committed"
    LEAVING = "leaving"
    STOPPING = "stopping"
    WARM = "warm"

    @property
    def main(self) -> bool:
        """Whether a master in this state is systemd's main process and answers the control socket."""
        return self in MAIN_STATES


MAIN_STATES = frozenset({State.SERVING, State.TAKING_OVER, State.UPGRADING, State.CANARY, State.PROMOTING,
                         State.ROLLING_BACK})


class Event(enum.Enum):
    # requests: signals and control commands
    STOP = "stop"                       # TERM, QUIT, `supervisorctl stop`
    STOP_NOW = "immediate stop"         # INT
    UPGRADE = "upgrade"                 # USR2, `supervisorctl upgrade`
    RESTART = "rolling restart"         # HUP, `supervisorctl restart`
    GROW = "add a worker"               # TTIN, `supervisorctl scale`
    SHRINK = "remove a worker"          # TTOU, `supervisorctl scale`
    ROLLBACK = "rollback"               # `supervisorctl rollback`
    # our own workers
    WORKERS_READY = "all workers ready"
    START_FAILED = "start failed"       # ready_timeout passed, or workers keep failing
    RESPAWN = "respawn"                 # a slot's backoff is over, or its worker died
    APP_FAILED = "application not loaded"   # a worker exited 3 before any worker of ours was ready
    DRAINED = "drained"                 # no worker of ours is left
    RECYCLE = "recycle a worker"        # max_requests, max_lifetime, max_memory, a request past timeout
    PRELOADER_READY = "preloader ready" # our preloader imported the app (preload only)
    PRELOADER_GONE = "preloader gone"   # our preloader exited (preload only)
    # the predecessor (we are the next generation)
    APPOINTED_NOTICE = "named in MAINPID="
    MAIN_NOTICE = "made main"
    STOP_NOTICE = "told to stop"
    PREDECESSOR_GONE = "predecessor gone"
    # the successor (we started an upgrade)
    SUCCESSOR_READY = "successor ready"
    SUCCESSOR_FAILED = "successor failed"
    BARRIER = "systemd took MAINPID="
    SUCCESSOR_GONE = "successor gone"
    CANARY_DUE = "canary due"           # canary_duration has passed
    CANARY_FIGURES = "canary figures"   # N+1 answered "report" (or did not, in time)
    CANARY_GREW = "canary grew"         # a promoted N+1 has one more worker ready
    # the predecessor runs us as its canary
    PROMOTE_NOTICE = "told to grow"
    # the rollback window (warm.py)
    WARM_NOTICE = "predecessor warm"    # N drained and stays warm for a rollback
    ROLLBACK_NOTICE = "told to roll back"
    WARM_EXPIRED = "rollback window over"   # its timer, or N+1 said "expire"


REQUESTS = (Event.STOP, Event.STOP_NOW, Event.UPGRADE, Event.RESTART, Event.GROW, Event.SHRINK, Event.ROLLBACK)


@record(frozen=True)
class Refuse:
    """The event is refused in this state; `why` completes "generation G is STATE, ..."."""
    why: str


@record(frozen=True)
class Ignore:
    """Nothing to do, by design (a late timer, a duplicate notice); `why` is logged at debug."""
    why: str


Cell = str | Refuse | Ignore   # a str names a method of Generation: `on_<name>`

_S = State
_NOT_MAIN = Refuse("not main: only the main generation takes requests")
_UPGRADING = Refuse("upgrading: the generation that serves after the upgrade takes it")
_LEAVING = Refuse("leaving: it drains and exits, and starts nothing new")
_STOPPING = Refuse("stopping: it drains and exits, and starts nothing new")
_STARTING = Refuse("starting: wait until it serves")
_CANARY = Refuse("running a canary: wait until it is promoted or rolled back (supervisorctl status)")
_IN_CANARY = ("CANARY", "PROMOTING", "ROLLING_BACK")
_WARM = Refuse("warm: kept for a rollback, it serves again only if rolled back to; the main generation takes requests")
_NOT_WARM = Ignore("not warm")


def _canary(cell: Cell) -> dict[str, Cell]:
    return {name: cell for name in _IN_CANARY}

_ALL = tuple(State)


def _row(default: Cell, **cells: Cell) -> dict[State, Cell]:
    row = {state: default for state in _ALL}
    for name, cell in cells.items():
        row[State[name]] = cell
    return row


# One row per event, one cell per state. Read a row across to see where an event is obeyed.
TABLE: dict[Event, dict[State, Cell]] = {
    # Once we may be systemd's main process (APPOINTED, TAKING_OVER), a stop waits for the
    # predecessor to drain: exiting first would let systemd's final SIGKILL cut its requests.
    Event.STOP: _row(
        "stop", APPOINTED="stop_after_predecessor", TAKING_OVER="stop_after_predecessor",
        COMMITTED="forward_stop", LEAVING="pass_stop_on", STOPPING=Ignore("already stopping"),
        WARM="warm_expired"),
    Event.STOP_NOW: _row(
        "stop_now", COMMITTED="forward_stop_now", LEAVING="stop_now", STOPPING="stop_now"),
    Event.UPGRADE: _row(
        _NOT_MAIN, SERVING="start_upgrade", UPGRADING="join_upgrade", TAKING_OVER="defer_upgrade",
        STARTING=_STARTING, COMMITTED="join_upgrade", LEAVING=_LEAVING, STOPPING=_STOPPING,
        **_canary("join_upgrade"), WARM=_WARM),
    # During a canary the counts of both generations are the gate's: nothing changes them.
    Event.RESTART: _row(
        _NOT_MAIN, SERVING="restart", TAKING_OVER="restart", STARTING=_STARTING,
        UPGRADING=_UPGRADING, COMMITTED=_LEAVING, LEAVING=_LEAVING, STOPPING=_STOPPING, **_canary(_CANARY),
        WARM=_WARM),
    Event.GROW: _row(
        _NOT_MAIN, SERVING="grow", TAKING_OVER="grow", STARTING=_STARTING,
        UPGRADING=_UPGRADING, COMMITTED=_LEAVING, LEAVING=_LEAVING, STOPPING=_STOPPING, **_canary(_CANARY),
        WARM=_WARM),
    Event.SHRINK: _row(
        _NOT_MAIN, SERVING="shrink", TAKING_OVER="shrink", STARTING=_STARTING,
        UPGRADING=_UPGRADING, COMMITTED=_LEAVING, LEAVING=_LEAVING, STOPPING=_STOPPING, **_canary(_CANARY),
        WARM=_WARM),
    # Back to the warm generation, the way an upgrade goes (warm.py). Only a main generation
    # serving alone has one: while the previous one still drains, it is not warm yet.
    Event.ROLLBACK: _row(
        _NOT_MAIN, SERVING="start_rollback", STARTING=_STARTING, UPGRADING=_UPGRADING,
        TAKING_OVER=Refuse("taking over: the previous generation still drains; once it has, it is warm"),
        COMMITTED=_LEAVING, LEAVING=_LEAVING, STOPPING=_STOPPING, **_canary(_CANARY), WARM=_WARM),
    # A canary that passed grows in STANDBY and says "ready" again once all its workers are; a
    # rolled-back canary is stopped once our own workers are all back.
    Event.WORKERS_READY: _row(
        Ignore("not waiting for readiness"), STARTING="started", STANDBY="standby_workers_ready",
        ROLLING_BACK="canary_restored"),
    Event.START_FAILED: _row(
        Ignore("already started"), STARTING="start_failed"),
    # A respawn keeps a serving generation whole; a leaving one only drains (defect: a TTIN or a
    # respawn reaching a leaving generation started an old-release worker, cut mid-request later).
    Event.RESPAWN: _row(
        "respawn", COMMITTED=Ignore("committed: the successor serves, nothing is respawned"),
        LEAVING=Ignore("leaving: nothing is respawned"), STOPPING=Ignore("stopping: nothing is respawned"),
        WARM=Ignore("warm: nothing is respawned")),
    # Exit 3 before any worker of the generation was ready: the release cannot serve, and
    # retrying until ready_timeout only hides the reason. Only a generation still starting (the
    # first, or an upgrade's next) can meet it; once one worker served, it is a crash like any other.
    Event.APP_FAILED: _row(
        "respawn", STARTING="app_failed",
        COMMITTED=Ignore("committed: the successor serves, nothing is respawned"),
        LEAVING=Ignore("leaving: nothing is respawned"), STOPPING=Ignore("stopping: nothing is respawned"),
        WARM=Ignore("warm: nothing is respawned")),
    # Make-before-break needs a generation that starts workers; one about to be replaced by an
    # upgrade, or draining, lets its workers be.
    Event.RECYCLE: _row(
        Ignore("not serving: workers are recycled only by a serving generation"),
        SERVING="recycle", TAKING_OVER="recycle"),
    # With preload, workers come from the preloader. A new one (started, or replacing one that
    # died) fills the slots that waited; a replacement of a serving generation's is followed by
    # a rolling restart, so every worker shares the new preloader's memory.
    Event.PRELOADER_READY: _row(
        "preloader_ready", SERVING="preloader_replaced", TAKING_OVER="preloader_replaced",
        COMMITTED=Ignore("committed: nothing is started"), LEAVING=Ignore("leaving: nothing is started"),
        STOPPING=Ignore("stopping: nothing is started")),
    # The workers keep serving without it; only starting new ones needs it. Exit 3 before any
    # worker was ready is an application that cannot be imported: the start (or upgrade) fails.
    Event.PRELOADER_GONE: _row(
        "restart_preloader", STARTING="preloader_lost_at_start", WARM="restart_warm_preloader",
        COMMITTED=Ignore("committed: nothing is started"), LEAVING=Ignore("leaving: nothing is started"),
        STOPPING=Ignore("stopping: nothing is started")),
    Event.DRAINED: _row(
        Ignore("workers come back"), LEAVING="maybe_exit", STOPPING="maybe_exit"),
    Event.APPOINTED_NOTICE: _row(
        Ignore("not waiting for MAINPID="), STANDBY="appointed"),
    Event.MAIN_NOTICE: _row(
        Ignore("not waiting to be made main"), STANDBY="made_main", APPOINTED="made_main"),
    # "stop" comes before the commit (N aborts the upgrade) or right after "main" (a stop reached
    # N in the barrier window, and N forwards it).
    Event.STOP_NOTICE: _row(
        Ignore("the predecessor no longer decides"), STARTING="stop", STANDBY="stop",
        APPOINTED="stop_after_predecessor", TAKING_OVER="stop_after_predecessor", WARM="warm_expired"),
    # Once named in MAINPID=, the predecessor's death ends the hand-over: we are main (DESIGN §4.1).
    Event.PREDECESSOR_GONE: _row(
        Ignore("no predecessor"), STARTING="orphaned", STANDBY="orphaned", APPOINTED="made_main",
        TAKING_OVER="predecessor_gone", STOPPING="predecessor_gone", SERVING="predecessor_gone",
        # a warm predecessor told to leave by an upgrade (warm.py): the upgrade's answer waits for it
        UPGRADING="predecessor_gone", COMMITTED="predecessor_gone", LEAVING="predecessor_gone",
        **_canary("predecessor_gone"), WARM="warm_expired"),
    Event.SUCCESSOR_READY: _row(
        Ignore("no upgrade waits for readiness"), UPGRADING="successor_ready", PROMOTING="promoted_ready",
        CANARY=Ignore("the canary is judged after canary_duration"),
        ROLLING_BACK=Ignore("the canary is being stopped")),
    Event.SUCCESSOR_FAILED: _row(
        Ignore("no upgrade to fail"), UPGRADING="upgrade_failed", STOPPING="upgrade_failed",
        COMMITTED=Ignore("committed: the successor's fate is systemd's now"), **_canary("upgrade_failed")),
    Event.BARRIER: _row(
        Ignore("no hand-over waits for systemd"), COMMITTED="hand_over"),
    Event.SUCCESSOR_GONE: _row(
        Ignore("no successor"), UPGRADING="successor_gone", STOPPING="successor_gone",
        COMMITTED="successor_gone", LEAVING="successor_gone", **_canary("canary_gone")),
    Event.CANARY_DUE: _row(Ignore("no canary is judged"), CANARY="judge_canary"),
    Event.CANARY_FIGURES: _row(Ignore("no canary is judged"), CANARY="canary_figures"),
    # One of ours stops for each worker a promoted canary has ready (make-before-break).
    Event.CANARY_GREW: _row(Ignore("no canary grows"), PROMOTING="canary_grew"),
    Event.PROMOTE_NOTICE: _row(Ignore("not a canary waiting to grow"), STANDBY="grow_to_count"),
    Event.WARM_NOTICE: _row(Ignore("no predecessor drains"), TAKING_OVER="predecessor_warm",
                            STOPPING="dismiss_new_warm"),
    Event.ROLLBACK_NOTICE: _row(_NOT_WARM, WARM="roll_back"),
    Event.WARM_EXPIRED: _row(_NOT_WARM, WARM="warm_expired"),
}


def decide(state: State, event: Event) -> Cell:
    return TABLE[event][state]


def refusal(generation: int, state: State, event: Event, cell: Refuse) -> str:
    """The one phrasing of every refusal: what was asked, of whom, and why not."""
    return f"{event.value} refused: generation {generation} is {cell.why}"
