"""The python tool's sandbox: persistence, results, limits and isolation.

Hostile code (busy loops, a fork bomb, huge allocations and outputs) runs with tight limits;
each test checks that the call reports a clear result and that the sandbox (or a fresh
interpreter) keeps working. The containment tests expect the full isolation mode (uid switch,
namespaces), which needs root: the development machine and CI run as root. Without root they
fail, since the fallback mode really does not contain a fork bomb or filesystem writes.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.sandbox import PythonSandbox, SandboxError, SandboxLimits

TIGHT_LIMITS = SandboxLimits(
    wall_time_s=3.0, cpu_time_s=1.0, memory_bytes=512 << 20, max_processes=8, output_chars=2000
)


@pytest.fixture(scope="module")
def workdir_root() -> Iterator[Path]:
    # Not under pytest's tmp dir: tests look at what the sandbox can reach from its directory.
    root = Path(tempfile.mkdtemp(prefix="tarry-sandbox-test-"))
    yield root / "sandboxes"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox(workdir_root: Path) -> Iterator[PythonSandbox]:
    """One sandbox shared by the tests that leave it intact (cheaper than one per test)."""
    with PythonSandbox(workdir_root, TIGHT_LIMITS) as shared:
        yield shared


@pytest.fixture
def fresh_sandbox(workdir_root: Path) -> Iterator[PythonSandbox]:
    with PythonSandbox(workdir_root, TIGHT_LIMITS) as own:
        yield own


def test_variables_and_imports_persist(sandbox: PythonSandbox) -> None:
    assert sandbox.run("import math\ncounter = 41").outcome == "ok"
    result = sandbox.run("counter += 1\nround(math.pi, 2), counter")
    assert result.outcome == "ok"
    assert result.value == "(3.14, 42)"
    assert not result.restarted


def test_stdout_stderr_and_last_expression(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\n[1, 2][0] + 1")
    assert (result.stdout, result.stderr, result.value) == ("out\n", "err\n", "2")
    assert sandbox.run("x = 1").value is None
    assert sandbox.run("None").value is None


def test_exception_reports_type_message_and_traceback(sandbox: PythonSandbox) -> None:
    result = sandbox.run("def f():\n    return 1 / 0\nprint('before')\nf()")
    assert result.outcome == "error" and result.error is not None
    assert result.error.type == "ZeroDivisionError"
    assert result.error.message == "division by zero"
    assert 'File "<cell' in result.error.traceback and "return 1 / 0" in result.error.traceback
    assert "sandbox_child" not in result.error.traceback
    assert result.stdout == "before\n"
    syntax = sandbox.run("def (")
    assert syntax.error is not None and syntax.error.type == "SyntaxError"
    assert sandbox.run("1 + 1").value == "2"  # the interpreter is unharmed


def test_busy_loop_hits_cpu_limit_and_interpreter_survives(workdir_root: Path) -> None:
    # Wall time well above the CPU budget: on a loaded machine 1 CPU-s takes several seconds.
    limits = dataclasses.replace(TIGHT_LIMITS, wall_time_s=20.0)
    with PythonSandbox(workdir_root, limits) as sandbox:
        sandbox.run("survivor = 'still here'")
        result = sandbox.run("while True:\n    pass")
        assert result.outcome == "error" and result.error is not None
        assert result.error.type == "CpuTimeLimitExceeded"
        assert sandbox.run("survivor").value == "'still here'"


def test_wall_time_limit_kills_and_next_call_is_fresh(fresh_sandbox: PythonSandbox) -> None:
    fresh_sandbox.run("lost = 1")
    result = fresh_sandbox.run("import time\ntime.sleep(60)")
    assert result.outcome == "timeout" and result.error is not None
    assert "wall time" in result.error.message
    after = fresh_sandbox.run("'lost' in globals()")
    assert after.outcome == "ok" and after.value == "False"
    assert after.restarted and after.notice is not None and "wall time" in after.notice


def test_interpreter_death_is_reported_and_next_call_is_fresh(
    fresh_sandbox: PythonSandbox,
) -> None:
    died = fresh_sandbox.run("import os\nos._exit(1)")
    assert died.outcome == "died" and died.error is not None
    assert "died (exit code 1)" in died.error.message
    after = fresh_sandbox.run("6 * 7")
    assert after.value == "42" and after.restarted and "exit code 1" in (after.notice or "")
    assert not fresh_sandbox.run("0").restarted


def test_fork_bomb_is_contained(fresh_sandbox: PythonSandbox) -> None:
    result = fresh_sandbox.run("import os\nwhile True:\n    os.fork()")
    assert result.outcome == "error" and result.error is not None
    assert result.error.type == "BlockingIOError"
    # Every forked process is gone once the call ends; the interpreter still works.
    survivors = fresh_sandbox.run(
        "import os\nsorted(p for p in os.listdir('/proc') if p.isdigit())"
    )
    assert survivors.value == "['1']"
    assert not survivors.restarted


def test_huge_allocation_fails_with_memory_error(sandbox: PythonSandbox) -> None:
    result = sandbox.run("buffer = bytearray(8 * 2**30)")
    assert result.error is not None and result.error.type == "MemoryError"
    assert sandbox.run("2 + 2").value == "4"


def test_no_network(sandbox: PythonSandbox) -> None:
    assert sandbox.network_mode == "netns"
    result = sandbox.run(
        "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 22))"
    )
    assert result.error is not None and result.error.type == "OSError"
    assert "unreachable" in result.error.message


def test_writes_outside_own_directory_fail(sandbox: PythonSandbox) -> None:
    assert sandbox.run("open('mine.txt', 'w').write('ok')").value == "2"
    assert (sandbox.workdir / "mine.txt").read_text() == "ok"
    parent = sandbox.workdir.parent
    for target in ("/tmp/tarry-sandbox-escape", "/work/main/escape", f"{parent}/escape", "../x"):
        result = sandbox.run(f"open({target!r}, 'w')")
        assert result.error is not None, target
        assert result.error.type in ("OSError", "PermissionError"), (target, result.error)
        assert not (sandbox.workdir / target).resolve().exists(), target


def test_cannot_read_another_sandboxes_directory(
    sandbox: PythonSandbox, fresh_sandbox: PythonSandbox
) -> None:
    fresh_sandbox.run("open('secret.txt', 'w').write('s3cret')")
    other = fresh_sandbox.workdir
    for code in (f"import os\nos.listdir({str(other)!r})", f"open('{other}/secret.txt').read()"):
        result = sandbox.run(code)
        assert result.error is not None
        assert result.error.type in ("PermissionError", "FileNotFoundError"), result.error
    assert sandbox.uid != fresh_sandbox.uid


def test_huge_output_is_truncated_while_streaming(sandbox: PythonSandbox) -> None:
    result = sandbox.run("print('x' * 100_000_000)\nfor _ in range(10_000):\n    print('y' * 100)")
    assert result.outcome == "ok"
    assert result.stdout == "x" * TIGHT_LIMITS.output_chars
    assert result.stdout_truncated and not result.stderr_truncated
    long_value = sandbox.run("'z' * 10**6")
    assert long_value.value is not None and len(long_value.value) == TIGHT_LIMITS.output_chars


def test_close_kills_interpreter_and_removes_directory(workdir_root: Path) -> None:
    sandbox = PythonSandbox(workdir_root, TIGHT_LIMITS)
    interpreter = sandbox._resources.interpreter
    assert interpreter is not None and sandbox.workdir.is_dir()
    sandbox.close()
    assert interpreter.process.poll() is not None
    assert not sandbox.workdir.exists()
    with pytest.raises(SandboxError):
        sandbox.run("1")
    sandbox.close()  # idempotent


def test_output_written_to_file_descriptors_is_captured_in_order(sandbox: PythonSandbox) -> None:
    code = (
        "import os, subprocess, sys\n"
        "print('one')\n"
        "os.write(1, b'two\\n')\n"
        "subprocess.run(['echo', 'three'])\n"
        "print('four', flush=True)\n"
        "os.write(2, b'err\\n')\n"
        "sys.__stdout__.write('five\\n')\n"
    )
    result = sandbox.run(code)
    assert result.outcome == "ok", result.error
    assert result.stdout == "one\ntwo\nthree\nfour\nfive\n"
    assert result.stderr == "err\n"
    assert not result.stdout_truncated
    again = sandbox.run("print('next call')")  # nothing of the last call leaks into this one
    assert again.stdout == "next call\n"


def test_huge_raw_output_is_truncated(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import os\nos.write(1, b'r' * 1_000_000)\nprint('after')")
    assert result.outcome == "ok"
    assert result.stdout == "r" * TIGHT_LIMITS.output_chars
    assert result.stdout_truncated
