"""The README's "Deploying with systemd" block, run as written in a real systemd 252."""
from __future__ import annotations

import re
from pathlib import Path

import sdns
from procs import VENV_BIN

README = Path(__file__).resolve().parent.parent / "README.md"


def deploy_block() -> str:
    text = README.read_text()
    block = re.search(r"<!-- deploy-begin -->\n```sh\n(.*?)```\n<!-- deploy-end -->", text, re.S)
    assert block, "README.md lost its deploy block"
    return block.group(1)


def test_readme_deploy_flow_runs_as_written(systemd_factory):
    # A private network namespace, so the block's 127.0.0.1:8000 never meets the host's; /srv is
    # a tmpfs of the namespace, so the block writes nothing on the host.
    with systemd_factory(net="private", extra_tmpfs=("/srv",)) as ns:
        if dropin := sdns.hardening_dropin():   # see test_systemd_units.install
            ns.write_unit("demo.service.d/checkout.conf", dropin)
        script = "set -euo pipefail\n" + deploy_block()
        env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"}
        proc = ns.run("/bin/bash", "-c", script, env=env, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr + ns.journal("-n", "50")
        answers = [line for line in proc.stdout.splitlines() if line.startswith("hello from cadenza")]
        assert len(answers) == 2, proc.stdout
        assert answers[0].endswith("release /srv/demo/releases/1") and " gen 1 " in answers[0]
        assert answers[1].endswith("release /srv/demo/releases/2") and " gen 2 " in answers[1]
        assert "generation 2 serving" in proc.stdout and "(DELETED)" not in proc.stdout
        state = ns.show("demo.service", "ActiveState", "NRestarts")
        assert state == {"ActiveState": "active", "NRestarts": "0"}
        assert not ns.host_path("/srv/demo/releases/1").exists()
