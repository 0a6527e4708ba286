"""The workdir lock: one `lwm-jax train` per workdir, so two runs never write the same checkpoints
and metrics. An `flock` on `WORKDIR/train.lock` (released by the kernel when its holder dies) plus
the holder's host and pid in the file, for the refusal message and to report a recovered stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lwm_jax.errors import UserError
from lwm_jax.progress import log

LOCK_FILE = "train.lock"


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(raw: bytes) -> dict:
    """The holder record of a lock file's bytes ({} when empty or unreadable)."""
    try:
        holder = json.loads(raw.decode(errors="replace"))
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """Holds `WORKDIR/train.lock` from `acquire()` to `release()` (also a context manager).

    A lock whose file names a process that is gone (killed, or its host rebooted) is taken over with
    a warning: the kernel dropped its `flock`, so only the file was left behind.
    """

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                kernel_lock = True
            except BlockingIOError:
                holder = _holder(os.read(fd, 4096))
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError:  # a file system without flock: the holder named in the file decides
                kernel_lock = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # its holder removed it between our open and flock
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = _holder(os.read(fd, 4096))
        if previous:
            gone = previous.get("host") == socket.gethostname() and not _alive(int(previous.get("pid", 0)))
            if not (kernel_lock or gone):
                os.close(fd)
                raise self._in_use(previous)
            log(f"warning: recovered a stale lock {self.path} left by pid {previous.get('pid')} on host "
                f"{previous.get('host')} ({'no longer running' if gone else 'its lock was released'})")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _in_use(self, holder: dict) -> UserError:
        return UserError(f"workdir {self.path.parent} is in use by another `lwm-jax train` (host "
                         f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); "
                         f"wait for it to finish or use another --workdir (if it is gone, delete {self.path})")

    def release(self) -> None:
        """Removes the lock file and drops the lock (the file goes first, while it is still ours)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
