"""``manage.py backup`` and ``restore`` through the commands themselves, on the test database (SQLite
or PostgreSQL, as the run is): a restore brings an emptied install back to the archive's state
(keys still verify, sealed secrets still open); damaged, foreign and newer archives, a non-empty
database and a conflicting SECRET_KEY are refused with nothing changed. The scheduled backup keeps
``BACKUP_KEEP`` archives and the Overview shows its outcome."""

from __future__ import annotations

import io
import json
import tarfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.urls import reverse

from appliance import backup, dump
from appliance.dump import NOT_DUMPED
from appliance.jobs import run_job
from appliance.models import AuditEvent, Backup, Profile
from appliance.roles import Role
from appliance.tasks import scheduled_backup
from models_catalog.models import HubEndpoint, LocalModel, ModelFile, ModelJob
from models_catalog.tasks import model_job_body
from tenancy import keys as key_format
from tenancy.models import ApiKey, Department, Membership, ModelPrice
from tests.models_catalog.helpers import make_model_dir

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def place(settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own VAR_DIR (restore writes the secret key there), archives and model data."""
    settings.VAR_DIR = tmp_path / "var"
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.DATA_DIR = tmp_path / "data"
    settings.DISK_RESERVE_BYTES = 0
    monkeypatch.delenv("SECRET_KEY", raising=False)
    return tmp_path


def make_state(place: Path) -> dict[str, Any]:
    user = get_user_model().objects.create_superuser("root", password="a-long-enough-password")
    finance = Department.objects.create(name="Finance", tokens_per_day=500_000)
    viewer, _password = Profile.create_user("fiona", Role.DEPARTMENT_VIEWER)  # rows referring to users
    Membership.objects.create(user=viewer, department=finance, role=Membership.Role.VIEWER)
    key, raw = ApiKey.issue(finance, "ledger bot")
    endpoint = HubEndpoint(name="mirror", url="https://mirror.internal")
    endpoint.set_token("hf_sealed_token")
    endpoint.save()
    job = LocalModel.request_import(str(make_model_dir(place / "src", weights_bytes=1024)), "acme/tiny", enqueue=False)
    run_job(ModelJob, job.pk, model_job_body)
    # Every kind of column: decimals, JSON with text of every script, an address, microseconds, groups.
    ModelPrice.objects.create(model="acme/tiny", prompt_per_million=Decimal("0.1234"), gpu_hour=Decimal("12.5"))
    AuditEvent.objects.create(actor=user, action="test.kinds", source_ip="fe80::1", target_repr="财务 ‮",
                              detail={"nested": [1, 2.5, None, "配额"], "flag": True})  # fmt: skip
    group = Group.objects.create(name="ml-admins")
    viewer.groups.add(group)
    return {"user": user.pk, "viewer": viewer.pk, "key_id": key.key_id, "raw": raw, "files": ModelFile.objects.count()}


def archive_of(place: Path) -> Path:
    out = io.StringIO()
    call_command("backup", stdout=out)
    return Path(out.getvalue().split("\n")[0])


def rewrite(archive: Path, target: Path, change: Any) -> Path:
    """A copy of ``archive`` with its members passed through ``change(name, data) -> data``."""
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    with tarfile.open(target, "w:gz") as tar:
        for name, data in members.items():
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def counts() -> dict[str, int]:
    return {"users": get_user_model().objects.count(), "departments": Department.objects.count(),
            "keys": ApiKey.objects.count(), "models": LocalModel.objects.count(),
            "files": ModelFile.objects.count(), "endpoints": HubEndpoint.objects.count()}  # fmt: skip


def every_row() -> dict[str, list[tuple]]:
    """Every column of every row a backup holds, by table (many-to-many tables too)."""
    tables = {}
    for model in dump._dumped_models():
        for one in [model, *(field.remote_field.through for field in model._meta.many_to_many)]:
            columns = [field.attname for field in one._meta.concrete_fields]
            tables[one._meta.label_lower] = list(one._base_manager.order_by("pk").values_list(*columns))
    return tables


def test_a_backup_restores_an_emptied_install_to_the_same_state(place: Path, settings: Any) -> None:
    state = make_state(place)
    before = counts()
    rows = every_row()
    assert rows["auth.user_groups"] and rows["tenancy.modelprice"] and rows["appliance.auditevent"]
    archive = archive_of(place)
    assert archive.parent == place / "backups" and archive.stat().st_mode & 0o777 == 0o600
    checksum = (archive.parent / (archive.name + ".sha256")).read_text().split()[0]
    assert checksum == backup._sha256(archive.read_bytes())
    manifest, members = backup.read(archive)
    assert manifest["console_version"] == settings.CONSOLE_VERSION and manifest["migrations"]["tenancy"]
    assert members["secret_key"].decode() == settings.SECRET_KEY
    listed = json.loads(members["models.json"])
    assert listed[0]["repo_id"] == "acme/tiny" and len(listed[0]["files"]) == state["files"]
    assert all(f["sha256"] or f["git_blob"] for f in listed[0]["files"])
    assert not any(name.endswith(".safetensors") for name in members)  # the weights are not in it

    ids = {"users": sorted(get_user_model().objects.values_list("pk", flat=True)),
           "keys": sorted(ApiKey.objects.values_list("pk", flat=True))}  # fmt: skip
    call_command("flush", interactive=False, verbosity=0)
    assert counts()["departments"] == 0
    out = io.StringIO()
    call_command("restore", str(archive), stdout=out)
    assert "Restored the backup of" in out.getvalue()
    assert counts() == before
    assert every_row() == rows  # every value as it was: times to the microsecond, decimals, JSON
    assert sorted(get_user_model().objects.values_list("pk", flat=True)) == ids["users"]  # ids as they were
    assert sorted(ApiKey.objects.values_list("pk", flat=True)) == ids["keys"]
    key = ApiKey.objects.get(key_id=state["key_id"])
    assert key_format.matches(state["raw"], key.key_hash) and key.department.tokens_per_day == 500_000
    assert HubEndpoint.objects.get().token() == "hf_sealed_token"
    assert get_user_model().objects.get(pk=state["user"]).check_password("a-long-enough-password")
    assert Profile.objects.get(user_id=state["viewer"]).role == Role.DEPARTMENT_VIEWER
    assert Membership.objects.get(user_id=state["viewer"]).department.name == "Finance"
    assert (place / "var" / "secret_key").read_text() == settings.SECRET_KEY
    assert (place / "var" / "secret_key").stat().st_mode & 0o777 == 0o600

    # A second restore onto a database with data: refused, unless told to replace it (no duplicates).
    with pytest.raises(CommandError, match=r"not empty \(\d+ users, 1 departments, 1 API keys, 1 models\)"):
        call_command("restore", str(archive))
    call_command("restore", str(archive), "--replace", stdout=io.StringIO())
    assert counts() == before
    assert Department.objects.create(name="After the restore").pk > max(  # sequences moved past restored ids
        Department.objects.exclude(name="After the restore").values_list("pk", flat=True)
    )


def test_bad_archives_are_refused_and_nothing_is_lost(place: Path, settings: Any, monkeypatch: Any) -> None:
    make_state(place)
    archive = archive_of(place)
    call_command("flush", interactive=False, verbosity=0)
    Department.objects.create(name="Legal")  # what the database holds must survive every refusal
    truncated = place / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    text = place / "notes.txt"
    text.write_text("not an archive")
    empty = rewrite(archive, place / "empty.tar.gz", lambda name, data: data)
    with tarfile.open(empty, "w:gz"):
        pass

    def tamper(name: str, data: bytes) -> bytes:
        return data.replace(b"Finance", b"Fynance") if name == "tables.jsonl" else data

    def manifest(**changes: Any) -> Any:
        def change(name: str, data: bytes) -> bytes:
            if name != "manifest.json":
                return data
            found = json.loads(data)
            for key, value in changes.items():
                found[key] = value(found[key]) if callable(value) else value
            return json.dumps(found).encode()

        return change

    def rows_changed(foreign_rows: bytes) -> Any:  # checksummed rows this schema cannot take
        def change(name: str, data: bytes) -> bytes:
            if name == "tables.jsonl":
                return foreign_rows
            if name == "manifest.json":
                found = json.loads(data)
                found["sha256"]["tables.jsonl"] = backup._sha256(foreign_rows)
                return json.dumps(found).encode()
            return data

        return change

    unknown_column = b'{"table": "tenancy.department", "columns": ["id", "no_such_field"]}\n[1, 1]\n'
    short_row = b'{"table": "tenancy.usagerecord", "columns": ["id", "department_id"]}\n[1]\n'
    unknown_field = b'{"model": "tenancy.department", "pk": 1, "fields": {"no_such_field": 1}}\n'
    unknown_table = b'{"table": "tenancy.nosuchmodel", "columns": ["id"]}\n[1]\n'
    not_json = b'{"table": "tenancy.department", "columns": ["id"]}\n[1,\n'

    cases = {
        place / "missing.tar.gz": "No such archive",
        truncated: "is damaged or not a console backup",
        text: "is damaged or not a console backup",
        empty: "is not a console backup",
        rewrite(archive, place / "tampered.tar.gz", tamper): "tables.jsonl does not match its checksum",
        rewrite(archive, place / "newer.tar.gz", manifest(console_version="99.0.0")): "from a newer console",
        rewrite(archive, place / "unknown.tar.gz",
                manifest(migrations=lambda m: {**m, "tenancy": "0999_future"})): "does not know the migrations tenancy.0999_future",  # noqa: E501
        rewrite(archive, place / "column.tar.gz", rows_changed(unknown_column)): "no column no_such_field",
        rewrite(archive, place / "short.tar.gz", rows_changed(short_row)): "does not match its table's columns",
        rewrite(archive, place / "field.tar.gz", rows_changed(unknown_field)): "rows could not be loaded here",
        rewrite(archive, place / "table.tar.gz", rows_changed(unknown_table)): "rows could not be loaded here",
        rewrite(archive, place / "json.tar.gz", rows_changed(not_json)): "rows could not be loaded here",
        rewrite(archive, place / "gone.tar.gz",
                manifest(sha256=lambda s: {**s, "extra.json": "0" * 64})): "extra.json is missing",
    }  # fmt: skip

    def indexes() -> set[str]:  # a restore on SQLite drops a table's indexes while loading it
        with connection.cursor() as cursor:
            return set(connection.introspection.get_constraints(cursor, "tenancy_usagerecord"))

    kept = indexes()
    assert len(kept) > 3
    for path, message in cases.items():
        with pytest.raises(CommandError, match=message):
            call_command("restore", str(path), "--replace")
        assert list(Department.objects.values_list("name", flat=True)) == ["Legal"], path
        assert indexes() == kept, path
    monkeypatch.setenv("SECRET_KEY", "another-key-" + "x" * 40)
    with pytest.raises(CommandError, match="SECRET_KEY is set in the environment to another key"):
        call_command("restore", str(archive), "--replace")
    assert list(Department.objects.values_list("name", flat=True)) == ["Legal"]


@pytest.mark.parametrize("version", [1, 2])
def test_archives_of_earlier_formats_still_restore(place: Path, version: int) -> None:
    """Format 1 held the rows as one JSON list (database.json, loaded by loaddata), format 2 as
    dumpdata's JSON lines (database.jsonl, every row serialised by Django)."""
    make_state(place)
    before = counts()
    archive = archive_of(place)
    out = io.StringIO()
    call_command("dumpdata", format="jsonl", natural_foreign=True, exclude=list(NOT_DUMPED), stdout=out)
    lines = [line for line in out.getvalue().splitlines() if line]
    name, rows = (
        ("database.json", json.dumps([json.loads(line) for line in lines]).encode())
        if version == 1
        else ("database.jsonl", "\n".join(lines).encode())
    )
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    del members["tables.jsonl"]
    members[name] = rows
    manifest = json.loads(members["manifest.json"])
    manifest["format"] = version
    del manifest["sha256"]["tables.jsonl"]
    manifest["sha256"][name] = backup._sha256(rows)
    members["manifest.json"] = json.dumps(manifest).encode()
    old = place / f"format-{version}.tar.gz"
    with tarfile.open(old, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    call_command("flush", interactive=False, verbosity=0)
    call_command("restore", str(old), stdout=io.StringIO())
    assert counts() == before
    viewer = get_user_model().objects.get(username="fiona")
    assert Membership.objects.get(user=viewer).department.name == "Finance"


def test_the_scheduled_backup_keeps_the_newest_and_the_overview_shows_its_outcome(
    place: Path, settings: Any, admin_client: Any, viewer_user: Any, client: Any
) -> None:
    settings.BACKUP_KEEP = 2
    page = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert 'data-testid="backup"' in page and "none yet" in page
    for _ in range(3):
        assert scheduled_backup() == "ok"
    archives = sorted((place / "backups").glob("console-backup-*.tar.gz"))
    assert len(archives) == 2 and len(list((place / "backups").glob("*.sha256"))) == 2
    assert Backup.objects.filter(status="ok", trigger="scheduled").count() == 3
    assert Backup.objects.first().path == str(archives[-1])
    page = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert "none yet" not in page and "failed" not in page

    (place / "blocked").write_text("a file where the folder should be")
    settings.BACKUP_DIR = place / "blocked"
    assert scheduled_backup() == "failed"
    failed = Backup.objects.first()
    assert failed.status == "failed" and "FileExistsError" in failed.error
    page = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert "failed" in page and "FileExistsError" in page
    client.force_login(viewer_user)
    assert 'data-testid="backup"' in client.get(reverse("dashboard:overview")).content.decode()
    health = client.get("/healthz").json()["backup"]
    assert health["status"] == "failed" and "error" not in health
    with pytest.raises(CommandError, match="The backup failed: FileExistsError"):
        call_command("backup")
