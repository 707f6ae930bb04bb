from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_catalog.layout import UnsafePath
from models_catalog.management.commands._jobs import run_in_foreground
from models_catalog.models import HubEndpoint, JobConflict, LocalModel


class Command(BaseCommand):
    help = "Download a model from a hub endpoint (or resume a failed download), verifying every file."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("repo_id")
        parser.add_argument("--revision", default="main")
        parser.add_argument("--endpoint", help="name of a hub endpoint configured in the console")
        parser.add_argument("--allow", action="append", default=[], help="glob of files to fetch (repeatable)")
        parser.add_argument("--ignore", action="append", default=[], help="glob of files to skip (repeatable)")
        parser.add_argument("--queue", action="store_true", help="hand the job to the worker instead of waiting")

    def handle(self, *args: Any, **options: Any) -> None:
        endpoint = None
        if options["endpoint"]:
            endpoint = HubEndpoint.objects.filter(name=options["endpoint"]).first()
            if endpoint is None:
                raise CommandError(f"No hub endpoint named {options['endpoint']!r}.")
        try:
            job = LocalModel.request_download(
                options["repo_id"],
                options["revision"],
                endpoint,
                options["allow"],
                options["ignore"],
                enqueue=options["queue"],
            )
        except (UnsafePath, JobConflict) as exc:
            raise CommandError(str(exc)) from None
        if options["queue"]:
            self.stdout.write(f"Queued job {job.pk}.")
        else:
            run_in_foreground(job, self.stdout)
