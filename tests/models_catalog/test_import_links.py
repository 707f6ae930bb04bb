"""Imports never follow a symbolic link out of the directory: refused when the directory is scanned, and
again when each file is opened (O_NOFOLLOW, one path component at a time), so a link swapped in between
the check and the copy is refused too, with a clear error and nothing imported."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.jobs import JobStatus, run_job
from models_catalog import importer
from models_catalog.importer import ImportRefused, open_directory, open_inside
from models_catalog.models import LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from tests.models_catalog.helpers import make_model_dir

pytestmark = pytest.mark.django_db

SECRET = b"outside the model directory: never to be copied"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    model = make_model_dir(tmp_path / "usb" / "model", weights_bytes=64 * 1024)
    (model / "sub").mkdir()
    (model / "sub" / "extra.json").write_text("{}")
    return model


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "private"
    directory.mkdir()
    (directory / "extra.json").write_bytes(SECRET)
    (directory / "config.json").write_bytes(SECRET)
    return directory


def assert_nothing_imported(job: ModelJob, client_data: Path, message: str) -> None:
    assert job.status == JobStatus.FAILED
    assert message in job.error, job.error
    model = LocalModel.objects.get()
    assert model.status != LocalModel.Status.READY and not model.ready_path.exists()
    copied = [path for path in Path(client_data).rglob("*") if path.is_file() and SECRET in path.read_bytes()]
    assert copied == []
    assert not list(Path(client_data).rglob("staging/*")), "a refused import left its staging copy behind"


def import_with_swap(monkeypatch: pytest.MonkeyPatch, source: Path, swap: Callable[[], None]) -> ModelJob:
    """Request the import (the directory is checked), then run the job with ``swap`` done right after its
    own scan: between the check and the opening of the files."""
    job = LocalModel.request_import(str(source), "local/m", enqueue=False)
    real_scan = importer.scan

    def scan_then_swap(directory: Path) -> list[tuple[str, int]]:
        listing = real_scan(directory)
        swap()
        return listing

    monkeypatch.setattr(importer, "scan", scan_then_swap)
    run_job(ModelJob, job.pk, model_job_body)
    job.refresh_from_db()
    return job


def test_a_symlink_pointing_outside_is_refused_when_checked(client_data: Path, source: Path, outside: Path) -> None:
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").symlink_to(outside / "extra.json")
    with pytest.raises(ImportRefused, match=r"tokenizer\.json is a symbolic link"):
        LocalModel.request_import(str(source), "local/m", enqueue=False)
    assert not LocalModel.objects.exists()


def test_a_file_swapped_for_a_symlink_after_the_check_is_refused_at_open(
    client_data: Path, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def swap() -> None:
        (source / "tokenizer.json").unlink()
        (source / "tokenizer.json").symlink_to(outside / "extra.json")

    job = import_with_swap(monkeypatch, source, swap)
    assert_nothing_imported(job, client_data, "tokenizer.json became a symbolic link")


def test_a_directory_swapped_for_a_symlink_after_the_check_is_refused_at_open(
    client_data: Path, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def swap() -> None:
        shutil.rmtree(source / "sub")
        (source / "sub").symlink_to(outside, target_is_directory=True)

    job = import_with_swap(monkeypatch, source, swap)
    assert_nothing_imported(job, client_data, "sub became a symbolic link")


def test_the_import_directory_swapped_for_a_symlink_is_refused(
    client_data: Path, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def swap() -> None:
        source.rename(source.with_name("moved"))
        source.symlink_to(outside, target_is_directory=True)

    job = import_with_swap(monkeypatch, source, swap)
    assert_nothing_imported(job, client_data, "is not a directory (a symbolic link?)")


def test_a_fifo_swapped_in_is_refused_without_hanging(
    client_data: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def swap() -> None:
        (source / "tokenizer.json").unlink()
        os.mkfifo(source / "tokenizer.json")

    job = import_with_swap(monkeypatch, source, swap)
    assert_nothing_imported(job, client_data, "tokenizer.json is not a regular file")


def test_open_inside_refuses_every_way_out(source: Path, outside: Path) -> None:
    (source / "link").symlink_to(outside / "extra.json")
    (source / "linked-dir").symlink_to(outside, target_is_directory=True)
    (source / "inner-link").symlink_to(source / "config.json")  # even one that stays inside
    directory_fd = open_directory(source)
    try:
        with os.fdopen(open_inside(directory_fd, "sub/extra.json"), "rb") as handle:
            assert handle.read() == b"{}"
        for relative, message in [
            ("link", "link became a symbolic link"),
            ("linked-dir/extra.json", "linked-dir became a symbolic link"),
            ("inner-link", "inner-link became a symbolic link"),
            ("sub", "sub is not a regular file"),
            ("config.json/x", "config.json became a symbolic link or another kind of file"),
        ]:
            with pytest.raises(ImportRefused, match=message):
                open_inside(directory_fd, relative)
        with pytest.raises(ValueError, match="leave the model's directory"):
            open_inside(directory_fd, "../private/extra.json")
    finally:
        os.close(directory_fd)
    leaked = [name for name in os.listdir("/proc/self/fd") if _points_into(name, source)]
    assert leaked == [], "open_inside left descriptors open"


def _points_into(fd_name: str, directory: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd_name}").startswith(str(directory))
    except OSError:
        return False


def test_a_good_import_still_works(client_data: Path, source: Path, monkeypatch: Any) -> None:
    job = import_with_swap(monkeypatch, source, lambda: None)
    assert job.status == JobStatus.SUCCEEDED, job.error
    model = LocalModel.objects.get()
    assert (model.ready_path / "sub" / "extra.json").read_text() == "{}"
    assert not list(Path(client_data).rglob("staging/*"))
