"""Settings for the test suite: the project's settings with a Redis db and a var/ of their own."""

import os
from pathlib import Path

from tests.runs import RUN, choose_redis_url

# The tests flush their Redis db: never the console's own, nor one another run is using (tests/runs.py);
# the processes the tests start inherit the choice. TEST_REDIS_URL / TEST_VAR_DIR choose by hand.
if "TEST_REDIS_URL" not in os.environ:
    os.environ["TEST_REDIS_URL"] = choose_redis_url()
    os.environ["TEST_RUN_PID"] = str(os.getpid())
os.environ["REDIS_URL"] = os.environ["TEST_REDIS_URL"]
os.environ["VAR_DIR"] = os.environ.get("TEST_VAR_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test"))
os.environ.setdefault("NODE_NAME", f"testnode-{RUN}")
# Engines outlive a test run: the vLLM CPU build is installed once (a few minutes), then reused.
os.environ.setdefault("ENGINES_DIR", str(Path(__file__).resolve().parent.parent / "var" / "engines"))

from appliance.settings import *  # noqa: F403
from appliance.settings import DATABASES, INSTALLED_APPS

if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":  # its own test database per checkout
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{RUN}"}

# A job model used only to exercise the job-row machinery (no migrations: created by the test run).
INSTALLED_APPS = [*INSTALLED_APPS, "tests.jobapp"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
