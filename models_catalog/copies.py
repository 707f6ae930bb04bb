"""Models on several boxes: which boxes hold a model, copying it to another box, and the table each
box's relay serves ``/hf/`` from.

A model has one box of its own (``LocalModel.node``: where it was downloaded or imported). Placement
may choose another box for a replica; the model is then copied there by a sync job on that box
(``ModelJob.Kind.SYNC``, with the usual progress bar) from a box that holds it, node to node over the
source box's relay (``http://NODE_ADDRESS:RELAY_PORT/hf``) with the cluster's sync token. The files
are checked against the digests in the database, not the source's word, and published the way a
download is (staging, then one rename), so an engine never sees half a copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils.translation import gettext as _

from appliance.private_files import replace_private
from models_catalog.download import Progress, _fetch_all, check_space
from models_catalog.layout import publish, staging_directory
from models_catalog.mirror import Served, sync_token
from models_catalog.models import JobConflict, LocalModel, ModelCopy, ModelJob
from models_catalog.source import HubSource, PermanentSourceError, RemoteFile, SourceError
from nodes.models import Node


def copy_on(model: LocalModel, node: str) -> ModelCopy | None:
    return ModelCopy.objects.filter(model=model, node=node).first()


def sync_job(model: LocalModel, node: str) -> ModelJob | None:
    """The latest copy job of ``model`` to ``node`` (for its progress)."""
    return ModelJob.objects.filter(model=model, kind=ModelJob.Kind.SYNC, node=node).order_by("-pk").first()


def request_copy(model: LocalModel, node: str, user: Any = None) -> ModelCopy:
    """Start copying ``model`` to ``node``, unless it is there or on its way; returns the copy row.
    Refused (``JobConflict``) while the model itself is not ready."""
    with transaction.atomic():
        LocalModel.objects.select_for_update().filter(pk=model.pk).first()
        model.refresh_from_db()
        if not model.is_usable:
            raise JobConflict(_("%(repo)s is not ready: it cannot be copied to another box.") % {"repo": model})
        copy, _created = ModelCopy.objects.select_for_update().get_or_create(model=model, node=node)
        if copy.usable:
            return copy
        job = sync_job(model, node)
        if copy.status == ModelCopy.Status.SYNCING and job is not None and job.is_active:
            return copy
        ModelCopy.objects.filter(pk=copy.pk).update(status=ModelCopy.Status.SYNCING, error="")
        copy.status, copy.error = ModelCopy.Status.SYNCING, ""
        ModelJob.objects.create(model=model, repo_id=model.repo_id, kind=ModelJob.Kind.SYNC, node=node,
                                created_by=user).enqueue()  # fmt: skip
    return copy


def source_nodes(model: LocalModel, target: str) -> list[Node]:
    """Ready boxes that hold the model, its own box first."""
    names = [model.node] + [
        c.node for c in ModelCopy.objects.filter(model=model, status=ModelCopy.Status.READY, commit=model.commit)
    ]
    found = {n.name: n for n in Node.objects.filter(name__in=names, state=Node.State.READY).exclude(address="")}
    return [found[name] for name in dict.fromkeys(names) if name in found and name != target]


def hf_url(address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{settings.RELAY_PORT}/hf"


def sync(job: ModelJob) -> None:
    """The body of a copy job, on the box that receives the copy."""
    model = job.model
    assert model is not None
    if job.node != settings.NODE_NAME:
        raise RuntimeError(f"This copy job is for {job.node}; it ran on {settings.NODE_NAME}.")
    if not model.is_usable:
        raise PermanentSourceError(f"{model.repo_id} is not ready ({model.get_status_display()}).")
    sources = source_nodes(model, job.node)
    if not sources:
        raise PermanentSourceError(f"No ready box holds {model.repo_id} at {model.commit} to copy it from.")
    files = [RemoteFile(f.path, f.size, f.blob_id, f.sha256 if f.is_lfs else None) for f in model.files.all()]
    commit = model.commit
    staging = staging_directory(model.repo_id, commit)
    staging.mkdir(parents=True, exist_ok=True)
    check_space(staging, files, "copy")
    last: SourceError | None = None
    for node in sources:  # the next box that holds it when one does not answer
        source = HubSource(hf_url(node.address), sync_token())
        job.log(f"copying {len(files)} files, {sum(f.size for f in files):,} bytes at {commit} from {node.name}")
        try:
            snapshot = source.snapshot(model.repo_id, commit)
            if snapshot.commit != commit:
                raise PermanentSourceError(f"{node.name} serves {snapshot.commit}, not {commit}.")
            progress = Progress(job, bytes_total=sum(f.size for f in files), files_total=len(files))
            progress.report(phase="copying")
            _fetch_all(source, model, commit, files, staging, progress)
        except SourceError as exc:
            last = exc
            job.log(f"{node.name}: {exc}")
            continue
        publish(model.repo_id, commit)
        ModelCopy.objects.filter(model=model, node=job.node).update(
            status=ModelCopy.Status.READY, commit=commit, source_node=node.name, error=""
        )
        job.log(f"ready on {job.node}, copied from {node.name}")
        publish_table(job.node)
        return
    assert last is not None
    raise last


def drop(repo_id: str) -> None:
    """Remove this box's copy of a model's files (the model was deleted on its own box)."""
    import shutil

    from models_catalog.layout import model_directory

    directory = model_directory(repo_id)
    if directory.exists():
        shutil.rmtree(directory)


def table_path(node: str) -> Path:
    return Path(settings.DATA_DIR) / "relay" / f"{node}.models.json"


def served_here(node: str) -> dict[str, Any]:
    """The ready models ``node`` holds, as its relay serves them on ``/hf/``."""
    held = LocalModel.objects.filter(status__in=list(LocalModel.USABLE)).prefetch_related("files")
    copies = {c.model_id: c.commit for c in ModelCopy.objects.filter(node=node, status=ModelCopy.Status.READY)}
    table: dict[str, Any] = {}
    for model in held:
        if model.node == node or copies.get(model.pk) == model.commit:
            table[model.repo_id] = Served.of(model, list(model.files.all())).row()
    return table


def publish_table(node: str | None = None) -> bool:
    """Write what this box's relay serves on ``/hf/`` when it changed (atomically, mode 0600: it
    names paths); True if written."""
    node = node or settings.NODE_NAME
    text = json.dumps({"models": served_here(node)}, sort_keys=True)
    path = table_path(node)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    replace_private(path, text)
    return True
