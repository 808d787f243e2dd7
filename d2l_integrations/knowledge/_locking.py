"""Inter-process locks for a knowledge-base folder (POSIX ``flock``).

* :class:`StoreLock`: one lock file per store; writers hold it exclusively for short commit
  steps, readers of the embedded Chroma index hold it shared.
* :class:`OwnerLease`: each writing process holds an exclusive lock on its own file for its whole
  life. The kernel drops it when the process dies (even on SIGKILL), so "is the owner of this
  half-written work still alive?" is answered by trying to take its lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from d2l_integrations.errors import StoreLockTimeoutError

logger = logging.getLogger(__name__)


class StoreLock:
    """A reentrant (per process) shared/exclusive file lock with a timeout.

    Threads of one process serialise on an internal ``RLock``; a shared request while this
    process already holds the lock exclusively is granted without touching the file lock.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 600.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._thread_lock = threading.RLock()
        self._fd: int | None = None
        self._mode: int | None = None  # fcntl.LOCK_SH / LOCK_EX while held
        self._depth = 0

    def _acquire(self, mode: int) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                msg = (
                    f"Another process held the knowledge-base lock {str(self.path)!r} for more than {self.timeout:.0f} s. "
                    "Wait for it to finish, or raise lock_timeout=."
                )
                raise StoreLockTimeoutError(msg)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._acquire(mode)
                self._mode = mode
            elif mode == fcntl.LOCK_EX and self._mode == fcntl.LOCK_SH:
                msg = "Cannot upgrade a shared knowledge-base lock to exclusive (internal error)."
                raise RuntimeError(msg)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    assert self._fd is not None
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    self._mode = None

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold the lock exclusively (writers)."""
        return self._hold(fcntl.LOCK_EX)

    def shared(self) -> AbstractContextManager[None]:
        """Hold the lock shared (readers); granted at once if this process holds it exclusively."""
        return self._hold(fcntl.LOCK_SH if self._mode != fcntl.LOCK_EX else fcntl.LOCK_EX)

    @property
    def held_exclusively(self) -> bool:
        return self._mode == fcntl.LOCK_EX and self._depth > 0

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None and self._depth == 0:
                os.close(self._fd)
                self._fd = None



class OwnerLease:
    """This process's identity in a store, proven alive by a held lock on ``owners/<id>.lock``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.owner_id = uuid.uuid4().hex[:16]
        self._fd: int | None = None

    def acquire(self) -> str:
        """Take the lease (idempotent); return the owner id."""
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / f"{self.owner_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
        return self.owner_id

    def is_alive(self, owner_id: str) -> bool:
        """Whether the process that owns ``owner_id`` still runs (its lease lock is held)."""
        if owner_id == self.owner_id and self._fd is not None:
            return True
        path = self.folder / f"{owner_id}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also releases the probe lock
        return False

    def forget(self, owner_id: str) -> None:
        """Remove a dead owner's lease file."""
        if owner_id != self.owner_id:
            (self.folder / f"{owner_id}.lock").unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            (self.folder / f"{self.owner_id}.lock").unlink(missing_ok=True)
