"""Benchmark: backup and restore of a console with a million usage records (issue 17).

The data is bench/pages.py's (30 days of a busy appliance: 1,000,000 usage records with their
roll-ups, 5,000 keys, 30 days of GPU history for 8 GPUs, 50,000 audit events), built once into
``var/bench/pages.sqlite3`` and reused. A copy of it is the console being backed up.

- ``backup_s``: ``manage.py backup`` on that console (the command an admin or the scheduled job
  runs: the dump, the model manifests, the archive and its checksum), against the baseline of
  SQLite's own online backup of the same database file (pages, not a portable archive).
- ``restore_s``: ``manage.py restore`` of that archive into a fresh, migrated install, against the
  baseline of copying the database file back. The restored install is checked: every table's row
  count equals the original's.
- ``bundle_install_s``: ``install.sh`` of an offline bundle (``ops/bundle.py``, built once into
  ``var/bench/bundle``; engines as ``BENCH_BUNDLE_ENGINES``, default none: the CPU engine's packages
  are gigabytes) into a fresh folder, inside a network namespace with no route out (as root; else
  without it, said in the table), against the baseline of the same packages installed from the
  registry (``pip install -r requirements.txt`` into a fresh venv, online).

Goal: backup and restore each ≤ 60 s on this machine's kind.
Run: .venv/bin/python bench/ops.py   (BENCH_RECORDS=… for a smaller data set; Redis db 7, flushed)
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT

GOAL_S = 60.0


def counts(path: Path) -> dict[str, int]:
    """Rows per table of a console database, except the tables a fresh install fills itself."""
    skipped = ("django_content_type", "auth_permission", "django_session", "django_migrations", "axes_")
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                  if not r[0].startswith(("sqlite_", *skipped))]  # fmt: skip
        return {table: db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0] for table in tables}  # noqa: S608


def manage(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def bundle_install() -> tuple[float, float, str]:
    """(offline install seconds, registry install seconds, what was measured)."""
    engines = os.environ.get("BENCH_BUNDLE_ENGINES", "")
    out = ROOT / "var" / "bench" / "bundle"
    stage = out / "stage"
    if not (stage / "install.sh").exists() or (stage / ".engines").read_text() != engines:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "ops/bundle.py", "--out", str(out), "--engines", engines], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        (archive,) = out.glob("appliance-*.tar")
        subprocess.run(["tar", "-xf", str(archive), "-C", str(out)], check=True)
        next(p for p in out.iterdir() if p.is_dir()).rename(stage)
        (stage / ".engines").write_text(engines)
    work = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    namespace = f"bench-offline-{os.getpid()}"
    isolated = os.geteuid() == 0 and shutil.which("ip") is not None
    bare = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    try:
        prefix = []
        if isolated:
            subprocess.run(["ip", "netns", "add", namespace], check=True)
            prefix = ["ip", "netns", "exec", namespace]
        started = time.perf_counter()
        subprocess.run([*prefix, "sh", str(stage / "install.sh"), str(work / "console")], env=bare, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        offline = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(work / "online")], check=True)
        subprocess.run([str(work / "online" / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                        "--no-cache-dir", "-r", str(ROOT / "requirements.txt")], check=True)  # fmt: skip
        online = time.perf_counter() - started
    finally:
        if isolated:
            subprocess.run(["ip", "netns", "del", namespace], check=False)
        shutil.rmtree(work, ignore_errors=True)
    what = f"engines: {engines or 'none'}; " + ("no route out (netns)" if isolated else "not isolated (not root)")
    return offline, online, what


def main() -> None:
    if os.environ.get("BENCH_DB", "sqlite") != "sqlite":
        raise SystemExit("bench/ops.py measures the embedded default (SQLite); unset BENCH_DB")
    # The data set, in a process of its own (it sets Django up on the cached database).
    # (bench/ on the path after the checkout: bench/gpus.py must not hide the gpus app)
    build = "import sys; sys.path.append('bench'); import pages; pages.ensure_data()"
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True)
    cache = ROOT / "var" / "bench" / "pages.sqlite3"
    with sqlite3.connect(cache) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    work = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    try:
        source, restored = work / "console.sqlite3", work / "restored.sqlite3"
        shutil.copyfile(cache, source)
        before = counts(source)
        base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY", "VAR_DIR")}
        base.update(DJANGO_SETTINGS_MODULE="appliance.settings", REDIS_URL="redis://127.0.0.1:6379/7",
                    NODE_NAME="bench", LOG_LEVEL="WARNING", BACKUP_INTERVAL_HOURS="0")  # fmt: skip
        old = {**base, "DATABASE_URL": f"sqlite:///{source}", "VAR_DIR": str(work / "old-var"),
               "DATA_DIR": str(work / "old-var" / "data"), "BACKUP_DIR": str(work / "backups")}  # fmt: skip
        new = {**base, "DATABASE_URL": f"sqlite:///{restored}", "VAR_DIR": str(work / "new-var"),
               "DATA_DIR": str(work / "new-var" / "data")}  # fmt: skip

        backup_s = manage(old, "backup")
        (archive,) = (work / "backups").glob("console-backup-*.tar.gz")
        started = time.perf_counter()
        with sqlite3.connect(source) as src, sqlite3.connect(work / "baseline.sqlite3") as dst:
            src.backup(dst)
        baseline_backup_s = time.perf_counter() - started

        manage(new, "migrate", "--noinput")  # a fresh install (not timed)
        restore_s = manage(new, "restore", str(archive))
        started = time.perf_counter()
        shutil.copyfile(work / "baseline.sqlite3", work / "baseline-restored.sqlite3")
        baseline_restore_s = time.perf_counter() - started

        after = counts(restored)
        differ = {t: (before[t], after.get(t)) for t in before if before[t] != after.get(t)}
        if differ:
            raise SystemExit(f"the restored console differs from the original: {differ}")
        archive_mb = archive.stat().st_size / 1e6
        records = before.get("tenancy_usagerecord", 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bundle_s, online_s, bundle_what = bundle_install()

    rows = [
        ["backup (manage.py backup: portable archive)", f"{backup_s:.1f} s", f"{archive_mb:.0f} MB archive"],
        ["  baseline: SQLite online backup (pages)", f"{baseline_backup_s:.1f} s", ""],
        ["restore (manage.py restore into a fresh install)", f"{restore_s:.1f} s", "every table's rows equal"],
        ["  baseline: copy the database file back", f"{baseline_restore_s:.1f} s", ""],
        ["offline bundle install (install.sh)", f"{bundle_s:.1f} s", bundle_what],
        ["  baseline: pip install -r requirements.txt from the registry", f"{online_s:.1f} s", ""],
    ]
    print(f"\n{records:,} usage records, {sum(before.values()):,} rows in all; goal ≤ {GOAL_S:.0f} s each")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(json.dumps({"backup_s": round(backup_s, 1), "restore_s": round(restore_s, 1),
                      "bundle_install_s": round(bundle_s, 1), "baseline_bundle_install_s": round(online_s, 1),
                      "baseline_backup_s": round(baseline_backup_s, 2),
                      "baseline_restore_s": round(baseline_restore_s, 2), "usage_records": records}))  # fmt: skip


if __name__ == "__main__":
    main()
