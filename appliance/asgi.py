"""ASGI entry point of the console (uvicorn appliance.asgi:application)."""

import os

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")


class ConsoleASGIHandler(ASGIHandler):
    """Django's handler, sending bodies in 1 MiB messages instead of 64 KiB: model files served on
    /hf/ go out several times faster (bench/download.py), other responses are unaffected."""

    chunk_size = 1024 * 1024


django.setup(set_prefix=False)
application = ConsoleASGIHandler()
