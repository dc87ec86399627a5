"""Compile a C source of ``kernels/csrc`` on first use and load it with ``ctypes``.

The source is compiled with the system C compiler (``gcc -O3 -march=native -fopenmp``) into
``<cache>/kernels/<name>-<hash>.so``; the hash covers the source, the flags and the CPU's
feature flags, so a cache shared between machines never loads a library built for another
CPU. Compiling takes about a second, once per machine and source.

The libraries link ``libgomp.so.1``, the OpenMP runtime torch itself loads, so their threads
are torch's threads (``torch.get_num_threads()`` of them), not a second pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fPIC",
    "-shared",
    # Let gcc vectorise the dot products (reassociate float sums); infinities stay exact.
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
]


def _cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    """``$TARRY_CACHE_DIR/kernels`` or ``~/.cache/tarry/kernels`` (as the model cache)."""
    root = os.environ.get("TARRY_CACHE_DIR") or Path.home() / ".cache" / "tarry"
    return Path(root) / "kernels"


def build(source: Path, library: Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile ``source`` into ``library`` atomically (a concurrent build may win the race).
    Raises ``RuntimeError`` when there is no compiler or it fails."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *CFLAGS, *extra_flags, str(source), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, library)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{compiler} failed: {err.stderr.strip()}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled ``source`` (``kernels/csrc/<name>.c``), built into the cache on first use.
    Raises ``OSError``, ``RuntimeError`` or ``subprocess.SubprocessError`` where it cannot be
    built or loaded (the callers log once and keep their torch path)."""
    flags = " ".join([*CFLAGS, *extra_flags])
    key = hashlib.sha256(source.read_bytes() + flags.encode() + _cpu_flags().encode())
    library = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not library.exists():
        build(source, library, extra_flags)
    return ctypes.CDLL(str(library))


def load_function(
    source: Path,
    symbol: str,
    argtypes: list[Any],
    off_switch: str,
    extra_flags: tuple[str, ...] = (),
) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """``symbol`` of the compiled ``source`` with its ``argtypes`` (returning a C ``int``),
    or ``None`` where it cannot be built or loaded (logged: the caller keeps its torch path)
    or the environment variable ``off_switch`` is ``0``."""
    if os.environ.get(off_switch, "1") == "0":
        return None
    try:
        function = getattr(load_library(source, extra_flags), symbol)
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning("compiled kernel %s unavailable, using torch: %s", symbol, err)
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function
