"""Backup and restore of the console's state in one archive (``manage.py backup`` / ``restore``).

An archive (``console-backup-<UTC time>.tar.gz``, mode 0600: it holds the secret key) contains:

- ``tables.jsonl``: every row the console keeps, table by table (``appliance/dump.py``; the same on
  SQLite and PostgreSQL, so a box may also move from one to the other), model manifests with their
  files' hashes included; not Django's own content types, permissions and sessions, which a fresh
  install makes. Archives of format 2 (``database.jsonl``, every row serialised by Django) and
  format 1 (``database.json``, one JSON list) still restore;
- ``secret_key``: the key sealed secrets (hub tokens) and sessions depend on;
- ``node.env``: the cluster settings a joined box was given, when there are some;
- ``models.json``: each model's files with their SHA-256, to check weights copied back by hand (the
  weights themselves are not in the archive);
- ``manifest.json``: the console version, each app's last migration, and the SHA-256 of each member.

``restore`` reads the manifest first and refuses an archive that is damaged (unreadable, a member
missing or not matching its checksum) or from a newer console (a newer version or a migration this
install does not know), and a database that already holds data unless told to replace it. It loads
the rows in one transaction, so a failed restore leaves the database as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.migrations.loader import MigrationLoader

from appliance.dump import load_rows, not_dumped, write_rows

FORMAT = 3  # 3: tables.jsonl (appliance/dump.py); 2: database.jsonl; 1: database.json (both still restored)
FORMATS = (1, 2, 3)
COMPRESS_LEVEL = 3  # gzip: most of level 9's saving at a fraction of its time on a large dump
PREFIX = "console-backup-"
SUFFIX = ".tar.gz"
MEMBERS = ("secret_key", "models.json")  # and the rows: one of DUMPS, by format
DUMPS = ("tables.jsonl", "database.jsonl", "database.json")  # formats 3, 2, 1


class RestoreRefused(Exception):
    """The archive cannot be restored here; the message says why (nothing was changed)."""


@dataclass
class Written:
    path: Path
    size: int
    sha256: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        raise RestoreRefused(f"The archive names an unreadable console version: {text!r}.") from None


def _migrations() -> dict[str, str]:
    """Each app's last applied migration in this database."""
    loader = MigrationLoader(connections[DEFAULT_DB_ALIAS])
    last: dict[str, str] = {}
    for app, name in sorted(loader.applied_migrations):
        if (app, name) in loader.graph.nodes and name > last.get(app, ""):
            last[app] = name
    return last


def _models_manifest() -> list[dict[str, Any]]:
    from models_catalog.models import LocalModel

    return [
        {"repo_id": model.repo_id, "commit": model.commit, "node": model.node, "status": model.status,
         "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "git_blob": f.blob_id}
                   for f in model.files.all()]}
        for model in LocalModel.objects.prefetch_related("files").order_by("pk")
    ]  # fmt: skip


def _secret_key_file() -> Path:
    return Path(settings.VAR_DIR) / "secret_key"


def write(directory: Path | None = None) -> Written:
    """Write one archive into ``directory`` (``BACKUP_DIR``) and return where, its size and SHA-256."""
    directory = Path(directory or settings.BACKUP_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        dump = Path(scratch) / "tables.jsonl"
        # Primary keys kept (ids are in URLs and the API); streamed table by table to the file.
        with dump.open("wb", buffering=1 << 20) as stream:
            write_rows(stream)
        rows = dump.read_bytes()
    members = {
        "tables.jsonl": rows,
        "secret_key": settings.SECRET_KEY.encode(),
        "models.json": json.dumps(_models_manifest(), indent=1).encode(),
    }
    node_env = Path(settings.VAR_DIR) / "node.env"
    if node_env.exists():
        members["node.env"] = node_env.read_bytes()
    now = datetime.now(UTC)
    manifest = {
        "format": FORMAT, "console_version": settings.CONSOLE_VERSION, "created_at": now.isoformat(),
        "node": settings.NODE_NAME, "database": connections[DEFAULT_DB_ALIAS].vendor,
        "migrations": _migrations(), "sha256": {name: _sha256(data) for name, data in members.items()},
    }  # fmt: skip
    members = {"manifest.json": json.dumps(manifest, indent=1).encode(), **members}
    final = directory / f"{PREFIX}{now.strftime('%Y%m%dT%H%M%S%fZ')}{SUFFIX}"
    fd, scratch = tempfile.mkstemp(dir=directory, prefix=".partial-", suffix=SUFFIX)  # 0600
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w:gz", compresslevel=COMPRESS_LEVEL) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(now.timestamp()), 0o600
                tar.addfile(info, io.BytesIO(data))
        os.replace(scratch, final)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    data = final.read_bytes()
    checksum = _sha256(data)
    (final.parent / (final.name + ".sha256")).write_text(f"{checksum}  {final.name}\n")
    return Written(final, len(data), checksum)


def read(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the members of an archive, every member checked against the manifest."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            found = {
                member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
                for member in tar.getmembers()
                if member.isfile()
            }
    except FileNotFoundError:
        raise RestoreRefused(f"No such archive: {path}.") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise RestoreRefused(f"{path} is damaged or not a console backup ({exc}).") from None
    try:
        manifest = json.loads(found["manifest.json"])
        sums = manifest["sha256"]
        assert manifest["format"] in FORMATS and isinstance(sums, dict)
    except (KeyError, ValueError, AssertionError, TypeError):
        raise RestoreRefused(f"{path} is not a console backup (no readable manifest).") from None
    members: dict[str, bytes] = {}
    for name, expected in sums.items():
        if name not in found:
            raise RestoreRefused(f"The archive is damaged: {name} is missing.")
        if _sha256(found[name]) != expected:
            raise RestoreRefused(f"The archive is damaged: {name} does not match its checksum.")
        members[name] = found[name]
    lacking = sorted(set(MEMBERS) - set(members)) + ([] if set(DUMPS) & set(members) else ["tables.jsonl"])
    if lacking:
        raise RestoreRefused(f"The archive is damaged: it lacks {', '.join(lacking)}.")
    return manifest, members


def check_version(manifest: dict[str, Any]) -> None:
    """Refuse an archive of a newer console: a newer version, or a migration this install lacks."""
    theirs, ours = manifest.get("console_version", ""), settings.CONSOLE_VERSION
    if _version(theirs) > _version(ours):
        raise RestoreRefused(f"The archive is from a newer console ({theirs}; this is {ours}): upgrade first.")
    graph = MigrationLoader(None, ignore_no_migrations=True).graph
    wanted = manifest.get("migrations", {}).items()
    unknown = [f"{app}.{name}" for app, name in wanted if (app, name) not in graph.nodes]
    if unknown:
        raise RestoreRefused(
            f"The archive is from a newer console: this one does not know the migrations {', '.join(unknown)}."
        )


def holds_data() -> list[str]:
    """What the database holds that a restore would overwrite (empty on a fresh install)."""
    from django.contrib.auth import get_user_model

    from models_catalog.models import LocalModel
    from provisioning.models import Deployment
    from tenancy.models import ApiKey, Department

    counts = {
        "users": get_user_model().objects.count(), "departments": Department.objects.count(),
        "API keys": ApiKey.objects.count(), "models": LocalModel.objects.count(),
        "deployments": Deployment.objects.count(),
    }  # fmt: skip
    return [f"{count} {what}" for what, count in counts.items() if count]


def restore(path: Path, replace: bool = False) -> dict[str, Any]:
    """Bring this install to the archive's state. Returns what was restored."""
    manifest, members = read(path)
    check_version(manifest)
    key = members["secret_key"].decode()
    from_env = os.environ.get("SECRET_KEY")
    if from_env and from_env != key:
        raise RestoreRefused(
            "SECRET_KEY is set in the environment to another key than the archive's: its sealed secrets "
            "could not be read. Unset it (restore then writes the archive's key) or set it to the archive's."
        )
    present = holds_data()
    if present and not replace:
        raise RestoreRefused(
            f"The database is not empty ({', '.join(present)}): restore is for a fresh install. "
            "Use --replace to erase it and restore the archive."
        )
    name = next(name for name in DUMPS if name in members)
    with tempfile.TemporaryDirectory() as scratch:
        dump = Path(scratch) / name
        dump.write_bytes(members.pop(name))
        try:
            with transaction.atomic():
                if replace:
                    _erase()
                if name != "database.json":  # formats 3 and 2: JSON lines
                    with dump.open("rb") as stream:
                        load_rows(stream)
                else:
                    call_command("loaddata", str(dump), verbosity=0)
        except Exception as exc:  # rows this install cannot take: rolled back, said plainly
            raise RestoreRefused(
                f"The archive's rows could not be loaded here ({type(exc).__name__}: {str(exc)[:300]}); "
                "nothing was changed."
            ) from None
    if not from_env:
        _write_private(_secret_key_file(), key)
    node_env = Path(settings.VAR_DIR) / "node.env"
    if "node.env" in members and not node_env.exists():
        _write_private(node_env, members["node.env"].decode())
    return {
        "created_at": manifest.get("created_at"), "console_version": manifest.get("console_version"),
        "key_changed": key != settings.SECRET_KEY, "models": len(json.loads(members["models.json"])),
    }  # fmt: skip


def _erase() -> None:
    """Delete every row a restore brings back (inside the restore's transaction)."""
    from django.apps import apps

    connection = connections[DEFAULT_DB_ALIAS]
    tables = [
        model._meta.db_table
        for model in apps.get_models(include_auto_created=True)
        if not not_dumped(model) and model._meta.managed
    ]
    with connection.cursor() as cursor:
        for statement in connection.ops.sql_flush(no_style(), tables, allow_cascade=True):
            cursor.execute(statement)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest archives in ``directory``; returns the deleted ones."""
    archives = sorted(directory.glob(f"{PREFIX}*{SUFFIX}"), reverse=True)  # the names sort by time
    gone = archives[keep:]
    for archive in gone:
        archive.unlink(missing_ok=True)
        (archive.parent / (archive.name + ".sha256")).unlink(missing_ok=True)
    return gone
