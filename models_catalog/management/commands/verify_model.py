from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_catalog.management.commands._jobs import run_in_foreground
from models_catalog.models import JobConflict, LocalModel, ModelJob


class Command(BaseCommand):
    help = "Re-hash every file of a model's ready copy against the digests it was verified with."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("repo_id")

    def handle(self, *args: Any, **options: Any) -> None:
        model = LocalModel.objects.filter(repo_id=options["repo_id"]).first()
        if model is None or not model.commit:
            raise CommandError(f"No downloaded model {options['repo_id']!r}.")
        try:
            job = model.start_job(ModelJob.Kind.VERIFY, enqueue=False)
        except JobConflict as exc:
            raise CommandError(str(exc)) from None
        run_in_foreground(job, self.stdout)
