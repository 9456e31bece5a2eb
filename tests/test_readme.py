"""The README's "Deploying with systemd" block, run as written in a real systemd 252, and its
config examples, run as written by a real master."""
from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest

import sdns
from procs import VENV_BIN, Master, free_port, get

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


# ---- the config examples -----------------------------------------------------------------------

DEMO = {
    "__init__.py": "",
    "wsgi.py": 'def application(environ, start_response):\n'
               '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
               '    return [b"hello from demo.wsgi\\n"]\n',
    "asgi.py": 'async def app(scope, receive, send):\n'
               '    if scope["type"] != "http":\n'
               '        return\n'
               '    await send({"type": "http.response.start", "status": 200, "headers": []})\n'
               '    await send({"type": "http.response.body", "body": b"hello from demo.asgi\\n"})\n',
}


def config_blocks() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2, "README.md has a new or lost ```toml block: run it here too"
    return blocks


def get_unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


@pytest.mark.parametrize("index", [0, 1], ids=["cadenza.toml", "command-worker"])
def test_readme_config_examples_run_as_written(tmp_path, index):
    """Each ```toml block of the README serves, as written, from a release holding a `demo` package
    (and a venv's uvicorn); only /srv/demo, /run/cadenza/demo and port 8000 are moved into the test's
    own directory."""
    block = config_blocks()[index]
    # The shipped unit creates /run/cadenza/APP (RuntimeDirectory=) and nothing else under /run.
    assert all(path.startswith("/run/cadenza/demo/") for path in re.findall(r"/run/[^\";]*", block)), block
    root, run, port = tmp_path / "srv", tmp_path / "run", free_port()
    release = root / "releases" / "1"
    (release / "demo").mkdir(parents=True)
    for name, text in DEMO.items():
        (release / "demo" / name).write_text(text)
    (release / ".venv" / "bin").mkdir(parents=True)
    (release / ".venv" / "bin" / "uvicorn").symlink_to(VENV_BIN / "uvicorn")
    (root / "current").symlink_to("releases/1")
    run.mkdir()
    text = (block.replace("/srv/demo", str(root)).replace("/run/cadenza/demo", str(run))
            .replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    args = []
    if "[listen]" not in text:
        args += ["--bind", f"127.0.0.1:{port}"]
    if "[control]" not in text:
        text += f'\n[control]\nsocket = "{run / "control.sock"}"\n'
    (release / "cadenza.toml").write_text(text)
    m = Master(tmp_path, "-c", str(root / "current" / "cadenza.toml"), *args, cwd=root / "current")
    try:
        ready = m.wait_ready(timeout=30)
        count = int(re.search(r"^count = (\d+)", text, re.M)[1]) if "count =" in text else 2
        assert f"{count}/{count} workers ready" in ready["STATUS"], ready
        expected = "hello from demo.asgi" if "asgi" in text else "hello from demo.wsgi"
        assert get(port) == (200, expected + "\n")
        for path in re.findall(r'"unix:([^";]+)', text):
            answer = get_unix(path)
            assert answer.startswith("HTTP/1.1 200") and expected in answer, answer
        m.signal(signal.SIGTERM)
        assert m.wait_exit() == 0
    finally:
        m.close()
