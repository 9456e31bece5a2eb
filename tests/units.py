"""Unit files and cadenza.toml for the real-systemd tests, rendered the way an operator writes them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

# The venv the tests run from: CI runs from another clone path, so nothing here is hard-coded.
# The namespace sees the host root read-only at the same paths, so this venv works inside too.
CADENZA = Path(sys.executable).parent / "cadenza"


def socket_unit(port: int) -> str:
    return f"[Socket]\nListenStream=127.0.0.1:{port}\n"


def service_unit(config: Path, *args: str, restart: str = "no", stop_timeout: int = 20,
                 env: dict[str, str] | None = None) -> str:
    # KillMode=mixed: systemd sends TERM to the master only and lets it drain its workers (DESIGN §4).
    exec_start = " ".join([str(CADENZA), "run", "-c", str(config), *args])
    lines = ["[Service]", "Type=notify", "NotifyAccess=main", "KillMode=mixed",
             f"ExecStart={exec_start}", f"TimeoutStopSec={stop_timeout}", f"Restart={restart}"]
    lines += [f'Environment="{key}={value}"' for key, value in (env or {}).items()]
    return "\n".join(lines) + "\n"


def config_toml(name: str, **workers: object) -> str:
    # json.dumps renders str, int and lists of str as valid TOML values.
    if "command" not in workers:
        workers.setdefault("app", "cadenza.demo:app")
    lines = ["[app]", f"name = {json.dumps(name)}", "[workers]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in workers.items()]
    return "\n".join(lines) + "\n"
