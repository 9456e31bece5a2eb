"""uvicorn's own multi-worker supervisor on the socket systemd passes as fd 3.

`uvicorn --fd 3 --workers N` would do the same, but uvicorn reopens that fd as AF_UNIX
(`socket.fromfd(fd, AF_UNIX, ...)`), so asyncio skips TCP_NODELAY and every response waits on
Nagle + delayed ACK (~40 ms). This is `uvicorn.main.run()`'s `workers > 1` branch with the
socket taken as `socket.socket(fileno=3)`, which detects the family; server settings match
cadenza's built-in worker (h11, no access log, no lifespan, no Server header).

    python uvicorn_main.py MODULE:APP WORKERS GRACEFUL_SECONDS
"""
import os
import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

if __name__ == "__main__":
    app, workers, graceful = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sys.path.insert(0, os.getcwd())
    config = uvicorn.Config(app, workers=workers, http="h11", lifespan="off", access_log=False,
                            server_header=False, timeout_graceful_shutdown=graceful)
    Multiprocess(config, sockets=[socket.socket(fileno=3)]).run()
