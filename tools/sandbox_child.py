"""The sandbox's interpreter process: ``python -I tools/sandbox_child.py CONFIG_JSON``.

Standard library only (it runs with ``-I``, so nothing from the project is importable). The
parent (``tools/sandbox.py``) starts it, usually inside fresh mount, network and PID
namespaces (``unshare --mount-proc -n -p -f``) and as root; the setup below then, in order:

0. joins the sandbox's cgroups (``cgroup_procs``: write 0 to each ``cgroup.procs``) and
   becomes a child subreaper (orphans of its processes come back to it);
1. (mount namespace) makes mounts private, exposes the Python installation and the working
   directory when they sit under a directory an unprivileged user cannot traverse (a tmpfs
   hides the rest of that directory), binds the working directory onto itself and remounts
   every other mount read-only;
2. sets the resource limits (address space, processes, file size, total CPU, no core files);
3. drops to the sandbox's own uid/gid with no supplementary groups and ``no_new_privs``;
4. installs a seccomp filter that denies creating user namespaces (``deny_user_namespaces``);
5. blocks ``socket.socket`` when no network namespace isolates it.

Wire protocol (both directions): a 4-byte big-endian length, then that many bytes of UTF-8
JSON. The child first sends a hello (``{"ready": true, ...}`` or ``{"ready": false, "error":
...}``), then answers each ``{"code": str, "cpu_time_s": float}`` request with one result
frame. The protocol uses private duplicates of fds 0/1; between calls fds 0, 1 and 2 point
to ``/dev/null``. During a call fds 1 and 2 point to two unnamed capture files in the working
directory, so output written straight to a file descriptor (``os.write``, subprocesses,
C extensions) is captured in order with ``print``. ``sys.stdout``/``sys.stderr`` write through
to those fds but stop after ``output_chars`` characters (the rest is only counted), so
printing 100 MB never writes 100 MB; raw fd writes are bounded by the file-size limit.

Every process the code forks is killed when its call ends (processes do not outlive a call).
A call that leaves threads running (they could burn CPU or fork after the call) ends the
interpreter: its reply carries ``ended`` (why), then the process exits and the parent kills
whatever is left of the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import io
import json
import linecache
import os
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from typing import Any

FRAME_HEADER = struct.Struct(">I")

# Linux mount(2) flags.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


class CpuTimeLimitExceeded(BaseException):
    """Raised inside the running code when its CPU-time budget for the call is spent."""


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return FRAME_HEADER.pack(len(body)) + body


def read_exactly(fd: int, num_bytes: int) -> bytes | None:
    """Blocking read of ``num_bytes``; None at end of file."""
    chunks = []
    while num_bytes > 0:
        chunk = os.read(fd, min(num_bytes, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        num_bytes -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any] | None:
    header = read_exactly(fd, FRAME_HEADER.size)
    if header is None:
        return None
    body = read_exactly(fd, FRAME_HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def write_frame(fd: int, message: dict[str, Any]) -> None:
    data = memoryview(encode_frame(message))
    while data:
        data = data[os.write(fd, data) :]


class CappedFdStream(io.TextIOBase):
    """A text stream that writes through to ``fd`` until ``limit_chars`` characters, then
    only counts what it drops (``sys.stdout``/``sys.stderr`` during a call)."""

    def __init__(self, fd: int, limit_chars: int) -> None:
        self.fd = fd
        self.limit_chars = limit_chars
        self.num_kept = 0
        self.num_dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        room = max(self.limit_chars - self.num_kept, 0)
        kept = text[:room]
        if kept:
            data = memoryview(kept.encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self.fd, data) :]
            self.num_kept += len(kept)
        self.num_dropped += len(text) - len(kept)
        return len(text)


def unnamed_file(directory: str) -> int:
    """A read-write fd of a file in ``directory`` that has no name (gone when closed)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:  # a filesystem without O_TMPFILE: create, then unlink at once
        fd, path = tempfile.mkstemp(dir=directory)
        os.unlink(path)
        return fd


class CellOutput:
    """Captures fds 1 and 2 of one call (and of the processes it starts) in unnamed files of
    ``workdir``; ``sys.stdout``/``sys.stderr`` write through to them with a cap.

    ``start`` redirects, ``finish`` points the fds back at ``/dev/null`` and returns, per
    stream, the first ``limit_chars`` characters and how many were dropped (characters from
    ``print``, bytes from raw fd writes).
    """

    def __init__(self, workdir: str, limit_chars: int, null_fd: int) -> None:
        self.limit_chars = limit_chars
        self.null_fd = null_fd
        self.files = [unnamed_file(workdir) for _ in range(2)]
        self.streams = [CappedFdStream(fd, limit_chars) for fd in (1, 2)]
        self.saved = sys.stdout, sys.stderr

    def start(self) -> None:
        for target, file_fd in zip((1, 2), self.files, strict=True):
            os.dup2(file_fd, target)
        sys.stdout, sys.stderr = self.streams  # type: ignore[assignment]

    def finish(self) -> dict[str, Any]:
        sys.stdout, sys.stderr = self.saved
        for original in (sys.__stdout__, sys.__stderr__):  # code may have used them directly
            try:
                if original is not None:
                    original.flush()
            except (OSError, ValueError):
                pass
        for target in (1, 2):
            os.dup2(self.null_fd, target)
        result: dict[str, Any] = {}
        for name, file_fd, stream in zip(
            ("stdout", "stderr"), self.files, self.streams, strict=True
        ):
            text, dropped_bytes = self._read(file_fd)
            result[name] = text
            result[f"{name}_dropped"] = stream.num_dropped + dropped_bytes
            os.close(file_fd)
        return result

    def _read(self, file_fd: int) -> tuple[str, int]:
        """The first ``limit_chars`` characters of a capture file, and the bytes after them."""
        size = os.fstat(file_fd).st_size
        head = os.pread(file_fd, min(size, 4 * self.limit_chars), 0)
        text = head.decode("utf-8", "replace")[: self.limit_chars]
        kept_bytes = min(len(text.encode("utf-8", "replace")), size)
        return text, size - kept_bytes


# ---------------------------------------------------------------- setup (runs as root)


def libc_call(name: str, *args: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) from /proc/self/mountinfo, in mount order."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            path = fields[4].encode().decode("unicode_escape")  # \040 is a space
            flags = sum(MOUNT_OPTION_FLAGS.get(option, 0) for option in fields[5].split(","))
            points.append((path, flags))
    return points


def untraversable_ancestor(path: str) -> str | None:
    """The topmost ancestor of ``path`` that others may not search (no o+x), if any."""
    current = "/"
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def expose_paths(paths: list[str]) -> None:
    """Make ``paths`` reachable by an unprivileged uid: tmpfs over each hiding ancestor.

    The rest of a hiding ancestor (e.g. ``/root``) becomes invisible, which is the point.
    """
    paths = sorted(set(paths))
    outermost = [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]
    by_ancestor: dict[str, list[str]] = {}
    for path in outermost:
        ancestor = untraversable_ancestor(path)
        if ancestor is not None:
            by_ancestor.setdefault(ancestor, []).append(path)
    for ancestor, hidden_paths in by_ancestor.items():
        fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in hidden_paths]
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for path, fd in zip(hidden_paths, fds, strict=True):
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def isolate_filesystem(workdir: str) -> list[str]:
    """Everything read-only except ``workdir``; returns mounts that could not be remounted."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    python_paths = [sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))]
    expose_paths([*python_paths, workdir])
    mount(workdir, workdir, None, MS_BIND)
    failures = []
    for path, flags in mount_points():
        if path == workdir:
            continue
        try:
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
        except OSError as error:
            if path == "/":
                raise
            failures.append(f"{path}: {error.strerror}")
    return failures


def apply_limits(config: dict[str, Any]) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_total_s"],) * 2)
    if config["max_processes"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (config["max_processes"],) * 2)


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # Changing credentials cleared unshare's --kill-child death signal; set it again.
    libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# seccomp: classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}.
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
CLONE_NEWUSER = 0x10000000
BPF_LD_W_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
X32_SYSCALL_BIT = 0x40000000
# machine -> (AUDIT_ARCH, clone, unshare, clone3)
SYSCALLS = {
    "x86_64": (0xC000003E, 56, 272, 435),
    "aarch64": (0xC00000B7, 220, 97, 435),
}


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def user_namespace_filter(machine: str) -> list[tuple[int, int, int, int]] | None:
    """BPF (code, jt, jf, k): ``unshare``/``clone`` with CLONE_NEWUSER get EPERM, ``clone3``
    (flags out of reach in memory) gets ENOSYS so libc falls back to ``clone``; another ABI
    (x32, i386) gets EPERM for everything. None on an architecture not listed."""
    if machine not in SYSCALLS:
        return None
    arch, clone, unshare, clone3 = SYSCALLS[machine]
    eperm, enosys = SECCOMP_RET_ERRNO | 1, SECCOMP_RET_ERRNO | 38
    return [
        (BPF_LD_W_ABS, 0, 0, 4),  # 0: arch
        (BPF_JEQ, 0, 9, arch),  # 1: another ABI -> 11
        (BPF_LD_W_ABS, 0, 0, 0),  # 2: syscall number
        (BPF_JGE, 7, 0, X32_SYSCALL_BIT),  # 3: x32 -> 11
        (BPF_JEQ, 7, 0, clone3),  # 4: -> 12
        (BPF_JEQ, 2, 0, unshare),  # 5: -> 8
        (BPF_JEQ, 1, 0, clone),  # 6: -> 8
        (BPF_RET, 0, 0, SECCOMP_RET_ALLOW),  # 7
        (BPF_LD_W_ABS, 0, 0, 16),  # 8: low half of args[0] (the flags)
        (BPF_JSET, 1, 0, CLONE_NEWUSER),  # 9: -> 11
        (BPF_RET, 0, 0, SECCOMP_RET_ALLOW),  # 10
        (BPF_RET, 0, 0, eperm),  # 11
        (BPF_RET, 0, 0, enosys),  # 12
    ]


def deny_user_namespaces() -> bool:
    """Install the filter (needs ``no_new_privs`` or root); False where it is not available."""
    import platform

    program = user_namespace_filter(platform.machine())
    if program is None:
        return False
    filters = (SockFilter * len(program))(*[SockFilter(*insn) for insn in program])
    fprog = SockFprog(len(program), filters)
    libc_call("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)
    return True


def block_sockets() -> None:
    """Fallback without a network namespace: creating a socket raises PermissionError.

    Bypassable by determined code (ctypes); the network namespace is the real isolation.
    """
    import _socket
    import socket

    class BlockedSocket(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("network access is disabled in this sandbox")

    socket.socket = BlockedSocket  # type: ignore[misc]
    _socket.socket = BlockedSocket  # type: ignore[misc]


def set_up(config: dict[str, Any]) -> dict[str, Any]:
    """Isolate this process as configured; returns the hello's details. Raises on failure."""
    workdir = config["workdir"]
    warnings: list[str] = []
    for procs_file in config.get("cgroup_procs", []):
        with open(procs_file, "w") as procs:
            procs.write("0")
    libc_call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if config["isolate_filesystem"]:
        warnings = isolate_filesystem(workdir)
    os.chdir(workdir)
    apply_limits(config)
    if config["uid"] is not None:
        drop_privileges(config["uid"])
    libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    userns_denied = deny_user_namespaces()
    if config["block_sockets"]:
        block_sockets()
    return {
        "ready": True,
        "pid": os.getpid(),
        "uid": os.getuid(),
        "mount_warnings": warnings,
        "user_namespaces_denied": userns_denied,
    }


# ---------------------------------------------------------------- running code


def describe_exception(error: BaseException, limit_chars: int) -> dict[str, str]:
    """Type, message and traceback, without this module's own frames."""
    summary = traceback.TracebackException.from_exception(error)
    user_frames = [frame for frame in summary.stack if frame.filename != __file__]
    summary.stack = traceback.StackSummary.from_list(user_frames)
    lines = list(summary.format())
    return {
        "type": type(error).__name__,
        "message": str(error)[:limit_chars],
        "traceback": "".join(lines)[-limit_chars:],
    }


def on_cpu_limit(signum: int, frame: Any) -> None:
    raise CpuTimeLimitExceeded("CPU time limit for this call exceeded")


def set_cpu_budget(cpu_time_s: float | None) -> None:
    """Soft RLIMIT_CPU = CPU used so far + this call's budget (SIGXCPU, caught above)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if cpu_time_s is None:
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + cpu_time_s + 0.999)
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))


def execute(code: str, cell_idx: int, namespace: dict[str, Any]) -> Any:
    """Run ``code``; the value of a final expression statement is returned (else None)."""
    filename = f"<cell {cell_idx}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    tree = ast.parse(code, filename, "exec")
    last_expr = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last_expr = ast.Expression(tree.body[-1].value)
        del tree.body[-1]
    exec(compile(tree, filename, "exec"), namespace)
    if last_expr is None:
        return None
    return eval(compile(last_expr, filename, "eval"), namespace)


def run_cell(request: dict[str, Any], cell_idx: int, namespace: dict[str, Any], limit: int) -> dict:
    """Run one request's code; the value's repr and the error, if any (output: ``CellOutput``)."""
    value_repr: str | None = None
    error: dict[str, str] | None = None
    try:
        set_cpu_budget(request.get("cpu_time_s"))
        value = execute(request["code"], cell_idx, namespace)
        if value is not None:
            namespace["_"] = value
            value_repr = repr(value)[:limit]
    except BaseException as caught:  # noqa: B036 - user code may raise anything, exits included
        error = describe_exception(caught, limit)
    finally:
        set_cpu_budget(None)
    return {"value": value_repr, "error": error}


def kill_other_processes(may_kill_all: bool) -> None:
    """End every process the call left behind, and reap them.

    ``kill(-1)`` reaches every process this uid may signal: inside our own PID namespace
    (we are its init) or under a uid of our own that is exactly the sandbox's processes.
    Without either it would reach the user's other processes, so children are killed round
    by round instead: as a child subreaper we inherit the orphans of each round.
    """
    for _ in range(2000):  # each round waits 1 ms: dying processes are reaped, not waited on
        if may_kill_all:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                break
        else:
            children = child_pids()
            if not children:
                break
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)
        reap_children(block=False)
    reap_children(block=False)


def child_pids() -> list[int]:
    """Pids of this process's children (its own threads excluded), from /proc."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and int(entry) != me:
            found.append(int(entry))
    return found


def num_other_threads(grace_s: float = 0.05) -> int:
    """Threads of this process besides the main one, after ``grace_s`` for finishing ones."""
    deadline = time.monotonic() + grace_s
    while True:
        num_threads = len(os.listdir("/proc/self/task")) - 1
        if num_threads == 0 or time.monotonic() > deadline:
            return num_threads
        time.sleep(0.005)


def reap_children(block: bool) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(config: dict[str, Any], proto_in: int, proto_out: int, null_fd: int) -> None:
    main_pid = os.getpid()
    may_kill_all = main_pid == 1 or config["uid"] is not None
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    signal.signal(signal.SIGXCPU, on_cpu_limit)
    limit = config["output_chars"]
    cell_idx = 0
    while (request := read_frame(proto_in)) is not None:
        cell_idx += 1
        output = CellOutput(config["workdir"], limit, null_fd)
        output.start()
        result = run_cell(request, cell_idx, namespace, limit)
        if os.getpid() != main_pid:  # a process the code forked came back here: end it quietly
            os._exit(0)
        kill_other_processes(may_kill_all)  # (before reading: nothing writes any more)
        num_threads = num_other_threads()
        if num_threads:
            result["ended"] = (
                f"the call left {num_threads} thread(s) running, so its interpreter was ended"
            )
        result.update(output.finish())
        write_frame(proto_out, result)
        if num_threads:
            os._exit(0)


def main() -> None:
    proto_in, proto_out = os.dup(0), os.dup(1)
    null_fd = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null_fd, fd)
    config = json.loads(sys.argv[1])
    try:
        hello = set_up(config)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises
        write_frame(proto_out, {"ready": False, "error": f"{type(error).__name__}: {error}"})
        os._exit(1)
    write_frame(proto_out, hello)
    serve(config, proto_in, proto_out, null_fd)


if __name__ == "__main__":
    main()
