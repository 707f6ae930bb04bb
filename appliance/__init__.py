"""The Django project of the appliance console: settings, urls, ASGI, Celery, roles, audit, jobs."""

from appliance.celery import app as celery_app

__all__ = ["celery_app"]
