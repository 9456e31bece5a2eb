"""TLS from the built-in worker under a real systemd 252 (tests/sdns.py): `[http] certfile` and
`keyfile` (README, the `[http]` table) on the listener a socket unit passes, through
`systemctl reload` to a release with a certificate of its own.

The unit shares the host's network: the test's clients reach 127.0.0.1:PORT, which APP.socket holds.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path

from deploy import AppRoot
from handover_fixtures import APP, UNIT, Hammer, status
from procs import free_port, self_signed


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, under `directory`."""
    return self_signed(directory, "IP:127.0.0.1")


def tls(cert: Path, key: Path) -> str:
    return f"[http]\ncertfile = {json.dumps(str(cert))}\nkeyfile = {json.dumps(str(key))}\n"


def trusting(*certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs[0]))
    for cert in certs[1:]:
        context.load_verify_locations(cafile=str(cert))
    return context


def https_get(port: int, context: ssl.SSLContext) -> tuple[int, str, str]:
    """(status, body, TLS version) of one verified GET on a new connection."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", "/")
        version = conn.sock.version()   # before the response: a "Connection: close" one drops conn.sock
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), version
    finally:
        conn.close()


def plain_http(port: int) -> bytes:
    """What a plain-HTTP request on a new connection gets back before the connection ends."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        try:
            while chunk := raw.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
        return reply


def test_tls_on_the_socket_activated_listener_survives_a_reload_to_a_new_certificate(systemd):
    site = AppRoot(systemd.state, APP, free_port())
    # Under ROOT/shared: kept across releases, and where the unit's service can read it.
    cert1, key1 = certificate(site.root / "shared" / "tls-r1")
    cert2, key2 = certificate(site.root / "shared" / "tls-r2")
    site.deploy("r1", config_extra=tls(cert1, key1))
    site.pin()
    for name, text in site.units().items():
        systemd.write_unit(name, text)
    systemd.systemctl("daemon-reload", check=True)
    systemd.systemctl("start", f"{APP}.socket", UNIT, check=True)

    code, body, version = https_get(site.port, trusting(cert1))
    assert (code, body.split(" pid")[0]) == (200, "release r1"), (code, body)
    assert version.startswith("TLSv1."), version
    reply = plain_http(site.port)
    assert not reply.startswith(b"HTTP/1.1 200") and b"release" not in reply, reply
    # The plain request cost its connection only: the worker still serves TLS.
    assert https_get(site.port, trusting(cert1))[:1] == (200,)

    both = trusting(cert1, cert2)
    clients = Hammer(site.port, context=both, new_connection=lambda: https_get(site.port, both)[:2])
    try:
        site.deploy("r2", config_extra=tls(cert2, key2))
        reload = systemd.systemctl("reload", APP)
        assert reload.returncode == 0, reload.stderr + systemd.journal("-o", "cat", "-n", "40")
        # The reload returned once generation 1 drained: every worker now serves r2's certificate.
        code, body, version = https_get(site.port, trusting(cert2))
        assert (code, body.split(" pid")[0]) == (200, "release r2"), (code, body)
        assert version.startswith("TLSv1."), version
        try:
            https_get(site.port, trusting(cert1))
        except ssl.SSLCertVerificationError:
            pass
        else:
            raise AssertionError("r2's workers still present r1's certificate")
        assert status(site)["generation"] == 2
    finally:
        clients.finish()
    seen = clients.check()
    assert set(seen) == {"release r1", "release r2"}, seen
    reply = plain_http(site.port)
    assert not reply.startswith(b"HTTP/1.1 200") and b"release" not in reply, reply
