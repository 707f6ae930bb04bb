"""Importing a model from a local directory (a USB disk, a NAS mount), validated like a download.

The directory is copied, never moved or linked; symlinks, special files and names that would leave
the model's directory are refused, by ``scan`` beforehand and again when each file is opened (one
path component at a time, ``O_NOFOLLOW``), so a symlink swapped in between the two is refused too and
never followed. The commit id is derived from the files' paths and digests, so
importing the same content twice gives the same commit and a changed file gives a new one, which
is what a peer appliance syncing from this one sees.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

from django.utils.translation import gettext as _

from models_catalog.download import REPORT_EVERY_SECONDS, Progress, _publish
from models_catalog.hashing import HashingWriter, lfs_pointer_blob_id
from models_catalog.layout import PARTIAL_SUFFIX, check_file_path, free_bytes, inside, staging_directory
from models_catalog.memory import read_model_facts
from models_catalog.models import ModelJob
from models_catalog.source import RemoteFile, RemoteSnapshot

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5", ".model", ".tiktoken")
LFS_MIN_SIZE = 10 * 1024 * 1024


class ImportRefused(Exception):
    """The directory cannot be imported; the message says why."""


def scan(directory: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file, refusing symlinks and anything that is not a plain file.

    What is not a model directory at all (no ``config.json`` at its top: ``/etc``, a home directory)
    is refused as that, before anything in it is looked at."""
    if not directory.is_absolute():
        raise ImportRefused(_("%(path)s is not an absolute path.") % {"path": directory})
    if directory.is_symlink() or not directory.is_dir():
        raise ImportRefused(_("%(path)s is not a directory.") % {"path": directory})
    config = directory / "config.json"
    if config.is_symlink() or not config.is_file():
        raise ImportRefused(_("%(path)s is not a model directory: it has no config.json at its top.")
                            % {"path": directory})  # fmt: skip
    found: list[tuple[str, int]] = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if Path(root) == directory else dirs
        for name in [*dirs, *names]:
            full = Path(root) / name
            mode = full.lstat().st_mode
            relative = full.relative_to(directory).as_posix()
            if stat.S_ISLNK(mode):
                raise ImportRefused(_("%(file)s is a symbolic link; copy the real file into the directory instead.")
                                    % {"file": relative})  # fmt: skip
            if name in names:
                if not stat.S_ISREG(mode):
                    raise ImportRefused(_("%(file)s is not a regular file.") % {"file": relative})
                try:
                    check_file_path(relative)
                except ValueError as exc:
                    raise ImportRefused(str(exc)) from None
                found.append((relative, full.stat().st_size))
    return sorted(found)


def open_directory(directory: Path) -> int:
    """A descriptor of the import directory itself, refusing it if it is (now) a symbolic link."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ImportRefused(f"{directory} is not a directory (a symbolic link?): nothing was imported.") from None
        raise ImportRefused(f"{directory} cannot be opened: {exc.strerror}.") from None


def open_inside(directory_fd: int, relative: str) -> int:
    """Open the plain file ``relative`` below an open directory for reading, one path component at a
    time relative to the last (openat) with ``O_NOFOLLOW``: a symbolic link anywhere on the way, even
    one put there after ``scan`` looked, is refused instead of followed out of the directory."""
    parts = check_file_path(relative).parts
    current = directory_fd
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            # O_NONBLOCK: a FIFO swapped in for a file must not hang the import at open.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                opened = os.open(part, flags, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    where = "/".join(parts[: index + 1])
                    raise ImportRefused(
                        f"{where} became a symbolic link or another kind of file after the directory was "
                        "checked: refused, nothing was imported."
                    ) from None
                raise ImportRefused(f"{relative} cannot be opened: {exc.strerror}.") from None
            if current != directory_fd:
                os.close(current)
            current = opened
        if not stat.S_ISREG(os.fstat(current).st_mode):
            raise ImportRefused(f"{relative} is not a regular file: refused, nothing was imported.")
        os.set_blocking(current, True)
    except BaseException:
        if current != directory_fd:
            os.close(current)
        raise
    return current


def commit_for(files: list[RemoteFile]) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    for file in sorted(files, key=lambda f: f.path):
        digest.update(f"{file.path}\0{file.blob_id}\0{file.sha256 or ''}\n".encode())
    return digest.hexdigest()


def import_directory(job: ModelJob, directory: Path) -> None:
    """The body of an import job: copy, hash, validate, publish."""
    model = job.model
    assert model is not None
    listing = scan(directory)
    total = sum(size for _, size in listing)
    # Staged under a per-job name first; the commit is known only once everything is hashed.
    staging = staging_directory(model.repo_id, f"{job.pk:040x}")
    if total > free_bytes(staging.parent):
        raise ImportRefused(f"Not enough disk space: the import needs {total:,} bytes.")
    progress = Progress(job, bytes_total=total, files_total=len(listing))
    directory_fd = open_directory(directory)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        files, digests = _copy(directory_fd, listing, staging, progress)
        read_model_facts(staging)  # refuses a broken config.json before anything is published
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a refused import leaves nothing behind
        raise
    finally:
        os.close(directory_fd)
    commit = commit_for(files)
    final = staging_directory(model.repo_id, commit)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    progress.report(phase="verifying")
    _publish(job, model, RemoteSnapshot(commit, files), files, digests, None)


def _copy(
    directory_fd: int, listing: list[tuple[str, int]], staging: Path, progress: Progress
) -> tuple[list[RemoteFile], dict[str, tuple[str, str]]]:
    """Copy and hash every listed file from the open import directory into ``staging``."""
    files: list[RemoteFile] = []
    digests: dict[str, tuple[str, str]] = {}
    last_report = 0.0
    for relative, size in listing:
        target = inside(staging, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        partial.unlink(missing_ok=True)
        with os.fdopen(open_inside(directory_fd, relative), "rb") as source:
            writer = HashingWriter(partial, size)
            try:
                while chunk := source.read(8 * 1024 * 1024):
                    writer.write(chunk)
                    progress.add(len(chunk))
                    if time.monotonic() - last_report >= REPORT_EVERY_SECONDS:
                        progress.report()
                        last_report = time.monotonic()
            finally:
                writer.close()
        if partial.stat().st_size != size:
            raise ImportRefused(f"{relative} changed size while it was copied.")
        os.replace(partial, target)
        sha256, blob_id = writer.digests()
        is_lfs = relative.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
        if is_lfs:
            blob_id = lfs_pointer_blob_id(sha256, size)  # as a git repository with LFS would list it
        files.append(RemoteFile(relative, size, blob_id, sha256 if is_lfs else None))
        digests[relative] = (sha256, blob_id)
        progress.file_done()
    return files, digests
