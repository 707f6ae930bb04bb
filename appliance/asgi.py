"""ASGI entry point of the console (uvicorn appliance.asgi:application)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

application = get_asgi_application()
