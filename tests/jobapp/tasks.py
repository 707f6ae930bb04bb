import time

from celery import shared_task
from django.db.models import F

from appliance.jobs import run_job
from tests.jobapp.models import StepJob


def _body(job: StepJob) -> None:
    StepJob.objects.filter(pk=job.pk).update(runs=F("runs") + 1)
    for step in range(job.steps):
        if job.fail_at == step:
            raise RuntimeError(f"step {step} broke")
        time.sleep(job.step_seconds)
        job.log(f"step {step} done")
        job.report((step + 1) / job.steps, steps_done=step + 1)


@shared_task(name="tests.jobapp.run_step_job", bind=True, acks_late=True)
def run_step_job(self, job_id: int) -> str:
    return run_job(StepJob, job_id, _body, worker=self.request.hostname or "")
