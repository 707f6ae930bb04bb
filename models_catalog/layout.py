"""Where models live on disk, and the checks that keep every write inside ``DATA_DIR``.

DATA_DIR/models/<org>--<name>/
    current -> snapshots/<commit>      (symlink, replaced atomically)
    snapshots/<commit>/...             (the ready copy)
    staging/<commit>/...               (a download or update in progress; *.part = partial file)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath

from django.conf import settings

REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95})$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
PARTIAL_SUFFIX = ".part"


class UnsafePath(ValueError):
    """A repository id or file name that would leave its directory, or is otherwise unusable."""


def check_repo_id(repo_id: str) -> str:
    """``org/name`` or ``name``: letters, digits, '.', '-', '_'; no '..' and no leading dot."""
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or any(not REPO_PART.match(p) or ".." in p for p in parts):
        raise UnsafePath(
            f"{repo_id!r} is not a repository id: use 'organisation/name' with letters, digits, '.', '-' and '_'."
        )
    return repo_id


def check_commit(commit: str) -> str:
    if not COMMIT.match(commit):
        raise UnsafePath(f"{commit!r} is not a commit id (40 hexadecimal characters).")
    return commit


def check_file_path(path: str) -> PurePosixPath:
    """A relative path inside a repository: no absolute paths, '..', backslashes or control chars."""
    if not path or len(path) > 1000 or "\\" in path or any(ord(c) < 32 for c in path):
        raise UnsafePath(f"Refusing the file name {path!r}.")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise UnsafePath(f"Refusing the file name {path!r}: it would leave the model's directory.")
    if path.endswith(PARTIAL_SUFFIX):
        raise UnsafePath(f"Refusing the file name {path!r}: the suffix {PARTIAL_SUFFIX} is reserved.")
    return pure


def inside(base: Path, relative: PurePosixPath | str) -> Path:
    """``base / relative``, refusing anything that resolves outside ``base`` (symlinks included)."""
    target = (base / check_file_path(str(relative))).resolve()
    if not target.is_relative_to(base.resolve()):
        raise UnsafePath(f"Refusing {relative}: it resolves outside {base}.")
    return target


def models_root() -> Path:
    return Path(settings.DATA_DIR) / "models"


def model_directory(repo_id: str) -> Path:
    return models_root() / check_repo_id(repo_id).replace("/", "--")


def snapshot_directory(repo_id: str, commit: str) -> Path:
    return model_directory(repo_id) / "snapshots" / check_commit(commit)


def staging_directory(repo_id: str, commit: str) -> Path:
    return model_directory(repo_id) / "staging" / check_commit(commit)


def publish(repo_id: str, commit: str) -> Path:
    """Move a finished staging copy into snapshots/ and point ``current`` at it in one rename.

    Engines that open ``current`` see either the old copy or the new one, never a mix. The old
    snapshot is removed afterwards.
    """
    directory = model_directory(repo_id)
    staging = staging_directory(repo_id, commit)
    snapshot = snapshot_directory(repo_id, commit)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    os.replace(staging, snapshot)
    current = directory / "current"
    previous = current.resolve() if current.is_symlink() else None
    temporary = directory / f".current-{commit}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(Path("snapshots") / commit)
    os.replace(temporary, current)
    if previous is not None and previous != snapshot.resolve() and previous.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
    return snapshot


def current_snapshot(repo_id: str) -> Path | None:
    current = model_directory(repo_id) / "current"
    return current.resolve() if current.is_symlink() and current.resolve().is_dir() else None


def free_bytes(path: Path) -> int:
    """Free space where ``path`` (or its nearest existing parent) lives, minus the reserve setting."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free - settings.DISK_RESERVE_BYTES
