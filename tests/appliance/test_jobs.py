"""The job-row pattern: claim once, progress, cancel, failures on the row, orphan recovery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from appliance.jobs import JobStatus, recover_orphans, recover_stale, run_job
from appliance.tasks import recover_stale_jobs
from appliance.worker import alive_workers, beat_once, redis_client
from tests.jobapp.models import StepJob
from tests.jobapp.tasks import _body, run_step_job

pytestmark = pytest.mark.django_db


def test_job_runs_to_success_with_progress_and_log() -> None:
    job = StepJob.objects.create(steps=4)
    assert run_job(StepJob, job.pk, _body, worker="w@a") == JobStatus.SUCCEEDED
    job.refresh_from_db()
    assert job.progress == 1.0
    assert job.progress_detail == {"steps_done": 4}
    assert job.log_tail.splitlines() == [f"step {i} done" for i in range(4)]
    assert job.started_at <= job.finished_at
    assert job.worker == "w@a"


def test_delivering_the_task_twice_runs_the_body_once() -> None:
    job = StepJob.objects.create()
    run_step_job.apply(args=[job.pk])
    second = run_step_job.apply(args=[job.pk])
    assert second.result == "already succeeded"
    job.refresh_from_db()
    assert job.runs == 1


def test_claim_is_exclusive_between_racing_deliveries() -> None:
    job = StepJob.objects.create()
    copies = [StepJob.objects.get(pk=job.pk) for _ in range(5)]
    assert [copy.claim(f"w{i}") for i, copy in enumerate(copies)].count(True) == 1


def test_exception_is_written_on_the_row() -> None:
    job = StepJob.objects.create(steps=3, fail_at=1)
    assert run_job(StepJob, job.pk, _body) == JobStatus.FAILED
    job.refresh_from_db()
    assert job.error == "RuntimeError: step 1 broke"
    assert "Traceback" in job.log_tail
    assert job.finished_at is not None


def test_cancel_queued_job_never_runs() -> None:
    job = StepJob.objects.create()
    assert job.cancel()
    assert run_job(StepJob, job.pk, _body) == "already cancelled"
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.runs == 0
    assert not job.cancel()  # over already


def test_cancel_running_job_stops_at_next_report() -> None:
    job = StepJob.objects.create(steps=5)

    def body(running: StepJob) -> None:
        running.report(0.2)
        StepJob.objects.get(pk=running.pk).cancel()
        running.report(0.4)
        raise AssertionError("report() should have raised JobCancelled")

    assert run_job(StepJob, job.pk, body) == JobStatus.CANCELLED
    job.refresh_from_db()
    assert job.progress == pytest.approx(0.4)
    assert job.error == ""


def test_missing_job_id_does_nothing() -> None:
    assert run_job(StepJob, 999_999, _body) == "missing"


def test_log_tail_is_capped() -> None:
    job = StepJob.objects.create()
    for i in range(2000):
        job.log(f"line {i:05d} " + "x" * 20)
    job.refresh_from_db()
    assert len(job.log_tail) <= 8000
    assert job.log_tail.endswith("line 01999 " + "x" * 20 + "\n")


def test_enqueue_waits_for_commit(django_capture_on_commit_callbacks: Any) -> None:
    with mock.patch("appliance.celery.app.send_task") as send:
        with django_capture_on_commit_callbacks(execute=False) as callbacks, transaction.atomic():
            job = StepJob.objects.create(node="box7")
            job.enqueue()
            send.assert_not_called()
        assert len(callbacks) == 1
        callbacks[0]()
    send.assert_called_once_with("tests.jobapp.run_step_job", args=[job.pk], queue="node.box7")


def test_enqueue_rolled_back_sends_nothing() -> None:
    with mock.patch("appliance.celery.app.send_task") as send:
        with pytest.raises(RuntimeError), transaction.atomic():
            StepJob.objects.create().enqueue()
            raise RuntimeError("abort")
    send.assert_not_called()


def test_restarted_worker_fails_jobs_it_left_running() -> None:
    orphan = StepJob.objects.create()
    orphan.claim("worker@box1")
    elsewhere = StepJob.objects.create()
    elsewhere.claim("worker@box2")
    assert recover_orphans("worker@box1", "The worker worker@box1 restarted") == 1
    orphan.refresh_from_db()
    elsewhere.refresh_from_db()
    assert orphan.status == JobStatus.FAILED
    assert "restarted" in orphan.error
    assert elsewhere.status == JobStatus.RUNNING


def test_stale_sweep_spares_live_workers(redis_db: Any) -> None:
    old = timezone.now() - timedelta(minutes=10)
    dead = StepJob.objects.create()
    dead.claim("worker@gone")
    live = StepJob.objects.create()
    live.claim("worker@alive")
    StepJob.objects.update(heartbeat_at=old)
    beat_once(redis_client(), "worker@alive")
    assert recover_stale_jobs.apply().result == 1
    dead.refresh_from_db()
    live.refresh_from_db()
    assert dead.status == JobStatus.FAILED
    assert "stopped responding" in dead.error
    assert live.status == JobStatus.RUNNING
    # A recent heartbeat on the row spares it too.
    fresh = StepJob.objects.create()
    fresh.claim("worker@gone")
    assert recover_stale({"worker@alive"}, timedelta(seconds=30)) == 0


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_job_then_restarted_fails_the_job_and_runs_new_ones(redis_db: Any) -> None:
    from tests.workers import WorkerProcess, wait_for

    worker = WorkerProcess(f"worker@{settings.NODE_NAME}").start()
    try:
        assert wait_for(lambda: f"worker@{settings.NODE_NAME}" in alive_workers()), worker.output()
        job = StepJob.objects.create(steps=200, step_seconds=0.05)
        job.enqueue()
        assert wait_for(lambda: StepJob.objects.get(pk=job.pk).progress > 0), worker.output()
        worker.kill()
        job.refresh_from_db()
        assert job.status == JobStatus.RUNNING  # left behind by the dead worker

        worker.start()
        assert wait_for(lambda: StepJob.objects.get(pk=job.pk).status == JobStatus.FAILED), worker.output()
        job.refresh_from_db()
        assert job.error == f"The worker worker@{settings.NODE_NAME} restarted while this job was running."

        again = StepJob.objects.create(steps=2)
        again.enqueue()
        assert wait_for(lambda: StepJob.objects.get(pk=again.pk).status == JobStatus.SUCCEEDED), worker.output()
    finally:
        worker.stop()
    assert f"worker@{settings.NODE_NAME}" not in alive_workers()  # a clean stop removes the heartbeat
