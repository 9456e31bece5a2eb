"""Shared pytest wiring: the `systemd` fixture, a real systemd 252 in namespaces (tests/sdns.py).

Any test that uses it (directly or through another fixture) carries the `systemd` marker.  CI
must not pass with those tests skipped, so the number of skipped ones is written to
$CADENZA_SYSTEMD_SKIPS_FILE for the CI job to check.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# sdns.py lives beside this file; with --import-mode=importlib pytest would not put this
# directory on sys.path, and the harness must import the same way in every mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdns  # noqa: E402
import tally  # noqa: E402

SKIPS_ENV = "CADENZA_SYSTEMD_SKIPS_FILE"
# Carried by every report of a systemd test.  A report property rather than a keyword (a
# directory named "systemd" is a keyword too) or a node-id set (pytest-xdist's controller
# never collects, but it does receive the reports' user_properties).
SYSTEMD_PROPERTY = ("sdns", "systemd")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "systemd: boots a real systemd in throw-away namespaces (tests/sdns.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every systemd fixture depends on _sdns_session, so the fixture closure finds them all.
    for item in items:
        if "_sdns_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.systemd)
        if item.get_closest_marker("systemd") is not None:
            item.user_properties.append(SYSTEMD_PROPERTY)


RESULTS_ENV = "CADENZA_RESULTS_FILE"
_results: dict[str, dict] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With $CADENZA_RESULTS_FILE set: each test's outcome and what its clients saw, as JSON
    (tests/reliability_report.py turns runs of these into docs/reliability.md)."""
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "requests": [0, 0]})
    if report.failed or (report.skipped and entry["outcome"] == "passed"):
        entry["outcome"] = "failed" if report.failed else "skipped"
    for name, value in report.user_properties:
        if name == "requests":
            entry["requests"] = list(value)
        elif name == "soak":
            entry["soak"] = value


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        Path(path).write_text(json.dumps(_results, indent=1) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    skipped = sum(1 for r in terminalreporter.stats.get("skipped", ())  # xdist sends lists
                  if any(tuple(p) == SYSTEMD_PROPERTY for p in getattr(r, "user_properties", ())))
    if skipped:
        terminalreporter.write_line(f"{skipped} systemd test(s) SKIPPED", yellow=True)
    path = os.environ.get(SKIPS_ENV)
    if path:
        Path(path).write_text(f"{skipped}\n")


@pytest.fixture(autouse=True)
def _tally(request):
    """What the test's HTTP clients saw, as a report property (see tests/reliability_report.py)."""
    tally.reset()
    yield
    if tally.ok or tally.lost:
        request.node.user_properties.append(("requests", [tally.ok, tally.lost]))


@pytest.fixture(scope="session")
def _sdns_session() -> None:
    ok, reason = sdns.available()
    if not ok:
        if os.environ.get("CADENZA_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"CADENZA_REQUIRE_SYSTEMD=1 but no real systemd for tests: {reason}")
        pytest.skip(f"no real systemd for tests: {reason}")
    # Once per session: empty sdns-* cgroups left by sessions that were SIGKILLed.
    sdns.janitor()


@pytest.fixture
def systemd(_sdns_session):
    """A booted private systemd 252 sharing the host's network namespace."""
    with sdns.SystemdNS(net="host") as ns:
        yield ns


@pytest.fixture
def systemd_factory(_sdns_session):
    """For tests that need other options or control the boot themselves."""
    made: list[sdns.SystemdNS] = []

    def make(**kw) -> sdns.SystemdNS:
        made.append(sdns.SystemdNS(**kw))
        return made[-1]

    yield make
    for ns in made:
        ns.stop()  # idempotent: a no-op for those already left by their `with`


@pytest.fixture
def start(tmp_path):
    """start(*argv) -> a real master (procs.Master) in tmp_path, closed after the test."""
    from procs import Master
    masters = []

    def _start(*args, **kw):
        m = Master(tmp_path, *args, **kw)
        masters.append(m)
        return m
    yield _start
    for m in masters:
        m.close()
