"""Upgrade an installed console from an offline bundle (run by the bundle's install.sh when its
destination holds an install already; Python's standard library only).

1. A backup (``manage.py backup``) of the running install, and its code and environment kept aside.
2. The services stopped where systemd runs them (web, worker, beat, relay); engines are separate
   processes and keep serving (the new worker adopts them).
3. The new code, its packages (from the bundle's wheels only), migrations and static files.
4. Started again. If any step of 3 fails, everything is put back as it was: the code, the
   environment, and the database (emptied, the previous version's migrations, the backup restored).

Settings come from the environment, and from /etc/appliance-console.env when it exists (the systemd
units' file). Usage: python3 upgrade.py BUNDLE_DIR DEST
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SERVICES = ("appliance-web", "appliance-worker", "appliance-beat", "appliance-relay")
ENV_FILE = Path("/etc/appliance-console.env")
RESET_DATABASE = """
import os
from django.db import connection
if connection.vendor == "postgresql":
    with connection.cursor() as cursor:
        cursor.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
else:
    path = str(connection.settings_dict["NAME"])
    connection.close()
    if os.path.exists(path):
        os.replace(path, path + ".failed-upgrade")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
"""


class Failed(Exception):
    pass


def environment() -> dict[str, str]:
    env = dict(os.environ)
    if ENV_FILE.exists():
        for line in ENV_FILE.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.strip().startswith("#"):
                env.setdefault(name.strip(), value.strip().strip('"'))
    return env


def step(name: str, command: list[str], dest: Path) -> str:
    print(f"upgrade: {name}", flush=True)
    done = subprocess.run(command, cwd=dest, env=environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise Failed(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def members(archive: Path) -> set[str]:
    with tarfile.open(archive) as opened:
        return {m.name for m in opened.getmembers() if m.isfile()}


def put_code(archive: Path, dest: Path, previous: set[str]) -> None:
    """``archive``'s files into ``dest``, and the files of ``previous`` that it no longer has removed."""
    with tarfile.open(archive) as opened:
        opened.extractall(dest, filter="data")
    for gone in previous - members(archive):
        (dest / gone).unlink(missing_ok=True)


def systemd(action: str) -> bool:
    """Stop or start the console's services where systemd runs them; whether it did."""
    if not shutil.which("systemctl") or not Path("/run/systemd/system").exists():
        return False
    units = [s for s in SERVICES if Path(f"/etc/systemd/system/{s}.service").exists()]
    if units:
        subprocess.run(["systemctl", action, *units], check=False)
    return bool(units)


def upgrade(bundle: Path, dest: Path) -> int:
    python = str(dest / ".venv" / "bin" / "python")
    release = dest / "var" / "release"
    release.mkdir(parents=True, exist_ok=True)
    old_source = release / "source.tar"
    old_version = (release / "VERSION").read_text().strip() if (release / "VERSION").exists() else "unknown"
    new_version = (bundle / "VERSION").read_text().strip()
    backup = step("backup", [python, "manage.py", "backup"], dest).splitlines()[0].strip()
    print(f"upgrade: {old_version} -> {new_version}; backup {backup}", flush=True)
    ran_by_systemd = systemd("stop")
    kept_env = dest / ".venv.previous"
    shutil.rmtree(kept_env, ignore_errors=True)
    shutil.copytree(dest / ".venv", kept_env, symlinks=True)
    previous = members(old_source) if old_source.exists() else set()
    try:
        put_code(bundle / "source.tar", dest, previous)
        step("packages", [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
                          "--find-links", str(bundle / "wheels"), "-r", "requirements.txt"], dest)  # fmt: skip
        step("migrations", [python, "manage.py", "migrate", "--noinput"], dest)
        step("static files", [python, "manage.py", "collectstatic", "--noinput", "-v0"], dest)
    except Failed as exc:
        print(f"upgrade: {exc}\nupgrade: rolling back to {old_version}", flush=True)
        if old_source.exists():
            put_code(old_source, dest, members(bundle / "source.tar"))
        shutil.rmtree(dest / ".venv")
        kept_env.rename(dest / ".venv")
        step("database emptied", [python, "manage.py", "shell", "-c", RESET_DATABASE], dest)
        step("previous migrations", [python, "manage.py", "migrate", "--noinput"], dest)
        step("backup restored", [python, "manage.py", "restore", backup], dest)
        if ran_by_systemd:
            systemd("start")
        print(f"upgrade: FAILED; {old_version} is back, with its data", flush=True)
        return 1
    shutil.rmtree(kept_env, ignore_errors=True)
    if (bundle / "engines").is_dir():  # engine packages for installing offline
        shutil.copytree(bundle / "engines", dest / "var" / "wheels", dirs_exist_ok=True)
    shutil.copy(bundle / "source.tar", old_source)
    shutil.copy(bundle / "VERSION", release / "VERSION")
    (dest / ".venv" / ".installed").touch()
    if ran_by_systemd:
        systemd("start")
    else:
        print("upgrade: restart the console (make run) to serve the new version", flush=True)
    print(f"upgrade: done, {new_version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(upgrade(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()))
