"""Bad input, generated: the config loader, LISTEN_* variables, control-socket messages and
unexpected signals always meet a clean error, never a traceback or a dead master."""
from __future__ import annotations

import json
import os
import signal
import socket
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from cadenza import config
from cadenza.listeners import ListenerError, adopt_from_env
from procs import Master, free_port, get

CORPUS = [
    "[app]\nname = ", "[workers\ncount = 2", "[workers]\ncount = 2\ncount = 3\n", "[[workers]]\n",
    "[workers]\ncommand = [1, 2]\n", "[listen]\naddresses = \"127.0.0.1:1\"\n", "\x00\x01\x02",
    "[app]\nname = \"../../etc\"\n", "[workers]\nready = \"uptime:\"\n", "[upgrade]\ntimeout = nan\n",
    "[control]\nallow_users = [\"\"]\n", "[workers]\napp = \"a:b:c\"\n", "[app.x]\ny = 1\n",
]
VALID = "[app]\nname = \"demo\"\n[workers]\ncount = 2\napp = \"cadenza.demo:app\"\n[upgrade]\ntimeout = 5\n"


def loads_cleanly(text: str) -> None:
    try:
        config.parse(text, "fuzz.toml")
    except config.ConfigError as exc:
        assert exc.problems and all(p.startswith("fuzz.toml") for p in exc.problems), exc.problems


def test_config_corpus():
    for text in CORPUS:
        loads_cleanly(text)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_config_random_text(text):
    loads_cleanly(text)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(1, 8), st.text(max_size=8))
def test_config_mutations(at, cut, insert):
    loads_cleanly(VALID[:at] + insert + VALID[at + cut:])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=12)), st.one_of(st.none(), st.text(max_size=12)),
       st.one_of(st.none(), st.text(max_size=30)))
def test_listen_variables(fds, pid, names):
    env = {k: v for k, v in (("LISTEN_FDS", fds), ("LISTEN_PID", pid), ("LISTEN_FDNAMES", names)) if v is not None}
    # Only what can never be a real socket here: this process holds no fds 3+ from systemd, so a
    # count that would reach one is kept away from fds the test runner itself uses.
    if fds is not None and fds.strip().isdigit() and pid is not None and pid.strip() == str(os.getpid()):
        env["LISTEN_PID"] = "1"
    try:
        assert adopt_from_env(env) == []
    except ListenerError as exc:
        assert "LISTEN_" in str(exc)
    assert not any(k.startswith("LISTEN_") for k in env)


def test_control_socket_garbage_and_unexpected_signals(tmp_path):
    sock_path = tmp_path / "ctl.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[workers]\ncount = 1\napp = "cadenza.demo:app"\n[control]\nsocket = "{sock_path}"\n')
    port = free_port()
    m = Master(tmp_path, "-c", str(cfg), "--bind", f"127.0.0.1:{port}")
    try:
        m.wait_ready()
        rnd = __import__("random").Random(3)
        for i in range(200):
            blob = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))
            if i % 3 == 0:
                blob = json.dumps({"cmd": rnd.choice(["status", "scale", "x", 5, None]),
                                   "count": rnd.choice(["", "+", "-0", "abc", 10**9, None])}).encode()
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock_path))
                s.settimeout(10)
                s.sendall(blob + b"\n")
                data = s.recv(65536)
            answer = json.loads(data.split(b"\n")[0])
            assert "done" in answer or "event" in answer
        for sig in (signal.SIGUSR1, signal.SIGALRM, signal.SIGPIPE, signal.SIGWINCH):
            os.kill(m.pid, sig)
        assert get(port)[0] == 200
        m.wait_log("ignored SIGUSR1: cadenza gives it no meaning")
        assert m.proc.poll() is None
    finally:
        m.close()
