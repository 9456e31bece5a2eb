"""Listeners: address parsing, binding, and adopting systemd's fds (sd_listen_fds(3)) for real."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from cadenza import listeners as L
from cadenza.listeners import ListenerError, adopt_from_env, bind, bind_all, parse_address


@pytest.mark.parametrize("text, family, host, port, path, mode", [
    ("127.0.0.1:8000", socket.AF_INET, "127.0.0.1", 8000, "", None),
    (":8000", socket.AF_INET, "0.0.0.0", 8000, "", None),
    ("[::1]:9", socket.AF_INET6, "::1", 9, "", None),
    ("unix:/run/a.sock", socket.AF_UNIX, "", 0, "/run/a.sock", None),
    ("unix:/run/a.sock;mode=0660", socket.AF_UNIX, "", 0, "/run/a.sock", 0o660),
])
def test_parse_address(text, family, host, port, path, mode):
    a = parse_address(text)
    assert (a.family, a.host, a.port, a.path, a.mode) == (family, host, port, path, mode)


@pytest.mark.parametrize("text, reason", [
    ("local_host:80", "neither a numeric IP address nor a host name"),
    ("300.1.1.1:80", "neither a numeric IP address nor a host name"),
    ("127.0.0.1", "needs a port"),
    ("127.0.0.1:70000", "port must be a number from 0 to 65535"),
    ("[::1]8000", "IPv6 address must look like"),
    ("unix:relative.sock", "must be absolute"),
    ("unix:/a.sock;mode=rw", "must be octal"),
    ("unix:/a.sock;owner=me", "unknown unix socket option"),
])
def test_bad_addresses_say_why(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_address(text)


def test_bind_unix_with_mode_and_replace_stale_socket(tmp_path):
    path = tmp_path / "s.sock"
    first = bind(parse_address(f"unix:{path};mode=0600"), "listen-1")
    first.sock.close()                       # a stale socket file of an earlier run
    again = bind(parse_address(f"unix:{path};mode=0640"), "listen-1")
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert again.describe() == f"unix:{path}"
    again.sock.close()


def test_bind_failure_names_address_and_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ListenerError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use; "
                                                "another process listens there"):
            bind(parse_address(f"127.0.0.1:{port}"), "listen-1")


@pytest.mark.parametrize("text, host", [("localhost:80", "localhost"), ("api.example.com.:443", "api.example.com."),
                                        ("my-host:1", "my-host"), ("a1.b2:2", "a1.b2")])
def test_host_names_are_kept_for_the_bind(text, host):
    a = parse_address(text)
    assert (a.family, a.host, str(a)) == (socket.AF_UNSPEC, host, text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_name_listens_on_each_of_its_addresses():
    port = free_port()
    expected = {f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}"
                for info in socket.getaddrinfo("localhost", port, 0, socket.SOCK_STREAM)}
    bound = bind_all([f"localhost:{port}"], ['--bind "localhost"'])
    try:
        assert {l.describe() for l in bound} == expected and f"127.0.0.1:{port}" in expected
        assert [l.name for l in bound] == [f"listen-{i}" for i in range(1, len(bound) + 1)]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        for listener in bound:
            listener.sock.close()


def test_a_name_that_does_not_resolve_names_its_origin():
    with pytest.raises(ListenerError) as info:
        bind_all(["127.0.0.1:0", "nothing.invalid:8000"], ["a", '--bind "nothing.invalid:8000"'])
    assert str(info.value).startswith('--bind "nothing.invalid:8000": cannot listen on nothing.invalid:8000: '
                                      "the host name 'nothing.invalid' does not resolve (")
    assert "use a numeric address such as 127.0.0.1:8000 or [::1]:8000" in str(info.value)


def test_a_name_that_is_a_listed_address_again_is_refused_and_nothing_stays_bound():
    port = free_port()
    with pytest.raises(ListenerError, match=f'^--bind "localhost": localhost:{port} is 127.0.0.1:{port}, which '
                                            f'--bind "127" names already; list each address once$'):
        bind_all([f"127.0.0.1:{port}", f"localhost:{port}"], ['--bind "127"', '--bind "localhost"'])
    bind(parse_address(f"127.0.0.1:{port}"), "listen-1").sock.close()   # closed again: free


def test_an_address_of_a_name_this_machine_lacks_is_skipped():
    # What ::1 is to a machine without IPv6: EADDRNOTAVAIL. TEST-NET-1 is configured nowhere.
    bound: list = []
    missing = L._bind_one(parse_address("192.0.2.1:80"), parse_address("example.test:80"), "x", bound, {})
    assert missing == "192.0.2.1:80 (Cannot assign requested address)" and bound == []
    with pytest.raises(ListenerError, match="^x: cannot listen on 192.0.2.1:80: Cannot assign requested address"):
        L._bind_one(parse_address("192.0.2.1:80"), parse_address("192.0.2.1:80"), "x", bound, {})


def test_listen_variables_meant_for_another_pid_are_ignored_and_consumed():
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert adopt_from_env(env) == []
    assert env == {"OTHER": "kept"}


@pytest.mark.parametrize("fds, pid", [("two", None), ("1", "abc")])
def test_malformed_listen_variables_are_an_error(fds, pid):
    env = {"LISTEN_FDS": fds, "LISTEN_PID": pid or str(os.getpid())}
    with pytest.raises(ListenerError, match="are not numbers"):
        adopt_from_env(env)


ADOPT = """
import json, os, socket, sys
from cadenza.listeners import adopt_from_env, ListenerError
os.environ["LISTEN_PID"] = str(os.getpid())
try:
    out = [[l.name, l.describe(), l.sock.family.name] for l in adopt_from_env()]
except ListenerError as exc:
    out = str(exc)
print(json.dumps({"out": out, "left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
"""


def adopt_in_child(socks, names: str) -> dict:
    """A child with `socks` at fds 3..n and LISTEN_* set, as systemd starts a service."""
    def place():
        for i, s in enumerate(socks):
            os.dup2(s.fileno(), 3 + i)
    env = {**os.environ, "LISTEN_FDS": str(len(socks)), "LISTEN_FDNAMES": names}
    proc = subprocess.run([sys.executable, "-c", ADOPT], preexec_fn=place, close_fds=False, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_adopts_tcp_v4_v6_and_unix_by_name(tmp_path):
    v4 = socket.create_server(("127.0.0.1", 0))
    v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    ux = socket.socket(socket.AF_UNIX)
    ux.bind(str(tmp_path / "u.sock"))
    ux.listen()
    result = adopt_in_child([v4, v6, ux], "web:web6:admin")
    assert [row[0] for row in result["out"]] == ["web", "web6", "admin"]
    assert [row[2] for row in result["out"]] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert result["out"][0][1] == f"127.0.0.1:{v4.getsockname()[1]}"
    assert result["left"] == []               # consumed: nothing leaks to what we start


def test_refuses_a_datagram_or_non_listening_fd():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert "not a TCP or unix stream socket" in adopt_in_child([udp], "dns")["out"]
    idle = socket.socket()
    assert "is not listening" in adopt_in_child([idle], "idle")["out"]
