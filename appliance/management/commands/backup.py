"""Write a backup archive of the console (see appliance.backup for what it holds)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from appliance.models import Backup


class Command(BaseCommand):
    help = "Write one backup archive into BACKUP_DIR (database, secret key, model manifests) with its checksum."

    def handle(self, *args: Any, **options: Any) -> None:
        run = Backup.run(Backup.Trigger.MANUAL)
        if run.status != Backup.Status.OK:
            raise CommandError(f"The backup failed: {run.error}")
        self.stdout.write(f"{run.path}\n  {run.size_bytes} bytes, sha256 {run.sha256}, {run.seconds:.1f} s")
