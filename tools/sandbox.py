"""The server-side ``python`` tool: one persistent, isolated interpreter per sandbox.

``PythonSandbox(workdir_root, limits).run(code)`` runs code in a long-lived child interpreter
(``tools/sandbox_child.py``): variables and imports persist across calls. Each call returns
stdout, stderr, the repr of a final expression and any exception (type, message,
traceback), each truncated to ``limits.output_chars``.

Limits: wall time per call (the interpreter is killed; the next call gets a fresh one and
says so), CPU time per call (``RLIMIT_CPU``: raises ``CpuTimeLimitExceeded`` in the code, the
interpreter survives), address space per process (``RLIMIT_AS``: ``MemoryError``), processes
(``RLIMIT_NPROC`` under a uid of the sandbox's own), file size (``RLIMIT_FSIZE``) and output.
As root, the sandbox as a whole also has a cgroup (``tools/sandbox_cgroup.py``: memory of all
its processes together — exceeding it stops every process of the call and the next call is
fresh —, tasks, CPU quota) and a tmpfs directory of ``disk_bytes`` (``ENOSPC`` beyond it).
Threads and processes never outlive their call (a call leaving threads ends its interpreter).

Isolation, measured when the sandbox is created (``sandbox.isolation``; details in
``tools/sandbox_isolation.py``): **as root with ``unshare`` (this project's servers and CI)
the interpreter runs in its own network namespace (no network at all), mount namespace
(filesystem read-only except its directory) and PID namespace, as an unprivileged uid of its
own** (processes limited, other sandboxes' directories unreadable). Without root, sockets are
blocked by a monkeypatch in the interpreter and only the resource limits apply.

Failure behaviour: code errors, limits and a dying interpreter are results
(``SandboxResult.outcome``), never exceptions; ``SandboxError`` is raised only when an
interpreter cannot be started or the sandbox is closed. ``close()`` (also on ``with`` exit,
garbage collection and interpreter exit) kills every process of the sandbox, removes its
cgroup and directory, then frees its uid. With a tmpfs that is instant; without root it is an
``rmtree``, so servers call ``close`` off the event loop.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tools.sandbox_cgroup import CgroupLimits, SandboxCgroup
from tools.sandbox_child import FRAME_HEADER, encode_frame
from tools.sandbox_isolation import (
    SandboxIsolation,
    child_command,
    child_environment,
    detect_isolation,
)
from tools.sandbox_workdir import SandboxWorkdir

Outcome = Literal["ok", "error", "timeout", "died"]
DEFAULT_UID_RANGE = range(200_000, 265_000)
WATCH_INTERVAL_S = 0.1  # how often a waiting call checks the sandbox's memory group


class SandboxError(RuntimeError):
    """The sandbox cannot run code: its interpreter failed to start, or it is closed."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    wall_time_s: float = 30.0  # per call; exceeded: interpreter killed, fresh one next call
    cpu_time_s: float = 20.0  # per call; exceeded: CpuTimeLimitExceeded raised in the code
    cpu_total_s: int = 3600  # per interpreter lifetime (hard RLIMIT_CPU: SIGKILL)
    memory_bytes: int = 1 << 30  # all processes together (cgroup) and each one's address space
    max_processes: int = 16  # processes + threads of the sandbox (fork bombs stop here)
    file_size_bytes: int = 256 << 20  # largest file the code may write
    disk_bytes: int = 256 << 20  # its directory (a tmpfs, as root; counts as memory too)
    cpu_cores: float = 1.0  # CPU quota of all its processes together (cgroup)
    output_chars: int = 32_000  # per stream (stdout, stderr), value repr and traceback
    start_timeout_s: float = 20.0


@dataclass(frozen=True, slots=True)
class SandboxException:
    type: str
    message: str
    traceback: str


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What one ``run`` produced. ``restarted``: this call ran in a fresh interpreter after the
    previous one was lost (``notice`` says why); earlier variables and imports are gone."""

    outcome: Outcome
    stdout: str = ""
    stderr: str = ""
    value: str | None = None  # repr of the final expression's value, when not None
    error: SandboxException | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    restarted: bool = False
    notice: str | None = None
    duration_s: float = 0.0


class InterpreterLost(Exception):
    """The child stopped answering: ``reason`` is the text reported to the caller."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@dataclass
class InterpreterProcess:
    """One child interpreter and its protocol pipes (stdin: requests, stdout: replies)."""

    process: subprocess.Popen[bytes]
    max_frame_bytes: int
    hello: dict[str, Any] = field(default_factory=dict)
    _watch: Callable[[], str | None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(encode_frame(message))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise InterpreterLost("died", self.death_reason()) from error

    def receive(
        self, timeout_s: float, watch: Callable[[], str | None] | None = None
    ) -> dict[str, Any]:
        """The next frame; ``InterpreterLost`` on timeout, end of file or a bad frame, or as
        soon as ``watch`` (called every ``WATCH_INTERVAL_S`` while waiting) names a reason."""
        self._watch = watch
        deadline = time.monotonic() + timeout_s
        header = self._read_exactly(FRAME_HEADER.size, deadline, timeout_s)
        (num_bytes,) = FRAME_HEADER.unpack(header)
        if num_bytes > self.max_frame_bytes:
            raise InterpreterLost("died", f"interpreter sent an oversized reply ({num_bytes} B)")
        body = self._read_exactly(num_bytes, deadline, timeout_s)
        try:
            message = json.loads(body)
        except ValueError as error:
            raise InterpreterLost("died", "interpreter sent a malformed reply") from error
        if not isinstance(message, dict):
            raise InterpreterLost("died", "interpreter sent a malformed reply")
        return message

    def _read_exactly(self, num_bytes: int, deadline: float, timeout_s: float) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        chunks: list[bytes] = []
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while num_bytes > 0:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise InterpreterLost("timeout", f"wall time limit exceeded ({timeout_s} s)")
                if not selector.select(min(remaining_s, WATCH_INTERVAL_S)):
                    reason = self._watch() if self._watch is not None else None
                    if reason is not None:
                        raise InterpreterLost("died", reason)
                    continue
                chunk = os.read(fd, min(num_bytes, 1 << 20))
                if not chunk:
                    raise InterpreterLost("died", self.death_reason())
                chunks.append(chunk)
                num_bytes -= len(chunk)
        return b"".join(chunks)

    def death_reason(self) -> str:
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "the Python interpreter stopped responding"
        if code < 0:
            return f"the Python interpreter died (signal {signal.Signals(-code).name})"
        return f"the Python interpreter died (exit code {code})"

    def kill(self) -> None:
        """Kill the child (and with it its PID namespace); idempotent."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class SandboxResources:
    """What ``close`` releases; kept apart from the sandbox so a finalizer can hold it."""

    workdir: SandboxWorkdir
    cgroup: SandboxCgroup | None = None
    interpreter: InterpreterProcess | None = None

    def stop_interpreter(self) -> None:
        """Kill the interpreter and every process of the sandbox."""
        if self.interpreter is not None:
            self.interpreter.kill()
            self.interpreter = None
        if self.cgroup is not None:
            self.cgroup.kill()

    def release(self) -> None:
        self.stop_interpreter()
        if self.cgroup is not None:
            self.cgroup.remove()
        self.workdir.release()  # frees the uid last: nothing of the sandbox runs any more


class PythonSandbox:
    """A persistent Python interpreter with limits and isolation (see the module docstring).

    Not thread-safe: one ``run`` at a time per sandbox.
    """

    def __init__(
        self,
        workdir_root: str | os.PathLike[str],
        limits: SandboxLimits | None = None,
        *,
        python_executable: str | None = None,
        uid_range: range = DEFAULT_UID_RANGE,
        isolation: SandboxIsolation | None = None,
        uid_lock_dir: Path | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.isolation = isolation or detect_isolation()
        self.python_executable = python_executable
        place = SandboxWorkdir.claim(
            Path(workdir_root),
            self.isolation.separate_uid,
            uid_range,
            self.limits.disk_bytes,
            uid_lock_dir,
        )
        self.workdir, self.uid = place.path, place.uid
        self._resources = SandboxResources(place)
        self._finalizer = weakref.finalize(self, SandboxResources.release, self._resources)
        limits = self.limits
        name = f"tarry-sandbox-{self.uid if self.uid is not None else secrets.token_hex(6)}"
        try:
            self._resources.cgroup = SandboxCgroup.create(
                name, CgroupLimits(limits.memory_bytes, limits.max_processes, limits.cpu_cores)
            )
        except BaseException:
            self.close()
            raise
        self._lost_reason: str | None = None  # why the last interpreter is gone, if it is
        self._num_cells = 0
        try:
            self._resources.interpreter = self._start_interpreter()
        except BaseException:
            self.close()
            raise

    @property
    def network_mode(self) -> str:
        return self.isolation.network_mode

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def disk_quota_bytes(self) -> int | None:
        """The directory's size limit; None without one (not root)."""
        return self._resources.workdir.disk_quota_bytes

    @property
    def cgroup_controls(self) -> set[str]:
        """The limits the sandbox's cgroup enforces ("memory", "pids", "cpu"); empty without."""
        cgroup = self._resources.cgroup
        return set(cgroup.controls) if cgroup is not None else set()

    def cpu_time_s(self) -> float | None:
        """CPU time used by all processes of the sandbox so far (its cgroup); None without."""
        cgroup = self._resources.cgroup
        return cgroup.cpu_time_s() if cgroup is not None else None

    def run(self, code: str) -> SandboxResult:
        """Run ``code`` in the persistent interpreter. Raises ``SandboxError`` only when closed
        or when a fresh interpreter cannot start."""
        if self.closed:
            raise SandboxError("sandbox is closed")
        restarted, notice = False, None
        if self._resources.interpreter is None:
            self._resources.interpreter = self._start_interpreter()
            restarted = True
            notice = (
                f"This call ran in a fresh Python interpreter: the previous call ended with "
                f"'{self._lost_reason}'. Variables and imports from earlier calls are gone; "
                "files in the working directory remain."
            )
        interpreter = self._resources.interpreter
        started = time.monotonic()
        self._num_cells += 1
        cgroup = self._resources.cgroup
        num_ooms = cgroup.num_oom_kills() if cgroup is not None else 0

        def memory_exceeded() -> str | None:
            if cgroup is None or cgroup.num_oom_kills() == num_ooms:
                return None
            return (
                f"the sandbox's memory limit ({self.limits.memory_bytes >> 20} MiB for all its "
                "processes together) was exceeded and every process of the call was stopped"
            )

        try:
            interpreter.send({"code": code, "cpu_time_s": self.limits.cpu_time_s})
            reply = interpreter.receive(self.limits.wall_time_s, memory_exceeded)
            if (reason := memory_exceeded()) is not None:
                raise InterpreterLost("died", reason)
        except InterpreterLost as lost:
            # The OOM killer may have picked the interpreter itself: say why it died.
            memory_reason = memory_exceeded() if lost.outcome == "died" else None
            reason = memory_reason or lost.reason
            self._resources.stop_interpreter()
            self._lost_reason = reason
            error_type = "InterpreterDied"
            if lost.outcome == "timeout":
                error_type = "WallTimeLimitExceeded"
            elif memory_reason is not None or "memory limit" in reason:
                error_type = "MemoryLimitExceeded"
            return SandboxResult(
                outcome=lost.outcome,
                error=SandboxException(
                    error_type, f"{reason}; the next call starts a fresh interpreter", ""
                ),
                restarted=restarted,
                notice=notice,
                duration_s=time.monotonic() - started,
            )
        if reply.get("ended"):  # it left threads running: it exits, and so does the rest
            self._resources.stop_interpreter()
            self._lost_reason = str(reply["ended"])
            ended = f"{reply['ended']}; the next call starts a fresh interpreter"
            notice = f"{notice} {ended}" if notice else ended
        return self._result_from_reply(reply, restarted, notice, time.monotonic() - started)

    def close(self) -> None:
        """Kill every process of the sandbox, remove its cgroup and directory, free its uid."""
        self._finalizer()

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_interpreter(self) -> InterpreterProcess:
        limits = self.limits
        config = {
            "workdir": str(self.workdir),
            "uid": self.uid,
            "isolate_filesystem": self.isolation.unshare_path is not None,
            "block_sockets": self.isolation.network_mode != "netns",
            "memory_bytes": limits.memory_bytes,
            "max_processes": limits.max_processes if self.uid is not None else None,
            "cgroup_procs": cgroup.procs_files if (cgroup := self._resources.cgroup) else [],
            "file_size_bytes": limits.file_size_bytes,
            "cpu_total_s": limits.cpu_total_s,
            "output_chars": limits.output_chars,
        }
        process = subprocess.Popen(
            child_command(self.isolation, self.python_executable, config),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=child_environment(self.workdir),
            cwd="/",
            start_new_session=True,
        )
        # A reply holds 2 streams + value + traceback, JSON-escaped (up to 6 bytes a char).
        interpreter = InterpreterProcess(process, max_frame_bytes=30 * limits.output_chars + 4096)
        try:
            hello = interpreter.receive(limits.start_timeout_s)
        except InterpreterLost as lost:
            interpreter.kill()
            raise SandboxError(f"sandbox interpreter failed to start: {lost.reason}") from None
        if not hello.get("ready"):
            interpreter.kill()
            raise SandboxError(f"sandbox interpreter failed to start: {hello.get('error')}")
        interpreter.hello = hello
        return interpreter

    def _result_from_reply(
        self, reply: dict[str, Any], restarted: bool, notice: str | None, duration_s: float
    ) -> SandboxResult:
        error = reply.get("error")
        return SandboxResult(
            outcome="error" if error else "ok",
            stdout=str(reply.get("stdout", "")),
            stderr=str(reply.get("stderr", "")),
            value=reply.get("value"),
            error=exception_from_reply(error) if error else None,
            stdout_truncated=bool(reply.get("stdout_dropped")),
            stderr_truncated=bool(reply.get("stderr_dropped")),
            restarted=restarted,
            notice=notice,
            duration_s=duration_s,
        )


def exception_from_reply(error: Any) -> SandboxException:
    fields = error if isinstance(error, dict) else {}
    return SandboxException(
        type=str(fields.get("type", "Exception")),
        message=str(fields.get("message", "")),
        traceback=str(fields.get("traceback", "")),
    )
