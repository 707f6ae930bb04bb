"""Files only this user may read (mode 0600), replaced atomically: a reader sees the old contents or
the new, never half of either. For what a box's worker publishes to its relay and what a joining box
keeps of the cluster's settings."""

from __future__ import annotations

import os
from pathlib import Path


def replace_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (its folder made if missing) through a scratch file and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(scratch, path)
