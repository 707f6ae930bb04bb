"""Downloading a model (or updating it to a new commit) from a ``ModelSource`` into DATA_DIR.

Steps: ask the source for the commit and its files (with digests) → keep the files the patterns
allow → check free disk space → fill ``staging/<commit>/`` (files unchanged since the ready copy
are hard-linked from it; finished files are kept across cancels and crashes; partial ``*.part``
files are resumed with a Range request) → verify every file against the source's digests → swap
the ready copy atomically. Any failure leaves the ready copy as it was.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from huggingface_hub.utils import filter_repo_objects

from appliance.jobs import JobCancelled
from models_catalog.hashing import HashingWriter, file_digests
from models_catalog.layout import PARTIAL_SUFFIX, current_snapshot, free_bytes, inside, publish, staging_directory
from models_catalog.models import LocalModel, ModelFile, ModelJob
from models_catalog.source import ModelSource, RemoteFile, RemoteSnapshot, SourceError, TransientSourceError

# Weights in safetensors, configs and tokenizer files: what vLLM needs, not pickles or other formats.
DEFAULT_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.py",
    "*.jinja",
    "*.md",
]
REPORT_EVERY_SECONDS = 0.5
# huggingface_hub already resumes a dropped transfer a few times; these are our own attempts on
# top, for server errors (5xx) and a source that stayed away.
FETCH_ATTEMPTS = 3


class VerificationError(Exception):
    """A downloaded file does not match the source's digest."""


def select_files(files: Iterable[RemoteFile], allow: list[str], ignore: list[str]) -> list[RemoteFile]:
    return list(
        filter_repo_objects(
            list(files),
            allow_patterns=allow or DEFAULT_ALLOW_PATTERNS,
            ignore_patterns=ignore or None,
            key=lambda f: f.path,
        )
    )


@dataclass
class Progress:
    """Bytes and files done, speed and ETA. Fetching threads add to it; only the job's own thread
    writes it on the job row (``report``), so the database is used from one thread."""

    job: ModelJob
    bytes_total: int
    files_total: int
    bytes_done: int = 0
    files_done: int = 0
    started: float = field(default_factory=time.monotonic)
    fetched_this_run: int = 0
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, count: int, fetched: bool = True) -> None:
        """Called for every chunk; raises JobCancelled in a fetching thread once the job stops."""
        with self.lock:
            self.bytes_done += count
            if fetched:
                self.fetched_this_run += count
        if self.stop.is_set():
            raise JobCancelled()

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1

    def note(self, line: str) -> None:
        with self.lock:
            self.notes.append(line)

    def report(self, phase: str = "downloading") -> None:
        """Write progress on the job row; raises JobCancelled when an admin cancelled."""
        with self.lock:
            notes, self.notes = self.notes, []
            done, fetched, files_done = self.bytes_done, self.fetched_this_run, self.files_done
        for line in notes:
            self.job.log(line)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = fetched / elapsed
        eta = (self.bytes_total - done) / speed if speed > 0 else None
        fraction = done / self.bytes_total if self.bytes_total else 1.0
        self.job.report(
            fraction * 0.99,  # the last percent is the verification and the swap
            phase=phase,
            bytes_done=done,
            bytes_total=self.bytes_total,
            files_done=files_done,
            files_total=self.files_total,
            speed_bps=round(speed),
            eta_seconds=round(eta) if eta is not None else None,
        )


def _link_or_keep(previous: Path | None, staging: Path, file: RemoteFile, known: dict[str, ModelFile]) -> bool:
    """Reuse the ready copy's file when its digest matches the new commit's; True if reused."""
    old = known.get(file.path)
    if previous is None or old is None or old.size != file.size or old.blob_id != file.blob_id:
        return False
    if file.sha256 is not None and old.sha256 != file.sha256:
        return False
    source = inside(previous, file.path)
    target = inside(staging, file.path)
    if target.exists():
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)
    return True


def _verify(path: Path, file: RemoteFile, digests: tuple[str, str] | None) -> tuple[str, str]:
    """Check a file against the source's digest: sha256 for LFS files, the git blob id otherwise.

    Returns the digests to record; an LFS file keeps the source's blob id (that of its pointer)."""
    sha256, blob_id = digests if digests is not None else file_digests(path)
    size = path.stat().st_size
    if size != file.size:
        raise VerificationError(f"{file.path}: size {size} bytes, the source says {file.size}.")
    if file.sha256 is not None:
        if sha256 != file.sha256:
            raise VerificationError(f"{file.path}: sha256 {sha256} does not match the source's {file.sha256}.")
        return sha256, file.blob_id
    if blob_id != file.blob_id:
        raise VerificationError(f"{file.path}: git blob id {blob_id} does not match the source's {file.blob_id}.")
    return sha256, blob_id


def _fetch_one(
    source: ModelSource, repo_id: str, commit: str, file: RemoteFile, staging: Path, progress: Progress
) -> tuple[str, str]:
    """Fetch (or resume) one file into staging and verify it; runs in a fetching thread."""
    target = inside(staging, file.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and target.stat().st_size == file.size:
        verified = _verify(target, file, None)  # finished before a cancel or a crash
        progress.note(f"kept {file.path} from an earlier run")
        progress.add(file.size, fetched=False)
        return verified
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    for attempt in range(FETCH_ATTEMPTS):
        writer = HashingWriter(partial, file.size, blob=not file.is_lfs)
        resume = 0
        try:
            resume = writer.tell()
            if resume > file.size:  # a partial file longer than the file: start again
                writer.seek(0)
                writer.truncate()
                resume = 0
            progress.add(resume, fetched=False)
            source.fetch(repo_id, commit, file, writer, resume, progress.add)
            digests = writer.digests()
        except TransientSourceError as exc:
            writer.close()
            with progress.lock:
                progress.bytes_done -= partial.stat().st_size if partial.exists() else resume
            progress.note(f"{exc} (attempt {attempt + 1} of {FETCH_ATTEMPTS})")
            if attempt == FETCH_ATTEMPTS - 1:
                raise
            time.sleep(min(2**attempt, 30))
            continue
        finally:
            writer.close()
        try:
            verified = _verify(partial, file, digests)
        except VerificationError:
            partial.unlink()  # a corrupt copy must not be resumed from
            raise
        os.replace(partial, target)
        return verified
    raise AssertionError("unreachable")


def _fetch_all(
    source: ModelSource, model: LocalModel, commit: str, files: list[RemoteFile], staging: Path, progress: Progress
) -> dict[str, tuple[str, str]]:
    """Fetch files on ``DOWNLOAD_WORKERS`` threads (as huggingface_hub's snapshot_download does);
    this thread reports progress twice a second. The first error or a cancel stops every transfer
    at its next chunk, leaving partial files for the resume."""
    digests: dict[str, tuple[str, str]] = {}

    def work(file: RemoteFile) -> tuple[str, str]:
        result = _fetch_one(source, model.repo_id, commit, file, staging, progress)
        progress.file_done()
        return result

    workers = max(1, min(settings.DOWNLOAD_WORKERS, len(files)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        futures = {pool.submit(work, file): file for file in files}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=REPORT_EVERY_SECONDS, return_when=FIRST_EXCEPTION)
                for future in done:
                    digests[futures[future].path] = future.result()
                progress.report()
        except BaseException:
            progress.stop.set()
            raise
    return digests


def download(job: ModelJob, source: ModelSource) -> None:
    """The body of a download or update job."""
    model = job.model
    assert model is not None
    snapshot = source.snapshot(model.repo_id, model.revision)
    files = select_files(snapshot.files, model.allow_patterns, model.ignore_patterns)
    if not files:
        raise SourceError(f"{model.repo_id}@{snapshot.commit}: no file matches the allow/ignore patterns.")
    job.log(f"commit {snapshot.commit}: {len(files)} files, {sum(f.size for f in files)} bytes")

    staging = staging_directory(model.repo_id, snapshot.commit)
    staging.mkdir(parents=True, exist_ok=True)
    previous = current_snapshot(model.repo_id) if model.commit else None
    known = {f.path: f for f in model.files.all()} if previous else {}

    # An update trusts the ready copy's digests (verified when it was published); a download
    # that repairs a damaged copy re-reads every reused file.
    trust_previous = job.kind == ModelJob.Kind.UPDATE
    digests: dict[str, tuple[str, str]] = {}
    to_fetch: list[RemoteFile] = []
    for file in files:
        if _link_or_keep(previous, staging, file, known):
            if trust_previous:
                old = known[file.path]
                digests[file.path] = (old.sha256, old.blob_id)
                continue
            try:
                digests[file.path] = _verify(inside(staging, file.path), file, None)
                continue
            except VerificationError as exc:
                job.log(f"damaged, fetching again: {exc}")
                inside(staging, file.path).unlink()
        to_fetch.append(file)

    check_space(staging, to_fetch, "download")

    progress = Progress(job, bytes_total=sum(f.size for f in files), files_total=len(files))
    progress.bytes_done = sum(f.size for f in files if f.path in digests)
    progress.files_done = len(digests)
    progress.report()
    digests.update(_fetch_all(source, model, snapshot.commit, to_fetch, staging, progress))
    progress.report(phase="verifying")
    _publish(job, model, snapshot, files, digests, previous)


def check_space(staging: Path, files: list[RemoteFile], what: str) -> None:
    """Refuse (``SourceError``) a ``what`` ("download", "copy") whose ``files`` do not fit in the free
    space of ``staging``'s disk, counting what is there already from an earlier run."""
    needed = sum(f.size for f in files) - sum(_present_bytes(staging, f) for f in files)
    free = free_bytes(staging)
    if needed > free:
        raise SourceError(
            f"Not enough disk space: the {what} needs {needed:,} more bytes, {max(free, 0):,} are free on "
            f"{staging} (after the reserve of DISK_RESERVE_BYTES)."
        )


def _present_bytes(staging: Path, file: RemoteFile) -> int:
    target = inside(staging, file.path)
    if target.exists():
        return target.stat().st_size
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    return partial.stat().st_size if partial.exists() else 0


def _publish(
    job: ModelJob,
    model: LocalModel,
    snapshot: RemoteSnapshot,
    files: list[RemoteFile],
    digests: dict[str, tuple[str, str]],
    previous: Path | None,
) -> None:
    from models_catalog.memory import read_model_facts

    # Remove what the new commit no longer has (or the patterns exclude) before the swap.
    staging = staging_directory(model.repo_id, snapshot.commit)
    wanted = {str(inside(staging, f.path)) for f in files}
    for path in sorted(staging.rglob("*"), reverse=True):
        if path.is_file() and str(path) not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    config, parameters = read_model_facts(staging)
    old_commit = model.commit
    with transaction.atomic():
        publish(model.repo_id, snapshot.commit)
        model.files.all().delete()
        ModelFile.objects.bulk_create(
            ModelFile(
                model=model,
                path=f.path,
                size=f.size,
                sha256=digests[f.path][0],
                blob_id=digests[f.path][1],
                is_lfs=f.is_lfs,
            )
            for f in files
        )
        LocalModel.objects.filter(pk=model.pk).update(
            commit=snapshot.commit,
            upstream_commit=snapshot.commit,
            changed_files=[],
            size_bytes=sum(f.size for f in files),
            status=LocalModel.Status.READY,
            error="",
            config=config,
            parameter_count=parameters,
            last_checked_at=timezone.now(),
        )
    job.log(f"ready at {snapshot.commit}" + (f" (was {old_commit})" if old_commit else ""))
