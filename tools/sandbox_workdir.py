"""A sandbox's place on the machine: its uid (unique machine-wide) and its size-limited directory.

**Uids** (root): a sandbox claims uid ``u`` of ``uid_range`` by holding an exclusive ``flock``
on ``<lock_dir>/<u>.lock`` for its whole life. Locks are per open file and vanish with the
process that held them, so two ``tarry serve`` processes on one machine (or two sandbox
managers in one) never share a uid, and a crashed server frees its uids at once. The lock is
released last in ``release``, after every process of the sandbox is gone.

**Directory**: ``<workdir_root>/sandbox-<uid>-<random>``, mode 0700, owned by the uid. As
root it is a tmpfs mounted with ``size=disk_bytes`` (writing more fails with ``ENOSPC`` in the
code; its pages count against the sandbox's memory group), so releasing it is an instant lazy
unmount. Without root it is a plain directory: no disk quota (only ``RLIMIT_FSIZE`` per file),
and ``release`` removes it with ``rmtree`` — callers run ``release`` off the event loop.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

MNT_DETACH = 2
MS_NOSUID = 2
MS_NODEV = 4


def default_uid_lock_dir() -> Path:
    """One directory per machine (``/run``, else the temp dir) for every server's uid locks."""
    run = Path("/run")
    base = run if os.access(run, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / "tarry-sandbox-uids"


def claim_uid(uid_range: range, lock_dir: Path) -> tuple[int, int]:
    """(uid, fd holding its lock): the first uid of ``uid_range`` no live sandbox holds.

    Raises RuntimeError when every uid is held.
    """
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for uid in uid_range:
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise RuntimeError(f"no free sandbox uid in {uid_range} (locks in {lock_dir})")


def mount_tmpfs(path: Path, size_bytes: int, uid: int) -> bool:
    """Mount a tmpfs of ``size_bytes`` owned by ``uid`` on ``path``; False where not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={size_bytes},mode=0700,uid={uid},gid={uid}".encode()
    result = libc.mount(
        b"tmpfs", str(path).encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), options
    )
    return result == 0


def unmount_lazily(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(path).encode(), MNT_DETACH)


@dataclass
class SandboxWorkdir:
    """A claimed uid (None without root) and the sandbox's directory (see the module docstring)."""

    path: Path
    uid: int | None
    uid_lock_fd: int | None
    disk_quota_bytes: int | None  # None: no quota (not root, or tmpfs not mountable)

    @classmethod
    def claim(
        cls,
        workdir_root: Path,
        separate_uid: bool,
        uid_range: range,
        disk_bytes: int,
        lock_dir: Path | None = None,
    ) -> SandboxWorkdir:
        workdir_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        if not separate_uid:
            path = workdir_root / f"sandbox-{secrets.token_hex(8)}"
            path.mkdir(mode=0o700)
            return cls(path, None, None, None)
        uid, fd = claim_uid(uid_range, lock_dir or default_uid_lock_dir())
        path = workdir_root / f"sandbox-{uid}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
            quota = disk_bytes if mount_tmpfs(path, disk_bytes, uid) else None
            os.chown(path, uid, uid)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, uid, fd, quota)

    def release(self) -> None:
        """Remove the directory, then free the uid (idempotent)."""
        if self.disk_quota_bytes is not None:
            unmount_lazily(self.path)
            self.disk_quota_bytes = None
        shutil.rmtree(self.path, ignore_errors=True)
        if self.uid_lock_fd is not None:
            os.close(self.uid_lock_fd)
            self.uid_lock_fd = None
