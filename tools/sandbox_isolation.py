"""How a Python sandbox is isolated on this machine, and the command that starts one.

Two mechanisms are measured at sandbox creation, not assumed:

- **Namespaces** (root and a working ``unshare``): the interpreter starts inside new mount,
  network and PID namespaces (``unshare --mount-proc -n -p -f --kill-child``). The network
  namespace holds only a downed loopback device, so every connection fails; the mount
  namespace makes the whole filesystem read-only except the sandbox's directory; the PID
  namespace makes the interpreter its init, so killing it ends every process it started.
- **A uid of its own** (root): claimed machine-wide with a lock file
  (``tools/sandbox_workdir.py``); the interpreter drops to it. ``RLIMIT_NPROC`` counts
  processes per uid and is not enforced for root, so only an unprivileged uid of its own makes
  the process limit contain a fork bomb; it also makes other sandboxes' directories unreadable.
- **A cgroup of its own** (root, writable cgroupfs; ``tools/sandbox_cgroup.py``): memory,
  tasks and CPU quota for all its processes together, and a kill that reaches all of them.
- **A tmpfs directory** (root): a disk quota (``tools/sandbox_workdir.py``).

Always, root or not: a seccomp filter denies creating user namespaces (``unshare -U``,
``clone(CLONE_NEWUSER)``), a call that leaves threads running ends its interpreter, and every
process a call started is killed when the call ends (the interpreter is a child subreaper, so
orphans come back to it to be killed).

Without root (fallback): sockets are blocked inside the interpreter (``socket.socket``
raises; code using ctypes could get round it), the interpreter runs as the server's own uid
(no process limit, other sandboxes' directories protected by mode 0700 only against other
uids), memory is limited per process (``RLIMIT_AS``), not per sandbox, and there is no disk
quota. ``SandboxIsolation`` records which mode is active.
"""

from __future__ import annotations

import json
import os
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
        # Thread pools of numeric libraries would outlive each call and end the interpreter.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
