"""A job row that only exists in the tests: it counts steps, and can fail or wait to be cancelled."""

from django.db import models

from appliance.jobs import Job


class StepJob(Job):
    task_name = "tests.jobapp.run_step_job"

    steps = models.PositiveIntegerField(default=3)
    fail_at = models.IntegerField(null=True, blank=True)
    step_seconds = models.FloatField(default=0.0)
    runs = models.PositiveIntegerField(default=0)
