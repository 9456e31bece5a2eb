"""The soak of tests/soak.py under pytest: CADENZA_SOAK_UPGRADES consecutive upgrades (default
500; scripts/test.sh runs 100 to keep the suite short, tests/reliability_report.py runs 500)
under a steady client, with nothing failing, leaking or left behind."""
from __future__ import annotations

import os

import pytest

from soak import problems, soak, table


UPGRADES = int(os.environ.get("CADENZA_SOAK_UPGRADES", "500"))


@pytest.mark.timeout(300 + 2 * UPGRADES)   # about 0.6 s an upgrade; generous for a loaded machine
def test_consecutive_upgrades_under_a_steady_client(systemd, tmp_path, record_property):
    upgrades = UPGRADES
    result = soak(systemd, tmp_path, upgrades=upgrades)
    record_property("soak", table(result))   # for tests/reliability_report.py
    shown = f"{table(result)}\ntotals: {({k: v for k, v in result.items() if k != 'samples'})}"
    # Zero failed requests; fds and cgroup processes identical in every sample; no zombie;
    # no process but the current generation's workers beside the master; RSS within 3 MB.
    assert not problems(result), "\n".join(problems(result)) + "\n" + shown
    # The samples: before the first upgrade, every 50 and after the last.
    assert len(result["samples"]) == 1 + upgrades // 50 + (upgrades % 50 > 0), shown
    assert result["ok"] > upgrades, shown   # the client kept going through every upgrade
