"""Digests the hub uses: sha256 for LFS files, the git blob id (sha1) for the others."""

from __future__ import annotations

import hashlib
import queue
import threading
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


def lfs_pointer_blob_id(sha256: str, size: int) -> str:
    """The git blob id of an LFS pointer file: what the hub lists as an LFS file's blob id."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    hasher = _blob_hasher(len(pointer))
    hasher.update(pointer)
    return hasher.hexdigest()


class HashingWriter:
    """A file object for ``http_get`` that hashes what it writes, so verifying costs no extra read.

    Hashing and writing happen on a thread of their own (both release the GIL), overlapping with
    the network reads of the caller: on a LAN the disk write is the slowest step.
    Opened on a partial file, it first hashes the bytes already there. If the download restarts
    from zero (a server that ignores Range), ``truncate`` resets the digests to what is left.
    ``blob=False`` skips the git blob id, which LFS files (checked by sha256) do not need.
    """

    QUEUE_CHUNKS = 16

    def __init__(self, path: Path, expected_size: int, blob: bool = True) -> None:
        self.path = path
        self.expected_size = expected_size
        self.with_blob = blob
        self.handle: BinaryIO = path.open("ab")
        self.error: BaseException | None = None
        self.pending: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_CHUNKS)
        self._rehash()
        self.thread = threading.Thread(target=self._drain_loop, name="hashing-writer", daemon=True)
        self.thread.start()

    def _rehash(self) -> None:
        self.sha256 = hashlib.sha256()
        self.blob = _blob_hasher(self.expected_size) if self.with_blob else None
        self.handle.flush()
        with self.path.open("rb") as existing:
            while chunk := existing.read(CHUNK):
                self._update(chunk)

    def _update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.blob is not None:
            self.blob.update(data)

    def _drain_loop(self) -> None:
        while True:
            data = self.pending.get()
            try:
                if data is None:
                    return
                if self.error is None:
                    self._update(data)
                    self.handle.write(data)
            except BaseException as exc:  # kept and raised in the caller's thread
                self.error = exc
            finally:
                self.pending.task_done()

    def _sync(self) -> None:
        """Wait until every queued chunk is written; raise what the writing thread hit."""
        self.pending.join()
        if self.error is not None:
            raise self.error

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.pending.put(bytes(data))
        return len(data)

    def tell(self) -> int:
        self._sync()
        return self.handle.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self._sync()
        return self.handle.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self._sync()
        result = self.handle.truncate(size)
        self._rehash()
        return result

    def flush(self) -> None:
        self._sync()
        self.handle.flush()

    def close(self) -> None:
        if self.thread.is_alive():
            self.pending.join()
            self.pending.put(None)
            self.thread.join()
        self.handle.close()
        if self.error is not None:
            raise self.error

    def digests(self) -> tuple[str, str]:
        """(sha256, git blob id) of everything written; the blob id is empty when not computed."""
        self._sync()
        return self.sha256.hexdigest(), self.blob.hexdigest() if self.blob is not None else ""
