"""``manage.py backup`` and ``restore`` through the commands themselves, on the test database (SQLite
or PostgreSQL, as the run is): a restore brings an emptied install back to the archive's state
(keys still verify, sealed secrets still open); damaged, foreign and newer archives, a non-empty
database and a conflicting SECRET_KEY are refused with nothing changed. The scheduled backup keeps
``BACKUP_KEEP`` archives and the Overview shows its outcome."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from appliance import backup
from appliance.jobs import run_job
from appliance.models import Backup, Profile
from appliance.roles import Role
from appliance.tasks import scheduled_backup
from models_catalog.models import HubEndpoint, LocalModel, ModelFile, ModelJob
from models_catalog.tasks import model_job_body
from tenancy import keys as key_format
from tenancy.models import ApiKey, Department, Membership
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


def test_a_backup_restores_an_emptied_install_to_the_same_state(place: Path, settings: Any) -> None:
    state = make_state(place)
    before = counts()
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
        return data.replace(b"Finance", b"Fynance") if name == "database.jsonl" else data

    def manifest(**changes: Any) -> Any:
        def change(name: str, data: bytes) -> bytes:
            if name != "manifest.json":
                return data
            found = json.loads(data)
            for key, value in changes.items():
                found[key] = value(found[key]) if callable(value) else value
            return json.dumps(found).encode()

        return change

    foreign_rows = b'{"model": "tenancy.department", "pk": 1, "fields": {"no_such_field": 1}}\n'

    def rows_changed(name: str, data: bytes) -> bytes:  # checksummed rows this schema cannot take
        if name == "database.jsonl":
            return foreign_rows
        if name == "manifest.json":
            found = json.loads(data)
            found["sha256"]["database.jsonl"] = backup._sha256(foreign_rows)
            return json.dumps(found).encode()
        return data

    cases = {
        place / "missing.tar.gz": "No such archive",
        truncated: "is damaged or not a console backup",
        text: "is damaged or not a console backup",
        empty: "is not a console backup",
        rewrite(archive, place / "tampered.tar.gz", tamper): "database.jsonl does not match its checksum",
        rewrite(archive, place / "newer.tar.gz", manifest(console_version="99.0.0")): "from a newer console",
        rewrite(archive, place / "unknown.tar.gz",
                manifest(migrations=lambda m: {**m, "tenancy": "0999_future"})): "does not know the migrations tenancy.0999_future",  # noqa: E501
        rewrite(archive, place / "rows.tar.gz", rows_changed): "rows could not be loaded here",
        rewrite(archive, place / "gone.tar.gz",
                manifest(sha256=lambda s: {**s, "extra.json": "0" * 64})): "extra.json is missing",
    }  # fmt: skip
    for path, message in cases.items():
        with pytest.raises(CommandError, match=message):
            call_command("restore", str(path), "--replace")
        assert list(Department.objects.values_list("name", flat=True)) == ["Legal"], path
    monkeypatch.setenv("SECRET_KEY", "another-key-" + "x" * 40)
    with pytest.raises(CommandError, match="SECRET_KEY is set in the environment to another key"):
        call_command("restore", str(archive), "--replace")
    assert list(Department.objects.values_list("name", flat=True)) == ["Legal"]


def test_an_archive_of_the_first_format_still_restores(place: Path) -> None:
    """Format 1 held the rows as one JSON list (database.json), loaded by loaddata."""
    make_state(place)
    before = counts()
    archive = archive_of(place)

    def first_format(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            found = json.loads(data)
            found["format"] = 1
            rows = found["sha256"].pop("database.jsonl")
            assert rows
            found["sha256"]["database.json"] = backup._sha256(as_list(archive))
            return json.dumps(found).encode()
        return data

    def as_list(path: Path) -> bytes:
        with tarfile.open(path, "r:gz") as tar:
            lines = tar.extractfile("database.jsonl").read().decode().splitlines()  # type: ignore[union-attr]
        return json.dumps([json.loads(line) for line in lines if line]).encode()

    old = rewrite(archive, place / "format-1.tar.gz", first_format)
    with tarfile.open(old, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    members["database.json"] = as_list(archive)
    del members["database.jsonl"]
    with tarfile.open(old, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    call_command("flush", interactive=False, verbosity=0)
    call_command("restore", str(old), stdout=io.StringIO())
    assert counts() == before


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
