"""Serve this box's relay: the only way to its engines from the cluster network (see provisioning.relay)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from provisioning import relay


class Command(BaseCommand):
    help = "Serve this node's engine relay on NODE_ADDRESS:RELAY_PORT (engines themselves stay on loopback)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=None, help="address to listen on (default: NODE_ADDRESS)")
        parser.add_argument("--port", type=int, default=None, help="port (default: RELAY_PORT)")
        parser.add_argument("--node", default=None, help="whose route table to serve (default: NODE_NAME)")

    def handle(self, *args: Any, **options: Any) -> None:
        host = options["host"] or settings.NODE_ADDRESS
        port = options["port"] or settings.RELAY_PORT
        node = options["node"] or settings.NODE_NAME
        self.stdout.write(f"Relay of node {node} on {host}:{port} (routes: {relay.table_path(node)})")
        relay.serve(host, port, node)
