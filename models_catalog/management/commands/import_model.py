from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_catalog.importer import ImportRefused
from models_catalog.layout import UnsafePath
from models_catalog.management.commands._jobs import run_in_foreground
from models_catalog.models import JobConflict, LocalModel


class Command(BaseCommand):
    help = "Import a model from a local directory (copied, hashed and validated like a download)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("directory")
        parser.add_argument("repo_id", help="the name it gets here, e.g. acme/llama-3-8b")
        parser.add_argument("--queue", action="store_true", help="hand the job to the worker instead of waiting")
        parser.add_argument("--replace", action="store_true", help="replace the files of a model of this name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            job = LocalModel.request_import(
                options["directory"], options["repo_id"], enqueue=options["queue"], replace=options["replace"]
            )
        except (ImportRefused, UnsafePath, JobConflict) as exc:
            raise CommandError(str(exc)) from None
        if options["queue"]:
            self.stdout.write(f"Queued job {job.pk}.")
        else:
            run_in_foreground(job, self.stdout)
