"""An exclusive lock on a cache folder, so two ``preprocess`` runs never write one LMDB at once.

The lock is ``flock`` on a small file in the cache folder (one per shard, so shards still run side by side
into one folder). The kernel drops it when the process dies, so a killed run never leaves a stale lock;
the file itself stays and only says who held it last.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from e2e_wsi.errors import UserError


class CacheLockedError(UserError, RuntimeError):
    """Another process holds the lock; the message says which (pid, host, start time).

    A user error (the dispatcher prints one line); still a ``RuntimeError`` for older callers."""


class CacheLock:
    """Context manager holding an exclusive, non-blocking ``flock`` on ``path``.

    Args:
        path: The lock file (created if missing).
        what: What the lock protects, for the message (e.g. the LMDB's name).

    Raises:
        CacheLockedError: On entry, if another process holds the lock.
    """

    def __init__(self, path: str | Path, what: str = "") -> None:
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self._fd: int | None = None

    def __enter__(self) -> CacheLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise CacheLockedError(
                f"{self.what} is being written by another preprocess run ({holder}); wait for it to finish, "
                f"or use another --out (lock file {self.path})"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
