"""Static files storage: hashed, compressed names once `collectstatic` has run (as `make run` does),
the plain names before that (tests, benchmarks, a bare `uvicorn`), which WhiteNoise serves from the
apps' static folders."""

from __future__ import annotations

from whitenoise.storage import CompressedManifestStaticFilesStorage


class ConsoleStaticStorage(CompressedManifestStaticFilesStorage):
    manifest_strict = False

    def stored_name(self, name: str) -> str:
        if not self.hashed_files:  # no manifest yet: nothing was collected
            return name
        return super().stored_name(name)
