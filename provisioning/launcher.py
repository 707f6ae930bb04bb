"""Starting, checking and stopping engine processes (what the command line and environment are is
the engine backend's business: ``provisioning.engines``).

Commands are argument lists; the replica's key goes by environment, never on the command line
where ``ps`` shows it. Each engine runs in its own process group (so a stop reaches its workers
too), marked with ``MARKER`` in its environment, logging to a file.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

MARKER = "APPLIANCE_REPLICA"  # value: "<node>:<replica id>"


def marker_value(node: str, replica_id: int | str) -> str:
    """``replica_id``: a replica's id, or "<id>/<rank>" for a rank of a replica over several boxes."""
    return f"{node}:{replica_id}"


def free_port() -> int:
    """A port nothing listens on now (the engine binds it a moment later; a race is a crash, and
    the restart picks another port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start the engine in its own process group; returns its pid."""
    import subprocess

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return process.pid


def process_marker(pid: int) -> str | None:
    """The "<node>:<replica id>" a process was started for, or None if it is gone or not ours."""
    return _read_marker(pid)[0]


def _read_marker(pid: int) -> tuple[str | None, bool]:
    """(marker or None, whether the process is live with an empty environment: between the two
    halves of an exec, or a kernel thread)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        _reap(pid)
        return None, False
    for entry in environ.split(b"\0"):
        if entry.startswith(MARKER.encode() + b"="):
            return entry.split(b"=", 1)[1].decode(), False
    return None, environ == b""


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it


def alive(pid: int | None, marker: str, settle_seconds: float = 0.5) -> bool:
    """Whether ``pid`` is still the process started for ``marker``. A process in the middle of an
    exec (an engine started through a wrapper script, ``#!/usr/bin/env python3``) shows an empty
    environment for a moment; that is waited out for up to ``settle_seconds``, not taken as a death."""
    if pid is None:
        return False
    deadline = time.monotonic() + settle_seconds
    while True:
        found, pending = _read_marker(pid)
        if not pending or time.monotonic() >= deadline:
            return found == marker
        time.sleep(0.002)


def our_processes(node: str | None = None) -> dict[int, str]:
    """Process-group leaders started by this console (of ``node`` only, when given): {pid: marker}."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            marker = process_marker(pid)
            if marker is not None and (node is None or marker.startswith(f"{node}:")):
                try:
                    if os.getpgid(pid) == pid:
                        found[pid] = marker
                except ProcessLookupError:
                    continue
    return found


def _gone_within(pid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for the process group to disappear (reaping our own children)."""
    deadline = time.monotonic() + seconds
    while True:
        _reap(pid)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop(pid: int, grace: float = 15.0) -> None:
    """SIGTERM to the engine's main process, SIGKILL to whatever is left of its group after ``grace``
    seconds. The main process shuts its engine-core and worker processes down in order; a SIGTERM to
    the whole group at once kills the core under the server, which then logs an EngineDeadError trace
    (measured with vLLM 0.32 CPU: a clean 2 s shutdown instead)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # the main process is gone; members of its group may not be
    if _gone_within(pid, grace):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _gone_within(pid, 5.0)


def note(path: str, text: str) -> None:
    """Append a line of the console's own to an engine log (marked as such)."""
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"\n--- console: {text} ---\n")
    except OSError:
        pass


def log_tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - chars))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


_LOG_PREFIX = re.compile(  # "(EngineCore pid=12) INFO 12-03 19:18:00 [loader.py:123] "
    r"^(?:\(\w+ pid=\d+\)\s*)?(?:[A-Z]+\s+\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s*)?"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_step(path: str) -> str:
    """What a starting engine is doing, from its log's last line (vLLM logs each step: loading the
    weights, profiling memory, capturing graphs), without the level, time and source prefix."""
    for line in reversed(log_tail(path, 2000).splitlines()):
        text = _LOG_PREFIX.sub("", _ANSI.sub("", line)).strip()
        if text:
            return text[:160]
    return ""
