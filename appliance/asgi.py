"""ASGI entry point of the console (uvicorn appliance.asgi:application): /v1 goes to the lean
gateway application (gateway/app.py), everything else to Django."""

import os

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")


class ConsoleASGIHandler(ASGIHandler):
    """Django's handler, sending bodies in 1 MiB messages instead of 64 KiB: model files served on
    /hf/ go out several times faster (bench/download.py), other responses are unaffected."""

    chunk_size = 1024 * 1024


django.setup(set_prefix=False)

from gateway.app import GatewayApp  # noqa: E402 - needs the apps loaded

django_application = ConsoleASGIHandler()
gateway = GatewayApp()


async def application(scope: dict, receive, send) -> None:
    if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
        await gateway(scope, receive, send)
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await gateway.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    else:
        await django_application(scope, receive, send)
