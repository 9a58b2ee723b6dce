"""Exclusive folder locks: two ``preprocess`` runs never write one LMDB at once, two ``fit`` runs never
share a run folder, two ``predict`` runs never write one output folder.

The lock is ``flock`` on a small file inside the folder (one per cache shard, so shards still run side by
side into one cache folder). The kernel drops it when the process dies, so a killed run never leaves a
stale lock; the file itself stays and only says who held it last.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from e2e_wsi.errors import UserError


class LockedError(UserError, RuntimeError):
    """Another process holds the lock; the message says which (pid, host, start time) and what to do.

    A :class:`~e2e_wsi.errors.UserError` (one line, exit 2), and still a ``RuntimeError`` for old callers.
    """


CacheLockedError = LockedError  # the name preprocess has always raised


class FolderLock:
    """Context manager holding an exclusive, non-blocking ``flock`` on ``path``.

    Args:
        path: The lock file (created if missing, with its folder).
        what: What the lock protects, for the message (e.g. ``cache CACHE/patches.lmdb``).
        holder: Who else could hold it, for the message (e.g. ``another preprocess run``).
        advice: What the user can do instead of waiting (e.g. ``use another --out``).

    Raises:
        LockedError: On entry, if another process (or another open handle in this one) holds the lock.
    """

    def __init__(
        self,
        path: str | Path,
        what: str = "",
        holder: str = "another preprocess run",
        advice: str = "use another --out",
    ) -> None:
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.holder = holder
        self.advice = advice
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def acquire(self) -> None:
        """Take the lock now (see :meth:`release`); the context manager does both."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self._holder(fd)
            os.close(fd)
            raise LockedError(
                f"{self.what} is in use by {self.holder} ({info}); wait for it to finish, "
                f"or {self.advice} (lock file {self.path})"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


CacheLock = FolderLock  # preprocess's name; its defaults are the cache's wording
