"""The offline bundle (ops/bundle.py, ops/install.sh): built from this checkout, then installed in a
network namespace that has nothing but its own loopback (no route anywhere, no registry, no Redis or
PostgreSQL of the host), where ``make run`` brings the console up on SQLite with its private Redis.
A bundle with a changed file is refused before anything is installed. Engines are left out of the
bundle here (``--engines ""``: gigabytes); their offline install is tested in
tests/provisioning/test_units.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.bundle import write_sums
from tests.processes import end

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
    pytest.mark.skipif(os.environ.get("DATABASE_URL", "").startswith("postgres"),
                       reason="the bundle's install runs on the embedded default; the SQLite run covers it"),
]  # fmt: skip
# What a box's shell has: none of the tests' settings (database, Redis, folders) reach the install.
BARE = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    subprocess.run([sys.executable, "ops/bundle.py", "--out", str(out), "--engines", ""], cwd=ROOT, check=True,
                   timeout=1200, stdout=subprocess.DEVNULL)  # fmt: skip
    (archive,) = out.glob("appliance-*.tar")
    with tarfile.open(archive) as opened:
        opened.extractall(out, filter="data")
    return next(path for path in out.iterdir() if path.is_dir())


@pytest.fixture(scope="module")
def offline() -> Iterator[str]:
    name = f"offline-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # what the console left running there (its private Redis)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], check=True)


def inside(namespace: str, *command: str, **options: object) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True,
                          env=BARE, **options)  # type: ignore[call-overload]  # fmt: skip


@pytest.fixture(scope="module")
def installed(bundle: Path, offline: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle installed in the namespace with no route out."""
    assert inside(offline, "ip", "route").stdout.strip() == ""  # no route: nothing but loopback
    assert inside(offline, sys.executable, "-c", "import socket; socket.create_connection(('pypi.org', 443), 3)"
                  ).returncode != 0  # fmt: skip
    dest = tmp_path_factory.mktemp("box") / "appliance-console"
    done = inside(offline, "sh", str(bundle / "install.sh"), str(dest), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed" in done.stdout and (dest / ".venv" / "bin" / "uvicorn").exists()
    return dest


def test_the_bundle_installs_and_runs_with_no_network(installed: Path, offline: str, tmp_path: Path) -> None:
    dest = installed

    log = (tmp_path / "run.log").open("w")
    console = subprocess.Popen(["ip", "netns", "exec", offline, "make", "-C", str(dest), "run"], env=BARE,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline, health = time.monotonic() + 300, None
        probe = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
                 ".read().decode())")  # fmt: skip
        while time.monotonic() < deadline and console.poll() is None:
            answer = inside(offline, str(dest / ".venv" / "bin" / "python"), "-c", probe)
            if answer.returncode == 0:
                health = json.loads(answer.stdout)
                break
            time.sleep(2)
        assert health is not None, (tmp_path / "run.log").read_text()[-3000:]
        # 200 only once database, Redis and the worker all answer: the whole console runs there.
        assert health["ok"] and health["database"]["engine"] == "sqlite" and health["worker"]["ok"], health
        assert (dest / "var" / "console.sqlite3").exists() and (dest / "var" / "redis").is_dir()
    finally:
        end(console, 30, group=True)


def test_a_changed_bundle_is_refused_before_anything_is_installed(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, copy_function=os.link)  # the same files, but for the one changed below
    (copy / "VERSION").unlink()
    (copy / "VERSION").write_text("not what was signed\n")
    dest = tmp_path / "appliance"
    done = subprocess.run(["sh", str(copy / "install.sh"), str(dest)], capture_output=True, text=True, env=BARE)
    assert done.returncode == 1 and "the bundle is damaged" in done.stdout
    assert not dest.exists()


MIGRATION = """from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("appliance", "%(after)s")]
    operations = [%(operations)s]
"""
NEW_TABLE = 'migrations.CreateModel("UpgradeProbe", [("id", models.AutoField(primary_key=True))])'
BROKEN = "migrations.RunPython(lambda apps, schema: 1 / 0)"


def newer(bundle: Path, into: Path, migrations: dict[str, str]) -> Path:
    """A copy of ``bundle`` whose source adds these appliance migrations (name: operation), signed
    like a built bundle: a next version, as far as the upgrade can tell."""
    shutil.copytree(bundle, into, copy_function=os.link)
    source = into / "source.tar"
    source.unlink()
    shutil.copy(bundle / "source.tar", source)
    with tarfile.open(bundle / "source.tar") as opened:
        after = max(Path(n).stem for n in opened.getnames() if n.startswith("appliance/migrations/0"))
    with tarfile.open(source, "a") as archive:
        for name, operation in migrations.items():
            text = (MIGRATION % {"after": after, "operations": operation}).encode()
            member = tarfile.TarInfo(f"appliance/migrations/{name}.py")
            member.size = len(text)
            archive.addfile(member, io.BytesIO(text))
            after = name
    (into / "VERSION").unlink()
    (into / "VERSION").write_text(f"next-{into.name}\n")
    write_sums(into)
    return into


def test_an_upgrade_keeps_the_data_and_a_failed_one_puts_everything_back(
    bundle: Path, installed: Path, tmp_path: Path, settings: object
) -> None:
    env = {**BARE, "REDIS_URL": settings.REDIS_URL}  # type: ignore[attr-defined]
    manage = [str(installed / ".venv" / "bin" / "python"), "manage.py"]

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=installed, env=env, capture_output=True, text=True, timeout=600)

    assert run(*manage, "migrate", "--noinput").returncode == 0
    create = "from tenancy.models import Department; Department.objects.create(name='Finance')"
    assert run(*manage, "shell", "-c", create).returncode == 0
    count = "from tenancy.models import Department; print(Department.objects.filter(name='Finance').count())"

    broken = newer(bundle, tmp_path / "broken", {"9998_probe": NEW_TABLE, "9999_broken": BROKEN})
    done = run("sh", str(broken / "install.sh"), str(installed))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "migrations failed" in done.stdout and "ZeroDivisionError" in done.stdout
    assert "rolling back" in done.stdout and "is back, with its data" in done.stdout
    assert not (installed / "appliance" / "migrations" / "9998_probe.py").exists()  # the code put back
    assert run(*manage, "shell", "-c", count).stdout.split()[-1] == "1"  # the data too
    plan = run(*manage, "showmigrations", "appliance").stdout
    assert "9998_probe" not in plan and "[ ] " not in plan  # and the schema: every migration it knows applied
    assert not (installed / ".venv.previous").exists()

    good = newer(bundle, tmp_path / "good", {"9998_probe": NEW_TABLE})
    done = run("sh", str(good / "install.sh"), str(installed))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "upgrade: done, next-good" in done.stdout
    assert run(*manage, "shell", "-c", count).stdout.split()[-1] == "1"
    assert "[X] 9998_probe" in run(*manage, "showmigrations", "appliance").stdout
    assert (installed / "var" / "release" / "VERSION").read_text().strip() == "next-good"
    backups = list((installed / "var" / "backups").glob("console-backup-*.tar.gz"))
    assert len(backups) == 2  # one before each upgrade
