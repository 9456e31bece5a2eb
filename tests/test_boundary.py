"""Import boundary (DESIGN §7): a running master carries no operator tools, no worker code, no
HTTP server and no OpenSSL, and stays within 20 MB RSS."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from procs import Master, free_port, get

FORBIDDEN_MODULES = ("pystemd", "uvicorn", "uvloop", "httptools", "h11", "ssl", "_ssl", "a2wsgi",
                     "cadenza.tools", "cadenza.worker", "prometheus_client", "http.server")
FORBIDDEN_LIBRARIES = ("libssl", "libcrypto", "libsystemd", "uvloop", "httptools")


@pytest.mark.parametrize("preload", [False, True])
def test_a_running_master_loads_nothing_of_tools_workers_or_ssl(tmp_path, preload):
    # With preload the application, the engine and uvloop are in the preloader, never here.
    # With metrics on and scraped (test_the_master_code_path... shows prometheus_client is not imported).
    metrics = free_port()
    (tmp_path / "cadenza.toml").write_text(f'[workers]\napp = "cadenza.demo:app"\npreload = {str(preload).lower()}\n'
                                           f'[control]\nsocket = "{tmp_path}/control.sock"\n'
                                           f'[metrics]\nlisten = "127.0.0.1:{metrics}"\nmultiprocess = true\n')
    m = Master(tmp_path, "-c", "cadenza.toml", "--bind", f"127.0.0.1:{free_port()}")
    try:
        m.wait_ready()
        assert get(metrics, "/metrics")[0] == 200
        # What the master imported: ask the process itself, through a signal-free route: its maps.
        maps = Path(f"/proc/{m.pid}/maps").read_text()
        libraries = {line.split()[-1] for line in maps.splitlines() if "/" in line}
        bad_libs = [lib for lib in libraries if any(name in Path(lib).name for name in FORBIDDEN_LIBRARIES)]
        assert bad_libs == [], bad_libs
        rss_kb = int(next(l for l in Path(f"/proc/{m.pid}/status").read_text().splitlines()
                          if l.startswith("VmRSS:")).split()[1])
        assert rss_kb <= 20 * 1024, f"master RSS {rss_kb} kB"
    finally:
        m.signal(signal.SIGTERM)
        m.wait_exit()
        m.close()


def test_the_master_code_path_imports_nothing_forbidden():
    # The modules `cadenza run` loads up to the loop, in a fresh interpreter.
    code = ("import sys, cadenza.cli, cadenza.daemon.boot; "
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = out.split()
    bad = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_MODULES)]
    assert bad == [], bad
