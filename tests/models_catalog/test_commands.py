"""Management commands: import, list, verify and download, including their refusals."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from models_catalog.models import LocalModel
from tests.models_catalog.helpers import Peer, make_model_dir

pytestmark = pytest.mark.django_db


def test_import_list_verify(client_data: Path, tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "m", weights_bytes=64 * 1024)
    out = io.StringIO()
    call_command("import_model", str(source), "local/m", stdout=out)
    assert "done" in out.getvalue()
    listing = io.StringIO()
    call_command("list_models", stdout=listing)
    assert "local/m" in listing.getvalue() and "ready" in listing.getvalue()
    call_command("verify_model", "local/m", stdout=io.StringIO())
    (LocalModel.objects.get().ready_path / "config.json").write_text("{}")
    with pytest.raises(CommandError, match=r"config\.json"):
        call_command("verify_model", "local/m", stdout=io.StringIO())


def test_download_command(client_data: Path, peer: Peer, peer_endpoint: object) -> None:
    call_command("download_model", "acme/tiny", "--endpoint", "peer", stdout=io.StringIO())
    assert LocalModel.objects.get().status == LocalModel.Status.READY


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["download_model", "../../etc"], "not a repository id"),
        (["download_model", "acme/x", "--endpoint", "nope"], "No hub endpoint"),
        (["import_model", "relative/dir", "a/b"], "not an absolute path"),
        (["verify_model", "no/such"], "No downloaded model"),
    ],
)
def test_commands_refuse_bad_input(client_data: Path, args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command(*args, stdout=io.StringIO())
