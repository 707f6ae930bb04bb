"""Ending the processes the tests start (servers, relays, fake providers)."""

from __future__ import annotations

import subprocess


def end(process: subprocess.Popen | None, grace: float = 10) -> None:
    """Stop ``process`` if it still runs: asked first (SIGTERM), killed when it has not ended after ``grace`` s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
