"""Requests answered and lost by the HTTP clients of the running test, for the reliability
report (tests/reliability_report.py). Clients add to it as they finish; conftest.py resets it
before each test and attaches it to the test's report afterwards."""
from __future__ import annotations

ok = 0
lost = 0


def add(answered: int, failed: int) -> None:
    global ok, lost
    ok += answered
    lost += failed


def reset() -> None:
    global ok, lost
    ok = lost = 0
