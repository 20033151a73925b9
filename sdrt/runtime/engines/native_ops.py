"""sdrt's own CPU operators for ONNX Runtime (native/sdrt_ops.cpp): compiled on first use with this machine's C++
compiler, cached, and registered in every CPU session.

Why compile here: the library is built for the CPU it runs on (-march=native: AVX-512 where there is AVX-512),
and a wheel per CPU and platform is more than these few hundred lines are worth. Why it is optional: every
operator it provides is also an ONNX function in the graph (export/passes/cpu_graph.py), so without a compiler, or with
SDRT_NATIVE_OPS=0, the same graph runs on ONNX Runtime's own operators, slower and otherwise the same.

The cache key covers the sources, the compiler and its version, the flags and what -march=native means on this
CPU (the instruction sets the compiler enables for it), so a home folder shared between machines never hands one
CPU another's build. A build goes to a temporary file that is renamed into place: two processes building at once
both end with a whole library. A cached file that won't load, or that another account could have written, is
rebuilt; a cache folder that is not this user's alone turns the library off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

SWITCH = "SDRT_NATIVE_OPS"  # "0" turns the library off
CACHE_DIR = "SDRT_CACHE_DIR"  # default: $XDG_CACHE_HOME/sdrt, else ~/.cache/sdrt
SOURCES = ("sdrt_ops.cpp", "attention.h", "group_norm.h")
LIBRARY = "libsdrt_ops.so"
FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden")
TUNED = ("-march=native",)  # dropped when the compiler refuses it (some ARM compilers); the kernels still build
BUILD_TIMEOUT_S = 300
SYMBOLS = ("RegisterCustomOps", "sdrt_ops_attention_calls", "sdrt_ops_group_norm_calls")


@dataclass(frozen=True)
class Status:
    path: Path | None  # the library to register, or None
    detail: str  # "built ...", "cached ...", or why there is none

    def describe(self) -> str:
        return f"on ({self.detail})" if self.path else f"off ({self.detail})"


_lock = threading.Lock()
_status: Status | None = None


def library() -> Path | None:
    """The compiled library, building it on first use; None when it can't be had (status() says why)."""
    return status().path


def status() -> Status:
    global _status
    with _lock:
        if _status is None:
            _status = _find_or_build()
        return _status


def reset() -> None:
    """Forget this process's answer (tests change the environment between cases)."""
    global _status
    with _lock:
        _status = None


def calls(path: Path, kernel: str) -> int:
    """How many calls kernel ("attention", "group_norm") of the library at path has computed in this process
    (ONNX Runtime and ctypes share one loaded copy of a file)."""
    counter = getattr(ctypes.CDLL(str(path)), f"sdrt_ops_{kernel}_calls")
    counter.restype = ctypes.c_uint64
    return int(counter())


def cache_root() -> Path:
    if os.environ.get(CACHE_DIR):
        return Path(os.environ[CACHE_DIR])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdrt"


def _find_or_build() -> Status:
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return Status(None, f"turned off by {SWITCH}={os.environ[SWITCH]}")
    if sys.platform == "win32":
        return Status(None, "not built on Windows; ONNX Runtime's operators run instead")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        return Status(None, "no C++ compiler found (set CXX, or install g++); ONNX Runtime's operators run instead")
    version = _compiler_version(compiler)
    if version is None:
        return Status(None, f"the C++ compiler {compiler!r} does not run; ONNX Runtime's operators run instead")
    source_dir = Path(__file__).with_name("native")
    sources = b"".join((source_dir / name).read_bytes() for name in SOURCES)
    key = hashlib.sha256(b"\0".join([sources, compiler.encode(), version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_identity(compiler).encode()])).hexdigest()[:16]
    try:
        target = cache_root() / "native" / key / LIBRARY
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (OSError, RuntimeError) as e:  # RuntimeError: Path.home() without HOME or a passwd entry
        return Status(None, f"it has no cache folder ({getattr(e, 'strerror', None) or e}); set {CACHE_DIR} to a "
                            "writable folder. ONNX Runtime's operators run instead")
    if not _private(target.parent):
        return Status(None, f"its cache folder {str(target.parent)!r} is not yours alone (owner or permissions), "
                            "so a library there is not loaded; ONNX Runtime's operators run instead")
    if target.is_file() and _private(target) and _loads(target):
        return Status(target, f"cached at {target}")
    try:
        _build(compiler, source_dir / SOURCES[0], target)
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        return Status(None, f"building it failed ({e}); ONNX Runtime's operators run instead")
    if not _loads(target):
        return Status(None, f"the library built at {target} does not load; ONNX Runtime's operators run instead")
    return Status(target, f"built at {target}")


def _compiler_version(compiler: str) -> str | None:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_identity(compiler: str) -> str:
    """What -march=native compiles for: the instruction-set macros the compiler defines with it (it asks the CPU
    itself, through cpuid), else the CPU's feature flags as the kernel reports them, else what platform knows.
    /proc/cpuinfo alone is not enough: a hypervisor or an emulator can show flags the code may not use."""
    try:
        done = subprocess.run([compiler, *TUNED, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                              text=True, timeout=30)
        if done.returncode == 0:
            return "\n".join(sorted(line for line in done.stdout.splitlines() if line.startswith("#define __")))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else: a library loaded into the process must be one sdrt
    built, not one another account could have swapped in."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(compiler: str, source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = ""
        for extra in (TUNED, ()):
            done = subprocess.run([compiler, *FLAGS, *extra, str(source), "-o", tmp], capture_output=True,
                                  text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode == 0:
                os.chmod(tmp, 0o755)  # whatever the umask: _private() must accept it
                os.replace(tmp, target)
                return
            said = (done.stderr or done.stdout).strip().splitlines()
            errors = said[-1] if said else f"exit status {done.returncode}"  # the compiler's last word
        raise RuntimeError(f"{compiler} said: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _loads(path: Path) -> bool:
    try:
        lib = ctypes.CDLL(str(path))
        return all(hasattr(lib, name) for name in SYMBOLS)
    except OSError:
        return False
