"""`[http] proxy_headers`: the client's address and scheme from a trusted proxy's headers.

A connection is trusted when its peer is in `forwarded_allow_ips` (addresses or networks), or the
list holds "*", or it came through a unix-socket listener and the list holds "unix" (nginx
`proxy_pass http://unix:/run/app.sock`: the peer has no address, and only local processes
that may open the socket file can connect). From a trusted peer:

- `X-Forwarded-Proto` (http, https, ws, wss) becomes the scope's scheme;
- `X-Forwarded-For` is read from the right, skipping trusted proxies, and the first untrusted
  address becomes the client (port 0). When every hop is trusted, the leftmost one is.

From an untrusted peer both headers are left to the application unchanged and unused.
"""

from __future__ import annotations

import functools
import ipaddress

SCHEMES = {"http", "https", "ws", "wss"}


class ProxyHeaders:
    def __init__(self, app, allow: list[str] | tuple[str, ...]) -> None:
        self.app = app
        self.trust_all = "*" in allow
        self.trust_unix = "unix" in allow
        self.networks = [ipaddress.ip_network(item, strict=False) for item in allow
                         if item not in ("*", "unix")]
        self.trusted = functools.lru_cache(maxsize=1024)(self._trusted)

    def _trusted(self, host: str) -> bool:
        if self.trust_all:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if (self.trust_unix or self.trust_all) if client is None else self.trusted(client[0]):
                self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope) -> None:
        forwarded_for: list[str] = []
        proto = None
        for name, value in scope["headers"]:
            if name == b"x-forwarded-proto":
                proto = value.decode("latin-1").strip().lower()
            elif name == b"x-forwarded-for":
                forwarded_for.extend(hop.strip() for hop in value.decode("latin-1").split(","))
        if proto in SCHEMES:
            scope["scheme"] = proto.replace("http", "ws") if scope["type"] == "websocket" else proto
        hops = [hop for hop in forwarded_for if hop]
        if hops:
            client = next((hop for hop in reversed(hops) if not self.trusted(hop)), hops[0])
            scope["client"] = (client, 0)
