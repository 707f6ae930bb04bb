from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from models_catalog.models import LocalModel


class Command(BaseCommand):
    help = "List the models on this appliance."

    def handle(self, *args: Any, **options: Any) -> None:
        rows = LocalModel.objects.all()
        if not rows:
            self.stdout.write("No models.")
        for model in rows:
            self.stdout.write(
                f"{model.repo_id:50} {model.status:12} {model.size_bytes:>16,} B  {model.commit[:12] or '-':12} "
                f"{model.node}"
            )
