"""Bring a fresh install to the state of a backup archive (see appliance.backup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from appliance import backup


class Command(BaseCommand):
    help = (
        "Restore a backup archive into this install's database (run `manage.py migrate` first). Refuses a "
        "damaged archive, one from a newer console, and a database that holds data unless --replace."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("archive", type=Path)
        parser.add_argument("--replace", action="store_true", help="erase what the database holds first")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            done = backup.restore(options["archive"], replace=options["replace"])
        except backup.RestoreRefused as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Restored the backup of {done['created_at']} (console {done['console_version']}, {done['models']} models)."
        )
        if done["key_changed"]:
            self.stdout.write("The secret key was restored: restart web, worker, beat and relay.")
        self.stdout.write("Model weights are not in the archive: copy DATA_DIR back, or download the models again.")
