"""Benchmark: a second box joining, and a box lost, with the real vLLM CPU engine (issue 15).

Two boxes on this machine: the console (web with the gateway, worker, beat and relay, as `make run`
starts them, on PostgreSQL) in the root network namespace, and box 2 in a network namespace joined to
it by a bridge, reaching PostgreSQL and Redis through forwarders on the bridge.

- join_s: `manage.py join` with a token from the Nodes page's model, then box 2's worker and relay
  (what `make node` runs), until the console sees box 2's worker beat. Beside it, the worker's own
  start (its process started to its first beat): the floor under any join.
- loss_detect_s: a deployment on any box runs on box 2 (the console's box draining while it is
  placed, then open again); a prober sends a chat through the gateway every 0.1 s; box 2's link is
  cut. The time from the cut to the first request the gateway no longer sends to box 2 (it answers at
  once that no replica is ready).
- replace_overhead_s: from the cut to the first answer of the replacement on the console's box, less
  the replacement engine's own start-up (launch to ready, as the console measured it).

Needs root (network namespaces) and PostgreSQL on 127.0.0.1:5432 (DESIGN.md). Run:
.venv/bin/python bench/nodes.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, console, engine_and_tiny_model, need

PG_ADMIN = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432/postgres")
DATABASE = "bench_nodes"
REDIS_DB = 9
NET = f"10.214.{os.getpid() % 250 + 1}"
BRIDGE, BOX2 = f"{NET}.1", f"{NET}.2"
TAG = str(os.getpid() % 10000)
NETNS, BRIDGE_DEV, OUTSIDE, INSIDE = f"nbox2-{TAG}", f"nbr{TAG}", f"nv2h{TAG}", f"nv2n{TAG}"
GOALS = {"join_s": 30.0, "loss_detect_s": 5.0, "replace_overhead_s": 5.0}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def database_ready() -> str:
    """A fresh database of the bench's own on the local PostgreSQL; exits saying what is missing."""
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {DATABASE}")
    except psycopg.Error as exc:
        raise SystemExit(f"bench/nodes.py needs PostgreSQL at {PG_ADMIN} (set BENCH_PG): {exc}") from None
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{DATABASE}"


class Network:
    """The bridge (the console's box is its .1) and box 2's namespace on a veth pair (.2)."""

    def __enter__(self) -> Network:
        ip("link", "add", BRIDGE_DEV, "type", "bridge")
        ip("addr", "add", f"{BRIDGE}/24", "dev", BRIDGE_DEV)
        ip("link", "set", BRIDGE_DEV, "up")
        ip("netns", "add", NETNS)
        ip("link", "add", OUTSIDE, "type", "veth", "peer", "name", INSIDE)
        ip("link", "set", INSIDE, "netns", NETNS)
        ip("link", "set", OUTSIDE, "master", BRIDGE_DEV)
        ip("link", "set", OUTSIDE, "up")
        for command in (
            ["addr", "add", f"{BOX2}/24", "dev", INSIDE],
            ["link", "set", INSIDE, "up"],
            ["link", "set", "lo", "up"],
        ):
            ip("netns", "exec", NETNS, "ip", *command)
        return self

    def __exit__(self, *exc: object) -> None:
        for command in (["link", "del", OUTSIDE], ["netns", "del", NETNS], ["link", "del", BRIDGE_DEV]):
            subprocess.run(["ip", *command], capture_output=True)


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs, self.running = logs, []

    def start(self, name: str, command: list[str], env: dict[str, str], netns: str | None = None) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [*prefix, *command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        import signal

        for process in reversed(self.running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def until(condition, timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until ``condition()`` held; exits naming ``what`` when it did not within ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"bench/nodes.py: {what} did not happen within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start


class Prober(threading.Thread):
    """A chat through the gateway every 0.1 s, each in its own thread: (sent at, outcome)."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.halt, self.seen = url, key, threading.Event(), []

    def one(self, started: float) -> None:
        import httpx

        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        try:
            answer = httpx.post(self.url, json=body, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)
            outcome = "ok" if answer.status_code == 200 else ("not sent" if "is ready" in answer.text else "failed")
        except Exception:
            outcome = "failed"
        self.seen.append((started, time.monotonic(), outcome))

    def run(self) -> None:
        while not self.halt.wait(0.1):
            threading.Thread(target=self.one, args=(time.monotonic(),), daemon=True).start()


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/nodes.py needs root: it makes a network namespace for the second box")
    socat = need("socat")
    database = database_ready()
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    relay_port, web_port = 18790, 18000
    env = console(
        work,
        redis_db=REDIS_DB,
        DATABASE_URL=database,
        NODE_ADDRESS=BRIDGE,
        RELAY_PORT=str(relay_port),
        CLUSTER_DATABASE_URL=database.replace("127.0.0.1", BRIDGE),
        CLUSTER_REDIS_URL=f"redis://{BRIDGE}:6379/{REDIS_DB}",
        ALLOWED_HOSTS="*",
    )
    engine_python, tiny = engine_and_tiny_model()

    from appliance.jobs import run_job
    from appliance.worker import alive_workers
    from models_catalog.models import LocalModel, ModelJob
    from models_catalog.tasks import model_job_body
    from nodes.models import JoinToken, Node
    from provisioning.models import Deployment, EngineRuntime, Replica
    from provisioning.runtimes import detect
    from tenancy.models import ApiKey, Department

    run_job(ModelJob, LocalModel.request_import(str(tiny), "local/tiny-llama", enqueue=False).pk, model_job_body)
    runtime = next(r for r in detect() if r.python_path == str(engine_python))
    py = str(ROOT / ".venv" / "bin" / "python")
    logs = work / "logs"
    logs.mkdir()
    processes = Processes(logs)
    figures: dict[str, float] = {}
    with Network():
        try:
            for port in (5432, 6379):
                processes.start(
                    f"forward-{port}",
                    [socat, f"TCP-LISTEN:{port},bind={BRIDGE},fork,reuseaddr", f"TCP:127.0.0.1:{port}"],
                    env,
                )
            celery = [py, "-m", "celery", "-A", "appliance"]
            processes.start(
                "web",
                [
                    str(ROOT / ".venv" / "bin" / "uvicorn"),
                    "appliance.asgi:application",
                    "--host",
                    BRIDGE,
                    "--port",
                    str(web_port),
                    "--no-access-log",
                ],
                env,
            )
            processes.start("worker", [*celery, "worker", "--concurrency", "2", "--hostname", "worker@benchnode"], env)
            processes.start("beat", [*celery, "beat", "--schedule", str(work / "beat-schedule")], env)
            processes.start(
                "relay",
                [py, "manage.py", "relay", "--host", BRIDGE, "--port", str(relay_port), "--node", "benchnode"],
                env,
            )
            until(
                lambda: Node.objects.filter(name="benchnode", state="ready").exists(), 60, "the console's worker beat"
            )

            # (a) Joining: the command with a one-time token, then box 2's worker and relay.
            _token, raw = JoinToken.issue(hours=1)
            box2_env = {
                **env,
                "NODE_NAME": "box2",
                "NODE_ADDRESS": BOX2,
                "VAR_DIR": str(work / "box2-var"),
                "DATA_DIR": str(work / "box2-data"),
                "DATABASE_URL": f"sqlite:///{work / 'box2-local.db'}",
            }
            env_file = work / "box2.env"
            started = time.monotonic()
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    NETNS,
                    py,
                    "manage.py",
                    "join",
                    "--console",
                    f"http://{BRIDGE}:{web_port}",
                    "--token",
                    raw,
                    "--name",
                    "box2",
                    "--address",
                    BOX2,
                    "--env-file",
                    str(env_file),
                ],
                cwd=ROOT,
                env=box2_env,
                check=True,
                capture_output=True,
            )
            join_command_s = time.monotonic() - started
            joined = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
            box2_env.update({key: value.strip("'") for key, value in joined.items()})
            worker_started = time.monotonic()
            processes.start(
                "box2-worker", [*celery, "worker", "--concurrency", "2", "--hostname", "worker@box2"], box2_env, NETNS
            )
            processes.start(
                "box2-relay",
                [py, "manage.py", "relay", "--host", BOX2, "--port", str(relay_port), "--node", "box2"],
                box2_env,
                NETNS,
            )
            until(lambda: "worker@box2" in alive_workers(), 60, "box 2's worker beat")
            figures["join_s"] = time.monotonic() - started
            worker_start_s = time.monotonic() - worker_started

            # (b) A replica on box 2, then box 2 cut off.
            EngineRuntime.objects.create(
                node="box2",
                name=runtime.name,
                package=runtime.package,
                version=runtime.version,
                python_path=runtime.python_path,
                status="ready",
            )
            Node.objects.filter(name="benchnode").update(draining=True)
            deployment = Deployment.objects.create(
                name="tiny",
                model=LocalModel.objects.get(),
                runtime=runtime,
                node="benchnode",
                any_node=True,
                gpu_memory_fraction=0.15,
                max_model_len=512,
                extra_args=["--max-num-seqs", "8"],
            )
            department = Department.objects.create(name="Bench")
            department.deployments.set([deployment])
            key = ApiKey.issue(department, "bench")[1]
            replica = Replica.objects.filter(deployment=deployment)
            until(lambda: replica.filter(node="box2", state="ready").exists(), 600, "the replica on box 2 being ready")
            Node.objects.filter(name="benchnode").update(draining=False)
            prober = Prober(f"http://{BRIDGE}:{web_port}/v1/chat/completions", key)
            prober.start()
            until(lambda: any(outcome == "ok" for *_t, outcome in prober.seen), 30, "an answer from box 2")
            cut = time.monotonic()
            ip("link", "set", OUTSIDE, "down")
            until(lambda: any(s > cut and o == "not sent" for s, _e, o in prober.seen), 120, "the gateway stopping")
            figures["loss_detect_s"] = min(s for s, _e, o in prober.seen if s > cut and o == "not sent") - cut
            until(lambda: any(s > cut and o == "ok" for s, _e, o in prober.seen), 600, "an answer from the replacement")
            answered = min(e for s, e, o in prober.seen if s > cut and o == "ok") - cut
            prober.halt.set()
            moved = replica.get()
            engine_start = moved.engine_ready_seconds or 0.0
            figures["replace_overhead_s"] = answered - engine_start
            assert moved.node == "benchnode", moved.node
        finally:
            subprocess.run(["ip", "link", "set", OUTSIDE, "up"], capture_output=True)
            processes.stop_all()
            from provisioning import launcher

            for node in ("benchnode", "box2"):
                for pid in launcher.our_processes(node):
                    launcher.stop(pid, grace=5)

    from django.conf import settings

    rows = [
        (
            "join: manage.py join + box 2's worker to its first beat",
            f"{figures['join_s']:.1f} s",
            f"worker start alone {worker_start_s:.1f} s (join command {join_command_s:.1f} s)",
            "≤ 30 s",
        ),
        (
            "loss: link cut to the gateway no longer sending to box 2",
            f"{figures['loss_detect_s']:.1f} s",
            f"NODE_LOST_SECONDS {settings.NODE_LOST_SECONDS}",
            "≤ 5 s",
        ),
        (
            "replacement: cut to its first answer, less its engine start",
            f"{figures['replace_overhead_s']:.1f} s",
            f"engine start {engine_start:.1f} s (cut to answer {answered:.1f} s)",
            "≤ 5 s",
        ),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for header in (("case", "ours", "baseline / parts", "goal"),):
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    print(json.dumps({name: round(value, 2) for name, value in figures.items()}))


if __name__ == "__main__":
    main()
