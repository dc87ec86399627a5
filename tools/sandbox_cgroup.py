"""One control group per sandbox: every process and thread of it limited and stopped together.

``SandboxCgroup.create(name, limits)`` makes ``name`` under the server's own cgroup in each
hierarchy this machine lets it write (root, cgroupfs mounted read-write) and sets what the
hierarchy offers:

==================  ==========================================  ============================
what                cgroup v2 (``cgroup2`` mount)               cgroup v1
==================  ==========================================  ============================
memory (all         ``memory.max`` (+ ``memory.swap.max`` 0)    ``memory.limit_in_bytes``
processes, files                                                (+ ``memory.memsw.*``)
in its tmpfs)
tasks               ``pids.max``                                ``pids.max``
CPU quota           ``cpu.max``                                 ``cpu.cfs_quota_us``
kill all            ``cgroup.kill``                             SIGKILL each pid until empty
CPU used            ``cpu.stat`` ``usage_usec``                 ``cpuacct.usage``
OOM kills           ``memory.events`` ``oom_kill``              ``memory.oom_control``
==================  ==========================================  ============================

A controller is taken from v2 when the v2 cgroup has it (``cgroup.controllers``), else from
its v1 hierarchy. Here (hybrid: v1 controllers, an empty ``cgroup2`` at
``/sys/fs/cgroup/unified``) limits come from v1 and killing from v2's ``cgroup.kill``.

The interpreter joins by writing ``0`` to each of ``procs_files`` before it runs any code, so
everything it starts is inside from the first instruction. ``create`` returns None when no
hierarchy is writable (not root, no cgroupfs): the sandbox then relies on rlimits.
``controls`` names the limits that hold. ``remove`` kills what is left and removes the groups.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    memory_bytes: int  # all processes of the sandbox together, its tmpfs files included
    max_tasks: int  # processes and threads together
    cpu_cores: float  # CPU quota: this many cores' worth of time per period


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """A mounted cgroup hierarchy and the server's own group in it."""

    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: the mount's controllers; v2: cgroup.controllers there
    own_dir: Path  # the server's cgroup in this hierarchy


def own_cgroup_paths() -> dict[str, str]:
    """Controller (``""`` for v2) -> the server's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as groups:
        for line in groups:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def find_hierarchies() -> list[Hierarchy]:
    """The writable cgroup hierarchies holding the server's own groups."""
    own = own_cgroup_paths()
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3].split(",")
            mount_root, mount_point = fields[3], fields[4]
            if fstype == "cgroup2" and "" in own:
                path, version = own[""], 2
            elif fstype == "cgroup":
                mounted = [c for c in V1_CONTROLLERS if c in options]
                if not mounted or mounted[0] not in own:
                    continue
                path, version = own[mounted[0]], 1
            else:
                continue
            relative = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path
            relative = "" if relative == "." else relative.lstrip("/")
            own_dir = Path(mount_point) / relative
            if not os.access(own_dir, os.W_OK):
                continue
            if version == 2:
                controllers = frozenset(read_text(own_dir / "cgroup.controllers").split())
            else:
                controllers = frozenset(c for c in V1_CONTROLLERS if c in options)
            found.append(Hierarchy(version, controllers, own_dir))
    return found


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def write_text(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
    except OSError:
        return False
    return True


def read_keyed(path: Path, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed cgroup file (``key value`` lines)."""
    for line in read_text(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


@dataclass
class SandboxCgroup:
    """The groups of one sandbox (see the module docstring)."""

    dirs: list[Path] = field(default_factory=list)
    controls: set[str] = field(default_factory=set)  # "memory", "pids", "cpu" that hold
    kill_file: Path | None = None  # v2 cgroup.kill
    oom_file: tuple[Path, str] | None = None  # (file, key) counting OOM kills
    cpu_file: tuple[Path, float] | None = None  # (file, seconds per unit) of CPU used

    @property
    def procs_files(self) -> list[str]:
        return [str(directory / "cgroup.procs") for directory in self.dirs]

    @classmethod
    def create(cls, name: str, limits: CgroupLimits) -> SandboxCgroup | None:
        """Groups named ``name`` with ``limits``; None when no hierarchy is writable."""
        if os.geteuid() != 0:
            return None
        try:
            hierarchies = find_hierarchies()
        except OSError:
            return None
        group = cls()
        v2_controllers: set[str] = set()
        # v2 first: a controller it offers the new group is not taken from v1 as well.
        for hierarchy in sorted(hierarchies, key=lambda h: -h.version):
            directory = hierarchy.own_dir / name
            remove_group(directory)  # a stale one of a server that died with this uid
            if hierarchy.version == 2 and hierarchy.controllers:
                # Fails (EBUSY) where the server's own group holds processes and is not the
                # root; the group then only kills and measures.
                enable = " ".join(
                    f"+{c}" for c in ("memory", "pids", "cpu") if c in hierarchy.controllers
                )
                write_text(hierarchy.own_dir / "cgroup.subtree_control", enable)
            try:
                directory.mkdir()
            except OSError:
                continue
            if hierarchy.version == 2:
                wanted = set(read_text(directory / "cgroup.controllers").split())
                v2_controllers |= wanted
            else:
                wanted = set(hierarchy.controllers) - v2_controllers
                if not wanted:
                    directory.rmdir()
                    continue
            group.dirs.append(directory)
            group._configure(hierarchy.version, directory, wanted, limits)
        return group if group.dirs else None

    def _configure(
        self, version: int, directory: Path, controllers: set[str], limits: CgroupLimits
    ) -> None:
        quota_us = max(1000, int(limits.cpu_cores * CPU_PERIOD_US))
        if version == 2:
            self.kill_file = directory / "cgroup.kill"
            if "memory" in controllers and write_text(
                directory / "memory.max", str(limits.memory_bytes)
            ):
                write_text(directory / "memory.swap.max", "0")
                self.controls.add("memory")
                self.oom_file = (directory / "memory.events", "oom_kill")
            if "pids" in controllers and write_text(directory / "pids.max", str(limits.max_tasks)):
                self.controls.add("pids")
            if "cpu" in controllers and write_text(
                directory / "cpu.max", f"{quota_us} {CPU_PERIOD_US}"
            ):
                self.controls.add("cpu")
            self.cpu_file = (directory / "cpu.stat", 1e-6)  # usage_usec, with or without cpu
            return
        if "memory" in controllers and write_text(
            directory / "memory.limit_in_bytes", str(limits.memory_bytes)
        ):
            write_text(directory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            self.controls.add("memory")
            self.oom_file = (directory / "memory.oom_control", "oom_kill")
        if "pids" in controllers and write_text(directory / "pids.max", str(limits.max_tasks)):
            self.controls.add("pids")
        if "cpu" in controllers:
            write_text(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            if write_text(directory / "cpu.cfs_quota_us", str(quota_us)):
                self.controls.add("cpu")
        if "cpuacct" in controllers and self.cpu_file is None:
            self.cpu_file = (directory / "cpuacct.usage", 1e-9)

    def num_oom_kills(self) -> int:
        if self.oom_file is None:
            return 0
        return read_keyed(*self.oom_file) or 0

    def cpu_time_s(self) -> float | None:
        """CPU time used by every process of the sandbox so far; None when not measured."""
        if self.cpu_file is None:
            return None
        path, unit_s = self.cpu_file
        if path.name == "cpu.stat":
            value = read_keyed(path, "usage_usec")
        else:
            text = read_text(path).strip()
            value = int(text) if text.isdigit() else None
        return None if value is None else value * unit_s

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            found.update(int(pid) for pid in read_text(directory / "cgroup.procs").split())
        return found

    def kill(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process of the sandbox; True once none is left (within the timeout)."""
        if self.kill_file is not None:
            write_text(self.kill_file, "1")
        deadline = time.monotonic() + timeout_s
        while pids := self.pids():
            if time.monotonic() > deadline:
                return False
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        return True

    def remove(self) -> None:
        """Kill what is left and remove the groups (best effort; idempotent)."""
        self.kill()
        for directory in self.dirs:
            remove_group(directory)
        self.dirs = []


def remove_group(directory: Path, timeout_s: float = 2.0) -> None:
    """rmdir a group once the kernel lets it (dying tasks keep it busy for a moment)."""
    if not directory.exists():
        return
    for pid in read_text(directory / "cgroup.procs").split():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
