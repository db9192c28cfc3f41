"""The one free-port helper: the learner's rendezvous, the vLLM server and the tests ask here."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it; a race with another binder is possible,
    so callers that can retry on "address in use" should)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["free_port"]
