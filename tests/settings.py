"""Settings for the test suite: the project's settings with a Redis db and a var/ of their own."""

import os
from pathlib import Path

# The tests flush their Redis db: never let them point at the console's own.
os.environ["REDIS_URL"] = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
# TEST_VAR_DIR / TEST_REDIS_URL let two runs share a machine without sharing state.
os.environ["VAR_DIR"] = os.environ.get("TEST_VAR_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test"))
os.environ.setdefault("NODE_NAME", "testnode")
# Engines outlive a test run: the vLLM CPU build is installed once (a few minutes), then reused.
os.environ.setdefault("ENGINES_DIR", str(Path(__file__).resolve().parent.parent / "var" / "engines"))

from appliance.settings import *  # noqa: F403
from appliance.settings import INSTALLED_APPS

# A job model used only to exercise the job-row machinery (no migrations: created by the test run).
INSTALLED_APPS = [*INSTALLED_APPS, "tests.jobapp"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
