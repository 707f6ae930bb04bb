"""Ending the processes the tests start (servers, relays, fake providers)."""

from __future__ import annotations

import os
import signal
import subprocess


def end(process: subprocess.Popen | None, grace: float = 10, group: bool = False) -> None:
    """Stop ``process`` if it still runs: asked first (SIGTERM), killed when it has not ended after
    ``grace`` s. ``group``: its whole process group (one started with ``start_new_session``)."""
    if process is None or process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    send(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(10)
