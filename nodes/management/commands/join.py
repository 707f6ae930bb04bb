"""``manage.py join --console URL --token TOKEN``: make this box a node of that console.

Asks the console (``POST /api/v1/nodes/join``) with the one-time token made on its Nodes page, and
writes what it answers (shared database and Redis, secret key, this node's name and address) to
``var/node.env`` (mode 0600), which ``make node`` loads before it starts this box's worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from appliance.private_files import replace_private
from nodes.registry import local_facts


def write_env(path: Path, values: dict[str, str]) -> None:
    """KEY='value' lines a shell can source, readable by this user only."""
    lines = []
    for key, value in values.items():
        if "'" in value or "\n" in value:
            raise CommandError(f"The console answered a value for {key} that cannot be written safely.")
        lines.append(f"{key}='{value}'")
    replace_private(path, "\n".join(lines) + "\n")


class Command(BaseCommand):
    help = "Join this box to a console as a node (with a join token from its Nodes page)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--console", required=True, help="the console's address, e.g. https://console.example")
        parser.add_argument("--token", required=True, help="the join token from the Nodes page")
        parser.add_argument("--name", default=settings.NODE_NAME, help="this node's name (default: NODE_NAME)")
        parser.add_argument("--address", default=settings.NODE_ADDRESS,
                            help="the address other boxes reach this one at (default: NODE_ADDRESS)")  # fmt: skip
        parser.add_argument("--env-file", default=str(Path(settings.VAR_DIR) / "node.env"))

    def handle(self, *args: Any, **options: Any) -> None:
        console = options["console"].rstrip("/")
        if not console.startswith(("http://", "https://")):
            raise CommandError(f"--console must be an http:// or https:// address, not {console!r}.")
        facts = local_facts(options["name"]) | {"address": options["address"]}
        body = {"token": options["token"], "name": options["name"], **facts}
        try:
            response = httpx.post(f"{console}/api/v1/nodes/join", json=body, timeout=30)
        except httpx.HTTPError as exc:
            raise CommandError(f"The console at {console} could not be reached: {exc}") from None
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:300]
            raise CommandError(f"The console refused the join ({response.status_code}): {detail}")
        config = response.json() | {"NODE_ADDRESS": options["address"]}
        write_env(Path(options["env_file"]), config)
        self.stdout.write(f"Joined {console} as {options['name']}; settings written to {options['env_file']}.")
