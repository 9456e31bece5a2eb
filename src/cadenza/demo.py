"""`cadenza.demo:app`, the name configs already use; the app lives in cadenza.worker.demo."""

from cadenza.worker.demo import app  # noqa: F401
