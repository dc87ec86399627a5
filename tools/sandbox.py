"""The server-side ``python`` tool: one persistent, isolated interpreter per sandbox.

``PythonSandbox(workdir_root, limits).run(code)`` runs code in a long-lived child interpreter
(``tools/sandbox_child.py``): variables and imports persist across calls. Each call returns
stdout, stderr, the repr of a final expression and any exception (type, message,
traceback), each truncated to ``limits.output_chars``.

Limits: wall time per call (the interpreter is killed; the next call gets a fresh one and
says so), CPU time per call (``RLIMIT_CPU``: raises ``CpuTimeLimitExceeded`` in the code, the
interpreter survives), address space (``RLIMIT_AS``: ``MemoryError``), processes
(``RLIMIT_NPROC`` under a uid of the sandbox's own), file size (``RLIMIT_FSIZE``) and output.

Isolation, measured when the sandbox is created (``sandbox.isolation``; details in
``tools/sandbox_isolation.py``): **as root with ``unshare`` (this project's servers and CI)
the interpreter runs in its own network namespace (no network at all), mount namespace
(filesystem read-only except its directory) and PID namespace, as an unprivileged uid of its
own** (processes limited, other sandboxes' directories unreadable). Without root, sockets are
blocked by a monkeypatch in the interpreter and only the resource limits apply.

Failure behaviour: code errors, limits and a dying interpreter are results
(``SandboxResult.outcome``), never exceptions; ``SandboxError`` is raised only when an
interpreter cannot be started or the sandbox is closed. ``close()`` (also on ``with`` exit,
garbage collection and interpreter exit) kills the interpreter and removes the directory.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tools.sandbox_child import FRAME_HEADER, encode_frame
from tools.sandbox_isolation import (
    SandboxIsolation,
    child_command,
    child_environment,
    claim_workdir,
    detect_isolation,
)

Outcome = Literal["ok", "error", "timeout", "died"]
DEFAULT_UID_RANGE = range(200_000, 265_000)


class SandboxError(RuntimeError):
    """The sandbox cannot run code: its interpreter failed to start, or it is closed."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    wall_time_s: float = 30.0  # per call; exceeded: interpreter killed, fresh one next call
    cpu_time_s: float = 20.0  # per call; exceeded: CpuTimeLimitExceeded raised in the code
    cpu_total_s: int = 3600  # per interpreter lifetime (hard RLIMIT_CPU: SIGKILL)
    memory_bytes: int = 1 << 30  # address space of each process
    max_processes: int = 16  # processes + threads of the sandbox uid (fork bombs stop here)
    file_size_bytes: int = 256 << 20  # largest file the code may write
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

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(encode_frame(message))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise InterpreterLost("died", self.death_reason()) from error

    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next frame; ``InterpreterLost`` on timeout, end of file or a bad frame."""
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
                if remaining_s <= 0 or not selector.select(remaining_s):
                    raise InterpreterLost("timeout", f"wall time limit exceeded ({timeout_s} s)")
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

    workdir: Path
    interpreter: InterpreterProcess | None = None

    def release(self) -> None:
        if self.interpreter is not None:
            self.interpreter.kill()
            self.interpreter = None
        shutil.rmtree(self.workdir, ignore_errors=True)


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
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.isolation = isolation or detect_isolation()
        self.python_executable = python_executable
        self.workdir, self.uid = claim_workdir(Path(workdir_root), self.isolation, uid_range)
        self._resources = SandboxResources(self.workdir)
        self._finalizer = weakref.finalize(self, SandboxResources.release, self._resources)
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
        try:
            interpreter.send({"code": code, "cpu_time_s": self.limits.cpu_time_s})
            reply = interpreter.receive(self.limits.wall_time_s)
        except InterpreterLost as lost:
            interpreter.kill()
            self._resources.interpreter = None
            self._lost_reason = lost.reason
            return SandboxResult(
                outcome=lost.outcome,
                error=SandboxException(
                    "WallTimeLimitExceeded" if lost.outcome == "timeout" else "InterpreterDied",
                    f"{lost.reason}; the next call starts a fresh interpreter",
                    "",
                ),
                restarted=restarted,
                notice=notice,
                duration_s=time.monotonic() - started,
            )
        return self._result_from_reply(reply, restarted, notice, time.monotonic() - started)

    def close(self) -> None:
        """Kill the interpreter (and every process it started) and remove the directory."""
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
