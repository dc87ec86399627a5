"""The sandbox contained as a whole (issue 14, item 4): one memory limit for all its processes,
nothing of a call running after it returns, a disk quota, uids unique across servers and no
user namespaces. These need root and a writable cgroupfs (this machine and CI have both);
``README.md`` says what holds without them."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.sandbox import PythonSandbox, SandboxLimits
from tools.sandbox_isolation import SandboxIsolation

MiB = 1 << 20
LIMITS = SandboxLimits(
    wall_time_s=20.0,
    cpu_time_s=10.0,
    memory_bytes=256 * MiB,
    max_processes=16,
    disk_bytes=16 * MiB,
    output_chars=2000,
)
FORK_AND_ALLOCATE = """
import os, time
children = []
for _ in range(12):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (48 << 20)  # touched: 12 x 48 MiB is far over 256 MiB together
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""
CLAIM_IN_ANOTHER_PROCESS = """
import sys
from tools.sandbox import PythonSandbox
with PythonSandbox(sys.argv[1]) as sandbox:
    print(sandbox.uid)
"""


@pytest.fixture(scope="module")
def workdir_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="tarry-contain-test-"))
    yield root / "sandboxes"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sandbox(workdir_root: Path) -> Iterator[PythonSandbox]:
    with PythonSandbox(workdir_root, LIMITS) as own:
        yield own


def test_the_machine_gives_this_sandbox_every_control(sandbox: PythonSandbox) -> None:
    assert sandbox.cgroup_controls == {"memory", "pids", "cpu"}
    assert sandbox.disk_quota_bytes == 16 * MiB
    assert sandbox.cpu_time_s() is not None


def test_forked_children_are_stopped_together_at_the_memory_limit(sandbox: PythonSandbox) -> None:
    sandbox.run("kept = 1")
    started = time.monotonic()
    result = sandbox.run(FORK_AND_ALLOCATE)
    assert result.outcome == "died" and result.error is not None
    assert result.error.type == "MemoryLimitExceeded"
    assert "256 MiB" in result.error.message
    assert time.monotonic() - started < 10  # stopped at the limit, not at the 30 s sleeps
    assert sandbox._resources.cgroup is not None and sandbox._resources.cgroup.pids() == set()
    after = sandbox.run("'kept' in globals(), 6 * 7")
    assert after.restarted and after.value == "(False, 42)"


def test_thread_left_running_is_stopped_when_the_call_returns(sandbox: PythonSandbox) -> None:
    result = sandbox.run(
        "import threading, subprocess, time\n"
        "def burn():\n"
        "    time.sleep(0.3)\n"
        "    subprocess.Popen(['sleep', '60'])  # a process forked by the thread, after the call\n"
        "    while True:\n"
        "        pass\n"
        "threading.Thread(target=burn, daemon=True).start()\n"
        "'started'"
    )
    assert result.outcome == "ok" and result.value == "'started'"
    assert result.notice is not None and "thread" in result.notice
    cpu_after_call = sandbox.cpu_time_s()
    assert cpu_after_call is not None
    time.sleep(1.0)
    cpu_later = sandbox.cpu_time_s()
    assert cpu_later is not None and cpu_later - cpu_after_call < 0.05
    assert sandbox._resources.cgroup is not None and sandbox._resources.cgroup.pids() == set()
    again = sandbox.run("1 + 1")
    assert again.restarted and again.value == "2"


def test_process_left_by_a_call_is_gone_after_it(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import subprocess\nsubprocess.Popen(['sleep', '60']).pid")
    assert result.outcome == "ok"
    cgroup = sandbox._resources.cgroup
    assert cgroup is not None and len(cgroup.pids()) == 1  # the interpreter alone


def test_writing_past_the_disk_quota_fails_in_the_code(sandbox: PythonSandbox) -> None:
    result = sandbox.run(
        "chunk = b'x' * (4 << 20)\n"
        "for idx in range(8):  # 32 MiB in files of 4 MiB, against a 16 MiB quota\n"
        "    with open(f'part{idx}', 'wb') as f:\n"
        "        f.write(chunk)\n"
    )
    assert result.outcome == "error" and result.error is not None
    assert result.error.type == "OSError" and "No space left" in result.error.message
    usage = sandbox.run("import shutil\nshutil.disk_usage('.').total")
    assert usage.value is not None and int(usage.value) <= 16 * MiB
    cleaned = sandbox.run("import os\nfor name in os.listdir('.'): os.remove(name)\n'ok'")
    assert cleaned.value == "'ok'"


def test_close_unmounts_at_once(workdir_root: Path) -> None:
    sandbox = PythonSandbox(workdir_root, LIMITS)
    sandbox.run("open('data', 'wb').write(b'x' * (12 << 20))")
    workdir = sandbox.workdir
    started = time.monotonic()
    sandbox.close()
    assert time.monotonic() - started < 1.0
    assert not workdir.exists()


def test_two_sandbox_managers_get_distinct_uids(tmp_path: Path) -> None:
    """Two servers each have their own workdir root; uids are claimed machine-wide."""
    first_server = [PythonSandbox(tmp_path / "server-1", LIMITS) for _ in range(2)]
    second_server = [PythonSandbox(tmp_path / "server-2", LIMITS) for _ in range(2)]
    try:
        uids = [sandbox.uid for sandbox in (*first_server, *second_server)]
        assert None not in uids and len(set(uids)) == 4
        reported = [s.run("import os\nos.getuid()").value for s in (*first_server, *second_server)]
        assert reported == [str(uid) for uid in uids]
        freed = first_server.pop()
        freed_uid = freed.uid
        freed.close()
        reused = PythonSandbox(tmp_path / "server-2", LIMITS)
        second_server.append(reused)
        assert reused.uid == freed_uid  # a closed sandbox's uid is free again
        # Another process (a second `tarry serve`) claims past every uid held here.
        other_server = subprocess.run(
            [sys.executable, "-c", CLAIM_IN_ANOTHER_PROCESS, str(tmp_path / "server-3")],
            capture_output=True,
            text=True,
            check=True,
        )
        other_uid = int(other_server.stdout)
        assert other_uid not in [s.uid for s in (*first_server, *second_server)]
    finally:
        for sandbox in (*first_server, *second_server):
            sandbox.close()


def test_user_namespaces_cannot_be_created(sandbox: PythonSandbox) -> None:
    result = sandbox.run(
        "import ctypes, subprocess\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "direct = libc.unshare(0x10000000) or 'created', ctypes.get_errno()  # CLONE_NEWUSER\n"
        "tool = subprocess.run(['unshare', '-U', 'true'], capture_output=True)\n"
        "direct, tool.returncode, subprocess.run(['true']).returncode  # processes still work"
    )
    assert result.outcome == "ok", result
    assert result.value == "((-1, 1), 1, 0)"  # unshare(2): -1 with EPERM; unshare(1): exit 1


def test_orphans_are_killed_without_namespaces_or_own_uid(workdir_root: Path) -> None:
    """The non-root path (no PID namespace, the server's uid): the interpreter is a child
    subreaper, so the processes a call orphaned come back to it and are killed."""
    fallback = SandboxIsolation(unshare_path=None, separate_uid=False)
    with PythonSandbox(workdir_root, LIMITS, isolation=fallback) as sandbox:
        result = sandbox.run(
            "import subprocess, time\n"
            "subprocess.Popen(['sh', '-c', 'sleep 61 & sleep 62'])\n"
            "time.sleep(0.3)\n"
            "'forked'"
        )
        assert result.outcome == "ok" and result.value == "'forked'"
        cgroup = sandbox._resources.cgroup
        assert cgroup is not None and len(cgroup.pids()) == 1  # the interpreter alone
        denied = sandbox.run(
            "import subprocess\nsubprocess.run(['unshare', '-U', 'true']).returncode"
        )
        assert denied.value == "1"  # seccomp holds without root too


def test_interpreter_killed_at_the_memory_limit_says_so(workdir_root: Path) -> None:
    """Its files count as memory: 200 MiB held plus 200 MiB written to its tmpfs is over the
    256 MiB limit, so the OOM killer ends the interpreter itself; the result names the limit."""
    roomy_disk = dataclasses.replace(LIMITS, disk_bytes=256 * MiB)
    with PythonSandbox(workdir_root, roomy_disk) as sandbox:
        result = sandbox.run("data = b'x' * (200 << 20)\nopen('big', 'wb').write(data)")
        assert result.outcome == "died" and result.error is not None
        assert result.error.type == "MemoryLimitExceeded"
        assert sandbox.run("6 * 7").value == "42"
