"""The reconcile loop: compare what the database wants with what runs on this node, and converge.

One pass per tick per node, under a Redis lock so two workers never act at once. Idempotent: a
replica whose process is alive is never launched again (that is how replicas are adopted after a
console or worker restart); a process nobody wants is stopped.
"""

from __future__ import annotations

import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.utils import timezone

from appliance.worker import redis_client
from models_catalog import copies
from models_catalog.models import ModelCopy
from nodes.models import Node
from provisioning import launcher, relay
from provisioning.engines import ArgumentRefused, engine_for
from provisioning.engines.vllm import MultiNode
from provisioning.models import Deployment, EngineRuntime, Replica, ReplicaPart
from provisioning.placement import PlacementRefused, place
from provisioning.scheduler import part_boxes, runtime_on, too_few_boxes

S = Replica.State


def _save(replica: Replica, **fields: Any) -> None:
    for key, value in fields.items():
        setattr(replica, key, value)
    Replica.objects.filter(pk=replica.pk).update(**fields)


def ensure_replicas(node: str) -> None:
    """One replica row per wanted ordinal of the deployments pinned to this box; ordinals beyond the
    count are stopped by ``step``. Those placed on any box get theirs from ``scheduler``."""
    for deployment in Deployment.objects.filter(node=node, desired=Deployment.Desired.RUNNING, any_node=False):
        have = {r.ordinal: r for r in deployment.replica_set.all()}
        for ordinal in range(deployment.replicas):
            replica = have.get(ordinal)
            if replica is None:
                Replica.objects.create(deployment=deployment, ordinal=ordinal, node=node)
            elif replica.state == S.STOPPED:
                _save(replica, state=S.PENDING, consecutive_crashes=0, last_error="", next_start_at=None)


def engine_arguments(deployment: Deployment) -> list[str]:
    """The deployment's extra engine arguments, checked again now: the model's permission to run its
    own code may have been withdrawn since the deployment was saved, and a row may have been written
    by something other than the deploy form. Raises ``engines.ArgumentRefused``."""
    allowed = deployment.model.allow_remote_code
    args = engine_for(deployment.runtime).check_args(
        list(deployment.extra_args or []), trust_remote_code_allowed=allowed
    )
    if deployment.trust_remote_code:
        if not allowed:
            raise ArgumentRefused(
                f"the deployment asks for --trust-remote-code, which the model {deployment.model} does not allow."
            )
        if "--trust-remote-code" not in args:
            args.append("--trust-remote-code")
    return args


def launch(replica: Replica) -> None:
    """Place and start one replica; a refusal fails it with the reason, leaving nothing behind."""
    deployment = replica.deployment
    runtime = runtime_on(deployment, replica.node)
    if runtime is None or runtime.status != EngineRuntime.Status.READY or not Path(runtime.python_path).exists():
        _save(replica, state=S.FAILED, last_error=f"The engine runtime {runtime or deployment.runtime.package} is "
                                                  f"not installed or broken on {replica.node}.")  # fmt: skip
        return
    model = deployment.model
    if deployment.any_node and model.is_usable and not model.held_on(replica.node):
        _wait_for_copy(replica)
        return
    if not model.is_usable or not model.ready_path.exists():
        _save(replica, state=S.FAILED, last_error=f"The model {model} is not ready ({model.get_status_display()}).")
        return
    try:
        extra_args = engine_arguments(deployment)
    except ArgumentRefused as exc:
        _save(replica, state=S.FAILED, last_error=f"Refused to start: {exc}")
        return
    boxes: list[str] = []
    if deployment.nodes_per_replica > 1:
        found = _other_ranks(replica)
        if found is None:
            return
        boxes = found
    _save(replica, state=S.PLACING)
    try:
        gpu_ids = replica.gpu_ids if replica.restart_count and replica.gpu_ids else place(deployment, replica.node)
    except PlacementRefused as exc:
        _save(replica, state=S.FAILED, last_error=str(exc))
        return
    key = secrets.token_urlsafe(32)
    replica.set_key(key)
    port = launcher.free_port()
    multinode = None
    if boxes:  # rank 0 here; the other ranks join it at this box's cluster address
        address = settings.NODE_ADDRESS
        multinode = MultiNode(len(boxes) + 1, 0, address, launcher.free_port(), address)
    command = engine_for(runtime).command(
        runtime.python_path,
        str(model.ready_path),
        deployment.name,
        port,
        gpu_memory_fraction=deployment.gpu_memory_fraction,
        tensor_parallel=deployment.tensor_parallel,
        max_model_len=deployment.max_model_len,
        extra_args=extra_args,
        version=runtime.version,
        pipeline_parallel=deployment.pipeline_parallel,
        multinode=multinode,
    )
    log_path = Path(settings.DATA_DIR) / "logs" / "replicas" / f"{deployment.name}-{replica.ordinal}.log"
    marker = launcher.marker_value(replica.node, replica.pk)
    env = engine_for(runtime).environment(marker, key, gpu_ids, runtime.is_cpu, multinode, settings.ENGINE_CPU_BIND)
    try:
        pid = launcher.start(command, env, log_path)
    except OSError as exc:
        _save(replica, state=S.FAILED, last_error=f"The engine could not be started: {exc}")
        return
    _save(
        replica,
        state=S.STARTING,
        pid=pid,
        port=port,
        gpu_ids=gpu_ids,
        key_sealed=replica.key_sealed,
        log_path=str(log_path),
        started_at=timezone.now(),
        ready_at=None,
        next_start_at=None,
    )
    if multinode is not None:  # each box starts its rank at its next pass
        master = f"{multinode.master_addr}:{multinode.master_port}"
        ReplicaPart.objects.filter(replica=replica).delete()
        ReplicaPart.objects.bulk_create(ReplicaPart(replica=replica, rank=rank, node=box, master=master)
                                        for rank, box in enumerate(boxes, start=1))  # fmt: skip
    publish_routes(replica.node)  # before it can be marked ready: the relay must know it first
    from provisioning.tasks import watch_startup

    # Readiness within a fraction of a second instead of at the next tick; the loop checks too.
    watch_startup.apply_async(args=[replica.pk, pid], queue=f"node.{replica.node}")


def _other_ranks(replica: Replica) -> list[str] | None:
    """The boxes for ranks 1.. of a replica over several boxes, when they can start now; otherwise
    None, and the replica waits (pending) saying why: too few boxes, or the model on its way there."""
    deployment = replica.deployment
    boxes, reasons = part_boxes(deployment, replica.node)
    if len(boxes) < deployment.nodes_per_replica - 1:
        _save(replica, state=S.PENDING, last_error=too_few_boxes(deployment, reasons))
        return None
    waiting = [box for box in boxes if not deployment.model.held_on(box)]
    for box in waiting:
        copies.request_copy(deployment.model, box)
    if waiting:
        _save(replica, state=S.PENDING, last_error=f"Waiting for the model to be copied to {', '.join(waiting)}.")
        return None
    return boxes


def part_marker(part: ReplicaPart) -> str:
    return launcher.marker_value(part.node, f"{part.replica_id}/{part.rank}")


def launch_part(part: ReplicaPart) -> None:
    """Start a headless rank of a replica over several boxes on this box."""
    replica = part.replica
    deployment = replica.deployment
    runtime = runtime_on(deployment, part.node)
    model = deployment.model
    if runtime is None or not model.held_on(part.node):
        why = f"No engine runtime or model on {part.node}."
        ReplicaPart.objects.filter(pk=part.pk).update(state=ReplicaPart.State.EXITED, last_error=why)
        return
    master_addr, _sep, master_port = part.master.rpartition(":")
    multinode = MultiNode(deployment.nodes_per_replica, part.rank, master_addr, int(master_port), settings.NODE_ADDRESS)
    engine = engine_for(runtime)
    command = engine.part_command(
        runtime.python_path, str(model.ready_path), deployment.name, multinode,
        gpu_memory_fraction=deployment.gpu_memory_fraction, tensor_parallel=deployment.tensor_parallel,
        pipeline_parallel=deployment.pipeline_parallel, max_model_len=deployment.max_model_len,
        extra_args=engine_arguments(deployment),
    )  # fmt: skip
    env = engine.environment(part_marker(part), "", [], runtime.is_cpu, multinode, settings.ENGINE_CPU_BIND)
    log_path = (
        Path(settings.DATA_DIR) / "logs" / "replicas" / f"{deployment.name}-{replica.ordinal}-rank{part.rank}.log"
    )
    try:
        pid = launcher.start(command, env, log_path)
    except OSError as exc:
        ReplicaPart.objects.filter(pk=part.pk).update(state=ReplicaPart.State.EXITED, last_error=str(exc))
        return
    ReplicaPart.objects.filter(pk=part.pk).update(state=ReplicaPart.State.RUNNING, pid=pid, log_path=str(log_path),
                                                  started_at=timezone.now())  # fmt: skip


def step_parts(node: str) -> None:
    """This box's ranks of replicas over several boxes: start the new ones, report the dead ones
    (rank 0's box then restarts the whole replica)."""
    parts = ReplicaPart.objects.filter(node=node).exclude(state=ReplicaPart.State.EXITED)
    for part in parts.select_related("replica__deployment__model", "replica__deployment__runtime"):
        if part.state == ReplicaPart.State.PENDING:
            launch_part(part)
        elif not launcher.alive(part.pid, part_marker(part)):
            ReplicaPart.objects.filter(pk=part.pk).update(
                state=ReplicaPart.State.EXITED, last_error=launcher.log_tail(part.log_path, 1500)
            )


def part_trouble(replica: Replica) -> str | None:
    """Why a replica over several boxes is broken (a rank gone, or its box), or None."""
    parts = list(replica.parts.all())
    if len(parts) != replica.deployment.nodes_per_replica - 1:
        return "A rank of the engine is missing."
    lost = set(Node.objects.filter(name__in=[p.node for p in parts], state=Node.State.UNREACHABLE)
               .values_list("name", flat=True))  # fmt: skip
    for part in parts:
        if part.state == ReplicaPart.State.EXITED:
            return (
                f"Rank {part.rank} of the engine, on {part.node}, exited: every rank is restarted.\n{part.last_error}"
            )
        if part.node in lost:
            return f"{part.node}, which ran rank {part.rank} of the engine, is unreachable: every rank is restarted."
    return None


def _wait_for_copy(replica: Replica) -> None:
    """A replica on a box without its model stays pending while the model is copied there (a failed
    copy is the scheduler's to act on: it moves the replica to another box)."""
    model = replica.deployment.model
    copy = copies.copy_on(model, replica.node)
    if copy is None or copy.status == ModelCopy.Status.READY:  # none asked yet, or an old commit
        copy = copies.request_copy(model, replica.node)
    if copy.status == ModelCopy.Status.SYNCING:
        job = copies.sync_job(model, replica.node)
        percent = job.percent if job is not None else 0
        _save(replica, state=S.PENDING, last_error=f"Waiting for the model to be copied to {replica.node} "
                                                   f"({percent} %).")  # fmt: skip


def mark_ready(replica: Replica) -> bool:
    """STARTING → READY, only if the same process is still the one starting (loop and watcher race)."""
    now = timezone.now()
    started = replica.started_at or now
    return bool(
        Replica.objects.filter(pk=replica.pk, pid=replica.pid, state=S.STARTING).update(
            state=S.READY,
            ready_at=now,
            consecutive_crashes=0,
            engine_ready_seconds=(now - started).total_seconds(),
            answer_checked_at=now,
            answer_failures=0,
        )
    )


def watch_startup(replica_id: int, pid: int, interval: float = 0.2) -> str:
    """Poll one starting replica until it is ready; exits early if it stops being the one starting.
    Crashes and timeouts are left to the loop, which holds the lock for such changes."""
    deadline = time.monotonic() + settings.REPLICA_STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        starting = Replica.objects.filter(pk=replica_id, pid=pid, state=S.STARTING)
        replica = starting.select_related("deployment__runtime").first()
        if replica is None:
            return "no longer starting"
        if not launcher.alive(pid, launcher.marker_value(replica.node, replica.pk)):
            return "exited"
        if engine_for(replica.deployment.runtime).ready(
            replica.port, replica.key(), replica.deployment.name, timeout=0.5
        ):
            return "ready" if mark_ready(replica) else "changed meanwhile"
        time.sleep(interval)
    return "timed out"


def crashed(replica: Replica, reason: str) -> None:
    """Count a crash; schedule a restart with capped exponential backoff, or fail after too many."""
    if replica.pid and launcher.alive(replica.pid, launcher.marker_value(replica.node, replica.pk)):
        launcher.stop(replica.pid, grace=settings.REPLICA_STOP_GRACE_SECONDS)
    ReplicaPart.objects.filter(replica=replica).delete()  # the other boxes stop their ranks as orphans
    crashes = replica.consecutive_crashes + 1
    tail = launcher.log_tail(replica.log_path)
    if crashes >= settings.REPLICA_MAX_CRASHES:
        _save(replica, state=S.FAILED, pid=None, consecutive_crashes=crashes,
              last_error=f"{reason} Crashed {crashes} times in a row; last log lines:\n{tail}")  # fmt: skip
        return
    delay = min(settings.REPLICA_BACKOFF_SECONDS * 2 ** (crashes - 1), settings.REPLICA_BACKOFF_MAX_SECONDS)
    _save(replica, state=S.CRASHED, pid=None, consecutive_crashes=crashes, restart_count=replica.restart_count + 1,
          next_start_at=timezone.now() + timedelta(seconds=delay), last_error=f"{reason}\n{tail}")  # fmt: skip


def check_answer(replica: Replica) -> None:
    """Every ``REPLICA_ANSWER_SECONDS``, a ready replica must answer a one-token completion within
    ``REPLICA_ANSWER_TIMEOUT_SECONDS``; after ``REPLICA_ANSWER_FAILURES`` misses in a row it is
    restarted (counted as a crash). Runs in this node's reconcile pass: a hung engine holds the pass
    for the timeout, once per period."""
    now = timezone.now()
    period = timedelta(seconds=settings.REPLICA_ANSWER_SECONDS)
    if replica.answer_checked_at is not None and now - replica.answer_checked_at < period:
        return
    deployment = replica.deployment
    timeout = settings.REPLICA_ANSWER_TIMEOUT_SECONDS
    why = engine_for(deployment.runtime).answers(replica.port, replica.key(), deployment.name, timeout)
    failures = 0 if why is None else replica.answer_failures + 1
    restart = failures >= settings.REPLICA_ANSWER_FAILURES
    _save(replica, answer_checked_at=timezone.now(), answer_failures=0 if restart else failures)
    if restart:
        crashed(replica, f"The engine did not answer a one-token completion ({why}), {failures} times in a row: "
                         "restarted.")  # fmt: skip


def stop_replica(replica: Replica) -> None:
    _save(replica, state=S.STOPPING)
    ReplicaPart.objects.filter(replica=replica).delete()
    if replica.pid and launcher.alive(replica.pid, launcher.marker_value(replica.node, replica.pk)):
        launcher.stop(replica.pid, grace=settings.REPLICA_STOP_GRACE_SECONDS)
        # The log's last word is the console's: what the engine prints while exiting (library
        # warnings) reads like a failure otherwise.
        launcher.note(replica.log_path, f"Stopped by the console at {timezone.now():%Y-%m-%d %H:%M:%S %Z}.")
    _save(replica, state=S.STOPPED, pid=None, port=None, next_start_at=None)


def step(replica: Replica) -> None:
    deployment = replica.deployment
    wanted = deployment.desired == Deployment.Desired.RUNNING and replica.ordinal < deployment.replicas
    marker = launcher.marker_value(replica.node, replica.pk)
    if not wanted:
        if replica.state != S.STOPPED:
            stop_replica(replica)
        return
    now = timezone.now()
    if replica.state == S.PENDING or replica.state == S.PLACING:
        launch(replica)
    elif replica.state == S.CRASHED:
        if replica.next_start_at is None or replica.next_start_at <= now:
            launch(replica)
    elif (
        replica.state in (S.STARTING, S.READY)
        and deployment.nodes_per_replica > 1
        and (trouble := part_trouble(replica))
    ):
        crashed(replica, trouble)
    elif replica.state == S.STARTING:
        if not launcher.alive(replica.pid, marker):
            crashed(replica, "The engine exited while starting.")
        elif engine_for(deployment.runtime).ready(replica.port, replica.key(), deployment.name, timeout=0.5):
            mark_ready(replica)
        elif replica.started_at and now - replica.started_at > timedelta(
            seconds=settings.REPLICA_STARTUP_TIMEOUT_SECONDS
        ):
            crashed(replica, f"The engine did not become ready within {settings.REPLICA_STARTUP_TIMEOUT_SECONDS} s.")
    elif replica.state == S.READY:
        if not launcher.alive(replica.pid, marker):
            crashed(replica, "The engine process exited.")
        else:
            check_answer(replica)
    elif replica.state == S.LOST:  # its node was unreachable and is back: adopt the engine, or start anew
        if replica.pid and launcher.alive(replica.pid, marker):
            _save(replica, state=S.STARTING, last_error="")  # ready again once it answers the probe
        else:
            crashed(replica, "The engine was gone when its node came back.")


def publish_routes(node: str) -> None:
    """Tell this node's relay which engines it may pass requests to (those with a process)."""
    live = Replica.objects.filter(node=node, port__isnull=False, pid__isnull=False).exclude(
        state__in=list(Replica.TERMINAL)
    )
    relay.publish(node, live)


def stop_orphans(node: str) -> list[int]:
    """Stop engine processes of this node that no active replica row owns."""
    owned = {
        (r.pid, launcher.marker_value(node, r.pk))
        for r in Replica.objects.filter(node=node, pid__isnull=False).exclude(state__in=list(Replica.TERMINAL))
    } | {(p.pid, part_marker(p)) for p in ReplicaPart.objects.filter(node=node, pid__isnull=False)}
    stopped = []
    for pid, marker in launcher.our_processes(node).items():
        if (pid, marker) not in owned:
            launcher.stop(pid, grace=settings.REPLICA_STOP_GRACE_SECONDS)
            stopped.append(pid)
    return stopped


def reconcile(node: str | None = None, client: redis.Redis | None = None) -> dict[str, Any]:
    """One pass for ``node`` (default: this one). Returns what it did, or that another pass runs."""
    node = node or settings.NODE_NAME
    client = client or redis_client()
    lock = client.lock(f"console:reconcile:{node}", timeout=120, blocking=False)
    if not lock.acquire():
        return {"skipped": "another reconcile pass is running"}
    started = time.perf_counter()
    try:
        ensure_replicas(node)
        replicas = Replica.objects.filter(node=node).exclude(state__in=list(Replica.TERMINAL))
        count = 0
        for replica in replicas.select_related("deployment__model", "deployment__runtime"):
            step(replica)
            count += 1
        step_parts(node)
        orphans = stop_orphans(node)
        publish_routes(node)
        copies.publish_table(node)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # expired during a long stop; the next pass takes it again
    return {"replicas": count, "orphans_stopped": orphans, "ms": round((time.perf_counter() - started) * 1000, 2)}
