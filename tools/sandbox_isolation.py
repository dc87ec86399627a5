"""How a Python sandbox is isolated on this machine, and the command that starts one.

Two mechanisms are measured at sandbox creation, not assumed:

- **Namespaces** (root and a working ``unshare``): the interpreter starts inside new mount,
  network and PID namespaces (``unshare --mount-proc -n -p -f --kill-child``). The network
  namespace holds only a downed loopback device, so every connection fails; the mount
  namespace makes the whole filesystem read-only except the sandbox's directory; the PID
  namespace makes the interpreter its init, so killing it ends every process it started.
- **A uid of its own** (root): each sandbox claims a uid from ``uid_range`` by creating its
  directory ``sandbox-<uid>`` (mode 0700, owned by that uid) under the workdir root; the
  interpreter drops to it. ``RLIMIT_NPROC`` counts processes per uid and is not enforced for
  root, so only an unprivileged uid of its own makes the process limit contain a fork bomb;
  the same uid also makes other sandboxes' directories unreadable.

Without root (fallback): sockets are blocked inside the interpreter (``socket.socket``
raises; code using ctypes could get round it), the interpreter runs as the server's own uid
(no process limit, other sandboxes' directories protected by mode 0700 only against other
uids), and only the resource limits hold. ``SandboxIsolation`` records which mode is active.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
UNSHARE_FLAGS = ["--mount-proc", "--net", "--pid", "--fork", "--kill-child"]


@dataclass(frozen=True, slots=True)
class SandboxIsolation:
    """Which isolation mechanisms a sandbox uses (see the module docstring)."""

    unshare_path: str | None  # None: no namespaces
    separate_uid: bool

    @property
    def network_mode(self) -> str:
        """``"netns"`` (own network namespace) or ``"socket-blocked"`` (monkeypatch)."""
        return "netns" if self.unshare_path else "socket-blocked"


def detect_isolation() -> SandboxIsolation:
    """Probe this machine: namespaces need root and an ``unshare`` that actually works."""
    is_root = os.geteuid() == 0
    unshare_path = shutil.which("unshare") if is_root else None
    if unshare_path is not None:
        try:
            probe = subprocess.run(
                [unshare_path, *UNSHARE_FLAGS, "true"], capture_output=True, timeout=10
            )
            if probe.returncode != 0:
                unshare_path = None
        except (OSError, subprocess.TimeoutExpired):
            unshare_path = None
    return SandboxIsolation(unshare_path=unshare_path, separate_uid=is_root)


def claim_workdir(
    workdir_root: Path, isolation: SandboxIsolation, uid_range: range
) -> tuple[Path, int | None]:
    """Create this sandbox's directory (mode 0700) and, with a separate uid, claim that uid.

    The directory name carries the uid, so creating it (atomic, fails if it exists) is the
    claim: sandboxes sharing a workdir root never share a uid. Use one root per server.
    Raises ``RuntimeError`` when every uid in ``uid_range`` is taken.
    """
    workdir_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    if not isolation.separate_uid:
        workdir = workdir_root / f"sandbox-{secrets.token_hex(8)}"
        workdir.mkdir(mode=0o700)
        return workdir, None
    for uid in uid_range:
        workdir = workdir_root / f"sandbox-{uid}"
        try:
            workdir.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chown(workdir, uid, uid)
        return workdir, uid
    raise RuntimeError(f"no free sandbox uid in {uid_range} under {workdir_root}")


def child_command(
    isolation: SandboxIsolation, python_executable: str | None, config: dict[str, Any]
) -> list[str]:
    python = python_executable or sys.executable
    command = [python, "-I", str(CHILD_SCRIPT), json.dumps(config)]
    if isolation.unshare_path:
        command = [isolation.unshare_path, *UNSHARE_FLAGS, *command]
    return command


def child_environment(workdir: Path) -> dict[str, str]:
    """A clean environment: nothing of the server's (keys, tokens) reaches the sandbox."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }
