"""Digests the hub uses: sha256 for LFS files, the git blob id (sha1) for the others."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 8 * 1024 * 1024


def _blob_hasher(size: int) -> hashlib._Hash:
    hasher = hashlib.sha1(usedforsecurity=False)
    hasher.update(b"blob %d\0" % size)
    return hasher


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of a file, in one read."""
    size = path.stat().st_size
    sha256, blob = hashlib.sha256(), _blob_hasher(size)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


class HashingWriter:
    """A file object for ``http_get`` that hashes what it writes, so verifying costs no extra read.

    Opened on a partial file, it first hashes the bytes already there. If the download restarts
    from zero (a server that ignores Range), ``truncate`` resets the digests to what is left.
    """

    def __init__(self, path: Path, expected_size: int) -> None:
        self.path = path
        self.expected_size = expected_size
        self.handle: BinaryIO = path.open("ab")
        self._rehash()

    def _rehash(self) -> None:
        self.sha256, self.blob = hashlib.sha256(), _blob_hasher(self.expected_size)
        self.handle.flush()
        with self.path.open("rb") as existing:
            while chunk := existing.read(CHUNK):
                self.sha256.update(chunk)
                self.blob.update(chunk)

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.blob.update(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.handle.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        result = self.handle.truncate(size)
        self._rehash()
        return result

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

    def digests(self) -> tuple[str, str]:
        return self.sha256.hexdigest(), self.blob.hexdigest()
