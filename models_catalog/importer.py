"""Importing a model from a local directory (a USB disk, a NAS mount), validated like a download.

The directory is copied, never moved or linked; symlinks, special files and names that would leave
the model's directory are refused. The commit id is derived from the files' paths and digests, so
importing the same content twice gives the same commit and a changed file gives a new one, which
is what a peer appliance syncing from this one sees.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

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
    """(relative path, size) of every file, refusing symlinks and anything that is not a plain file."""
    if not directory.is_absolute():
        raise ImportRefused(f"{directory} is not an absolute path.")
    if directory.is_symlink() or not directory.is_dir():
        raise ImportRefused(f"{directory} is not a directory.")
    found: list[tuple[str, int]] = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if Path(root) == directory else dirs
        for name in [*dirs, *names]:
            full = Path(root) / name
            mode = full.lstat().st_mode
            relative = full.relative_to(directory).as_posix()
            if stat.S_ISLNK(mode):
                raise ImportRefused(f"{relative} is a symbolic link; copy the real file into the directory instead.")
            if name in names:
                if not stat.S_ISREG(mode):
                    raise ImportRefused(f"{relative} is not a regular file.")
                try:
                    check_file_path(relative)
                except ValueError as exc:
                    raise ImportRefused(str(exc)) from None
                found.append((relative, full.stat().st_size))
    if not any(path == "config.json" for path, _ in found):
        raise ImportRefused(f"{directory} has no config.json at its top: it does not look like a model.")
    return sorted(found)


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
    staging.mkdir(parents=True, exist_ok=True)
    progress = Progress(job, bytes_total=total, files_total=len(listing))
    files: list[RemoteFile] = []
    digests: dict[str, tuple[str, str]] = {}
    last_report = 0.0
    for relative, size in listing:
        target = inside(staging, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        partial.unlink(missing_ok=True)
        writer = HashingWriter(partial, size)
        try:
            with (directory / relative).open("rb") as source:
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
    read_model_facts(staging)  # refuses a broken config.json before anything is published
    commit = commit_for(files)
    final = staging_directory(model.repo_id, commit)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    progress.report(phase="verifying")
    _publish(job, model, RemoteSnapshot(commit, files), files, digests, None)
