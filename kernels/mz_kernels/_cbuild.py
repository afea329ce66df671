"""Compile a single C source into a shared library on first use and load it with ctypes.

Plain C and the system compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on ``PATH``): no torch
headers, no ninja, so a build takes well under a second. Libraries are cached per user in
``$MZ_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mambazoo`` or ``~/.cache/mambazoo``) under a hash of
the source, the compiler, its version, the flags and the CPU, and written atomically (temporary
file + ``os.replace``), so concurrent processes may build the same library safely.

Flags: ``-O3 -march=native -fopenmp`` plus ``-fno-math-errno -ffp-contract=fast`` (fused
multiply-adds); the build falls back to no ``-fopenmp``, then to no ``-march=native``. ``-ffast-math``
is deliberately not used: with GCC < 13, linking a shared library with it pulls in ``crtfastmath.o``,
which turns on flush-to-zero for the whole process when the library loads, and its reassociation
could undo the two-constant range reduction of the kernels' ``exp``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
# optional flag groups, tried from the first (all) to the last (none)
FLAG_VARIANTS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())
_TIMEOUT_S = 120
INCLUDE_DIR = Path(__file__).with_name("csrc")  # shared headers (mz_simd.h), on the include path

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_failed: dict[str, CBuildError] = {}


class CBuildError(RuntimeError):
    """The C library could not be built or loaded; ``str(err)`` is a one-line reason."""


def cache_dir() -> Path:
    """Where compiled libraries live: ``$MZ_CACHE_DIR``, else ``$XDG_CACHE_HOME/mambazoo`` or ``~/.cache/mambazoo``."""
    env = os.environ.get("MZ_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mambazoo"


def find_compiler() -> list[str]:
    """The compiler command (``$CC`` split like a shell would, else the first of cc/gcc/clang on PATH).

    Raises:
        CBuildError: no usable compiler.
    """
    env = os.environ.get("CC", "").strip()
    if env:
        cmd = shlex.split(env)
        exe = shutil.which(cmd[0])
        if exe is None:
            raise CBuildError(f"C compiler $CC={env!r} not found")
        return [exe, *cmd[1:]]
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe is not None:
            return [exe]
    raise CBuildError("no C compiler found (set $CC or install gcc/clang)")


def _one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    err = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
    return err if len(err) <= limit else err[: limit - 3] + "..."


def _compiler_id(cc: list[str]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise CBuildError(f"C compiler {cc[0]!r} does not run: {type(e).__name__}: {e}") from None
    if out.returncode != 0:
        raise CBuildError(f"C compiler {cc[0]!r} does not run: {_one_line(out.stderr or out.stdout)}")
    return (out.stdout.splitlines() or [""])[0]


def _cpu_id() -> str:
    """Identifies the instruction set ``-march=native`` targets (so a shared cache never serves a foreign CPU)."""
    ident = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += line
    except OSError:
        pass
    return ident


def _run(cmd: list[str], cwd: str) -> str | None:
    """Run one compiler command; ``None`` on success, else a one-line reason."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, cwd=cwd)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    return None if out.returncode == 0 else _one_line(out.stderr or out.stdout)


def _build(cc: list[str], source: Path, target: Path) -> tuple[str, ...]:
    """Compile ``source`` into ``target`` with the first flag variant that works; returns its flags."""
    target.parent.mkdir(parents=True, exist_ok=True)
    first_error = None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = os.path.join(tmp, "mod.o"), os.path.join(tmp, "mod.so")
        for extra in FLAG_VARIANTS:
            # compile, then link (with the OpenMP runtime when the compile used it)
            err = _run([*cc, *BASE_FLAGS, *extra, f"-I{INCLUDE_DIR}", "-c", str(source), "-o", obj], tmp)
            if err is None:
                link_extra = ["-fopenmp"] if "-fopenmp" in extra else []
                err = _run([*cc, "-shared", *link_extra, obj, "-o", lib], tmp)
            if err is None:
                os.replace(lib, target)
                return extra
            first_error = first_error or err
    raise CBuildError(f"C build of {source.name} failed: {first_error}")


def load_library(source: str | os.PathLike, signatures: dict | None = None) -> ctypes.CDLL:
    """Compile ``source`` (cached) and return the loaded library; thread-safe, memoised per process.

    Args:
        source: path of a self-contained C file.
        signatures: ``{function name: (argtypes, restype)}`` set on the library when it is first loaded.

    Raises:
        CBuildError: no compiler, the build failed, or the library does not load (one-line reason).
    """
    source = Path(source).resolve()
    with _lock:
        key = str(source)
        if key in _loaded:
            return _loaded[key]
        if key in _failed:  # do not retry a failed build on every call
            raise _failed[key]
        try:
            lib = _load(source)
        except CBuildError as e:
            _failed[key] = e
            raise
        for name, (args, res) in (signatures or {}).items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _loaded[key] = lib
        return lib


def _load(source: Path) -> ctypes.CDLL:
    """Find the compiler, build ``source`` into the cache unless already there, and load it."""
    if sys.platform == "win32":
        raise CBuildError("compile-on-first-use C kernels are not supported on Windows")
    cc = find_compiler()
    try:
        code = source.read_bytes()
    except OSError as e:
        raise CBuildError(f"cannot read {source}: {e}") from None
    h = hashlib.sha256()
    for header in sorted(INCLUDE_DIR.glob("*.h")):  # shared headers change the build too
        h.update(header.read_bytes())
    for part in (code, " ".join(cc).encode(), _compiler_id(cc).encode(), repr((BASE_FLAGS, FLAG_VARIANTS)).encode(), _cpu_id().encode()):
        h.update(part)
        h.update(b"\0")
    target = cache_dir() / f"{source.stem}-{h.hexdigest()[:20]}.so"
    if not target.exists():
        try:
            _build(cc, source, target)
        except OSError as e:  # cache dir not writable, disk full, ...
            raise CBuildError(f"cannot write to cache dir {target.parent}: {e}") from None
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise CBuildError(f"cannot load {target}: {e}") from None
