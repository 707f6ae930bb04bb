"""Building the vLLM command and starting, checking and stopping its process.

Commands are argument lists built by small functions; the replica's key goes by environment
(``VLLM_API_KEY``), never on the command line where ``ps`` shows it. Each engine runs in its own
process group (so a stop reaches its workers too), bound to 127.0.0.1, logging to a file.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx

MARKER = "APPLIANCE_REPLICA"  # value: "<node>:<replica id>"

# Extra vLLM arguments an admin may add: name → takes a value. Anything else is refused; so are
# the ones the console sets itself (host, port, key, model, served name).
ALLOWED_ARGS: dict[str, bool] = {
    "--dtype": True,
    "--max-num-seqs": True,
    "--max-num-batched-tokens": True,
    "--enable-prefix-caching": False,
    "--no-enable-prefix-caching": False,
    "--enable-chunked-prefill": False,
    "--kv-cache-dtype": True,
    "--quantization": True,
    "--enforce-eager": False,
    "--scheduling-policy": True,
    "--seed": True,
    "--swap-space": True,
    "--block-size": True,
    "--generation-config": True,
    "--disable-log-requests": False,
    "--enable-auto-tool-choice": False,
    "--tool-call-parser": True,
    "--reasoning-parser": True,
    "--max-logprobs": True,
}
VALUE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


class ArgumentRefused(ValueError):
    """An extra argument outside the allowlist, or a malformed value."""


def check_extra_args(args: list[str], trust_remote_code_allowed: bool = False) -> list[str]:
    """Validate admin-supplied extra arguments; returns them unchanged or raises ArgumentRefused."""
    checked: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        name, _, inline = arg.partition("=")
        if name == "--trust-remote-code":
            if not trust_remote_code_allowed:
                raise ArgumentRefused(
                    "--trust-remote-code runs code from the model: an admin must allow it for this model."
                )
            checked.append(arg)
            position += 1
            continue
        if name not in ALLOWED_ARGS:
            raise ArgumentRefused(f"{name} is not an allowed vLLM argument here.")
        if ALLOWED_ARGS[name]:
            value = inline if inline else (args[position + 1] if position + 1 < len(args) else "")
            if not value or value.startswith("--") or set(value) - VALUE_CHARS or len(value) > 100:
                raise ArgumentRefused(f"{name} needs a plain value (letters, digits, . _ - :).")
            checked += [name, value]
            position += 1 if inline else 2
        else:
            if inline:
                raise ArgumentRefused(f"{name} takes no value.")
            checked.append(name)
            position += 1
    return checked


def build_command(
    python: str,
    model_path: str,
    served_name: str,
    port: int,
    *,
    gpu_memory_fraction: float,
    tensor_parallel: int = 1,
    max_model_len: int | None = None,
    extra_args: list[str] | None = None,
) -> list[str]:
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--gpu-memory-utilization", f"{gpu_memory_fraction:g}",
    ]  # fmt: skip
    if tensor_parallel > 1:
        command += ["--tensor-parallel-size", str(tensor_parallel)]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    return command + list(extra_args or [])


def marker_value(node: str, replica_id: int) -> str:
    return f"{node}:{replica_id}"


def build_environment(marker: str, api_key: str, gpu_ids: list[int], cpu: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "VLLM_"))}
    env.update({"VLLM_API_KEY": api_key, MARKER: marker, "PYTHONUNBUFFERED": "1"})
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    for secret in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "METRICS_TOKEN"):
        env.pop(secret, None)  # the engine needs none of the console's secrets
    return env


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


def our_processes() -> dict[int, str]:
    """Process-group leaders started by this console: {pid: marker}."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            marker = process_marker(pid)
            if marker is not None:
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
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _gone_within(pid, grace):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _gone_within(pid, 5.0)


def probe_ready(port: int, api_key: str, served_name: str, timeout: float = 1.0) -> bool:
    """Ready when /health answers 200 and /v1/models lists the served name."""
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout).status_code != 200:
            return False
        models = httpx.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )
    except httpx.HTTPError:
        return False
    if models.status_code != 200:
        return False
    return any(item.get("id") == served_name for item in models.json().get("data", []))


def log_tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - chars))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
