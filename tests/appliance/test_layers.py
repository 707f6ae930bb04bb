"""Dependencies point one way (DESIGN.md): the hardware (``gpus``) and the node registry (``nodes``)
know nothing of deployments, tenants or the gateway; those register what they need (``gpus.users``,
``nodes.registry``). Read from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPPER = ("provisioning", "tenancy", "gateway", "models_catalog", "dashboard")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("app", ["gpus", "nodes"])
def test_lower_layers_import_no_upper_one(app: str) -> None:
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / app).rglob("*.py")
        if "migrations" not in path.parts
        for name in imports(path)
        if name.split(".")[0] in UPPER
    }
    assert wrong == set()


def test_the_check_finds_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from provisioning.models import Replica\n    return Replica\n")
    assert "provisioning.models" in imports(module)
