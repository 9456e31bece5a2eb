"""A FastAPI application: lifespan state, a shutdown hook that leaves a marker, a WebSocket.

The lifespan's startup puts "TAG PID" into the state that every request sees (/state); its
shutdown writes ROOT/run/shutdown-TAG-PID. /ws greets with "release TAG pid PID", then echoes.
"""

import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

HERE = Path(__file__).resolve().parent       # ROOT/releases/TAG
TAG = HERE.name
RUN = HERE.parent.parent / "run"


@asynccontextmanager
async def lifespan(app):
    started = f"{TAG} {os.getpid()}"
    yield {"started": started}
    (RUN / f"shutdown-{TAG}-{os.getpid()}").write_text(f"started {started}\n")


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index():
    return f"release {TAG} pid {os.getpid()}\n"


@app.get("/state", response_class=PlainTextResponse)
async def state(request: Request):
    return f"started {request.state.started}\n"


@app.websocket("/ws")
async def echo(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_text(f"release {TAG} pid {os.getpid()}")
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
